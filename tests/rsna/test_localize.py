"""Localisation of stage-1 predictions into stage-2 inputs (known answers), and the test-time stride."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from utils.rsna.localize import (
    COLUMNS,
    fill_skipped_slices,
    localize,
    localize_study,
    longest_run,
    ordered_labels,
    strided_slices,
)
from utils.rsna.metric import VERTEBRAE


def test_longest_run():
    assert longest_run(np.array([0, 1, 1, 0, 1, 1, 1, 0], bool)) == (4, 6)
    assert longest_run(np.zeros(4, bool)) is None


def _preds(
    uid: str, n: int, spans: dict[str, tuple[int, int]], box=(0.3, 0.2, 0.6, 0.7)
) -> pd.DataFrame:
    df = pd.DataFrame({"StudyInstanceUID": uid, "slice": np.arange(n)})
    for i in range(1, 8):
        df[f"C{i}"] = 0.0
    for v, (a, b) in spans.items():
        df.loc[a:b, v] = 1.0
    df[["x0", "y0", "x1", "y1"]] = box
    return df


def test_localize_known_ranges_and_box():
    preds = pd.concat([_preds("s1", 30, {"C1": (2, 6), "C2": (7, 12)}), _preds("empty", 10, {})])
    out = localize(preds, smooth=1, vert_thresh=0.5, box_margin=0.1)
    assert list(out.columns) == COLUMNS
    assert out.StudyInstanceUID.unique().tolist() == ["s1"]  # nothing found in "empty"
    c1 = out[out.vertebra == "C1"].iloc[0]
    assert (c1.start, c1.end, c1.n_slices) == (2, 6, 5)
    np.testing.assert_allclose(c1[["x0", "y0", "x1", "y1"]].astype(float), [0.27, 0.15, 0.63, 0.75])


def test_c2_range_covers_c1_whose_ring_its_dens_crosses():
    """Ordered decoding gives a slice one vertebra; C2's range takes C1's slices back, the other
    ranges stay as decoded (and the unordered decoding leaves C2 alone)."""
    preds = _preds("s", 30, {"C1": (2, 6), "C2": (7, 12), "C3": (14, 18)})
    ranges = localize(preds, smooth=1, vert_thresh=0.5, box_margin=0.1).set_index("vertebra")
    assert ranges.loc["C1", ["start", "end"]].tolist() == [2, 6]
    assert ranges.loc["C2", ["start", "end", "n_slices"]].tolist() == [2, 12, 11]
    assert ranges.loc["C3", ["start", "end"]].tolist() == [14, 18]
    plain = localize(preds, smooth=1, vert_thresh=0.5, box_margin=0.1, ordered=False)
    assert plain.set_index("vertebra").loc["C2", ["start", "end"]].tolist() == [7, 12]


def test_smoothing_removes_single_slice_spikes_and_box_is_clipped():
    preds = _preds("s", 20, {"C3": (5, 12)}, box=(0.0, 0.0, 1.0, 1.0))
    preds.loc[17, "C3"] = 1.0  # isolated spike
    out = localize(preds, smooth=5, vert_thresh=0.5, box_margin=0.2)
    row = out.iloc[0]
    assert (row.start, row.end) == (5, 12)
    assert row[["x0", "y0"]].tolist() == [0.0, 0.0] and row[["x1", "y1"]].tolist() == [1.0, 1.0]


def test_ordered_decoding_resolves_ambiguous_identities():
    """Seven bone runs separated by discs, identity nearly uniform: order decides (C1 first)."""
    ratios = np.full((60, 7), 0.01)
    truth = np.zeros(60, int)
    for j in range(7):
        a = 3 + 8 * j
        truth[a : a + 6] = j + 1
        ratios[a : a + 6] = 0.12  # presence 0.84, identity uninformative ...
        ratios[a : a + 6, j] = 0.14  # ... but for a slight preference
    ratios[5, 4] = 0.5  # a confident wrong identity on one slice cannot break the order
    labels = ordered_labels(ratios, ratios, thresh=0.3)
    np.testing.assert_array_equal(labels, truth)
    # Thresholding each vertebra's own ratio finds only the one confident (wrong) slice.
    unordered = localize(_frame(ratios), smooth=1, vert_thresh=0.3, box_margin=0.0, ordered=False)
    assert unordered[["vertebra", "start", "end"]].values.tolist() == [["C5", 5, 5]]


def test_ordered_decoding_may_start_below_c1():
    ratios = np.full((20, 7), 0.0)
    ratios[2:8, 2] = 0.9  # clearly C3, then C4
    ratios[10:16, 3] = 0.9
    labels = ordered_labels(ratios, ratios, thresh=0.3)
    assert (
        set(labels[2:8]) == {3}
        and set(labels[10:16]) == {4}
        and labels[[0, 9, 18]].tolist() == [0, 0, 0]
    )


@pytest.mark.parametrize("ordered", [True, False])
def test_threshold_zero_gives_every_vertebra_every_slice(ordered):
    """vert_thresh=0: 'every slice' for each of C1..C7, also with the ordered decoding."""
    ratios = np.full((12, 7), 0.01)
    ratios[:6, 0] = 0.9  # looks like C1 then C2 only: the decoding would drop C3..C7
    ratios[6:, 1] = 0.9
    table = localize(_frame(ratios), smooth=1, vert_thresh=0.0, box_margin=0.0, ordered=ordered)
    assert table["vertebra"].tolist() == [f"C{i}" for i in range(1, 8)]
    assert (table["start"] == 0).all() and (table["end"] == 11).all()


def _frame(ratios: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame(ratios, columns=[f"C{i}" for i in range(1, 8)])
    df.insert(0, "slice", np.arange(len(df)))
    df.insert(0, "StudyInstanceUID", "s")
    df[["x0", "y0", "x1", "y1"]] = (0.2, 0.2, 0.8, 0.8)
    return df


# ---- the test-time stage-1 stride --------------------------------------------------------------
def test_strided_slices_always_include_both_ends():
    assert strided_slices(10, 1).tolist() == list(range(10))
    assert strided_slices(10, 3).tolist() == [0, 3, 6, 9]
    assert strided_slices(11, 3).tolist() == [0, 3, 6, 9, 10]
    assert strided_slices(1, 2).tolist() == [0]
    with pytest.raises(ValueError, match="stride"):
        strided_slices(10, 0)


def _stage1_rows(slices, n_slices: int) -> pd.DataFrame:
    """Ratios linear in z (C1 rising, C7 falling); boxes that differ per slice."""
    z = np.asarray(slices, float) / (n_slices - 1)
    pred = pd.DataFrame({"StudyInstanceUID": "u", "slice": slices})
    for i, v in enumerate(VERTEBRAE):
        pred[v] = z if i == 0 else (1 - z if i == 6 else 0.0)
    pred[["x0", "y0", "x1", "y1"]] = np.c_[0.2 + 0.1 * z, 0.2 + 0 * z, 0.6 + 0 * z, 0.7 + 0 * z]
    return pred


def test_fill_skipped_slices_interpolates_ratios_and_keeps_boxes_of_predicted_slices_only():
    known = strided_slices(11, 3)
    full = fill_skipped_slices(_stage1_rows(known, 11), 11)
    assert full.slice.tolist() == list(range(11))
    np.testing.assert_allclose(full.C1, np.arange(11) / 10)  # linear ratios: exact
    np.testing.assert_allclose(full.C7, 1 - np.arange(11) / 10)
    assert full.x0.notna().tolist() == [s in set(known) for s in range(11)]


def test_localisation_from_a_strided_prediction_matches_every_slice_on_linear_ratios():
    every = localize_study(_stage1_rows(range(31), 31), 1, 0.3, 0.0, ordered=False)
    strided = localize_study(
        fill_skipped_slices(_stage1_rows(strided_slices(31, 2), 31), 31), 1, 0.3, 0.0, ordered=False
    )
    pd.testing.assert_frame_equal(
        every[["vertebra", "start", "end"]], strided[["vertebra", "start", "end"]]
    )
    assert strided[["x0", "y0", "x1", "y1"]].notna().all().all()
