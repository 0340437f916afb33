"""The seed benchmark's arithmetic: mean ± sample sd per metric, ties in a ranking."""

from __future__ import annotations

import pytest

from bench.bench_seeds import HEADLINES, markdown, ranking, summarise


def test_mean_and_sample_sd_over_seeds_skip_missing_values():
    per_seed = {0: {"auc": 0.7, "f1": None}, 1: {"auc": 0.8, "f1": 0.5}, 2: {"auc": 0.9, "f1": 0.7}}
    summary = summarise(per_seed)
    assert summary["auc"]["mean"] == pytest.approx(0.8)
    assert summary["auc"]["sd"] == pytest.approx(0.1)  # n - 1
    assert summary["f1"]["mean"] == pytest.approx(0.6) and summary["f1"]["min"] == 0.5


def test_ranking_calls_a_gap_within_the_sd_a_tie():
    summary = {
        "A_macro_f1": {"mean": 0.60, "sd": 0.05},
        "B_macro_f1": {"mean": 0.50, "sd": 0.05},
        "C_macro_f1": {"mean": 0.48, "sd": 0.04},
        "A_dsc": {"mean": 0.9, "sd": 0.0},
    }
    assert ranking(summary, "_macro_f1") == "A > B ~ C"


def test_every_pipeline_headline_reads_its_report():
    report = {
        "cls_auc": 0.7,
        "cls_auc_mask_guided": 0.8,
        "seg_dice": 0.4,
        "seg_dice_all": 0.7,
    }
    assert HEADLINES["fracatlas"](report)["guidance_gain_auc"] == pytest.approx(0.1)
    rsna = {
        "oof_metric": 0.2,
        "baseline_prior": 0.5,
        "ratio_to_prior": 0.4,
        "baseline_noisy_or": 0.23,
        "oof_metric_raw": 0.19,
        "per_target_auc": {"C1": 0.8},
        "patient_level": {"chosen": "head", "oof_metric": {"head": 0.2, "noisy_or": 0.21}},
        "phantom": {"metric": 0.4, "baseline_prior": 0.5},
    }
    headline = HEADLINES["rsna"](rsna)
    assert headline["oof_metric_head"] == 0.2 and headline["oof_metric_noisy_or"] == 0.21
    assert headline["phantom_ratio_to_prior"] == pytest.approx(0.8) and headline["auc_C1"] == 0.8
    result = {
        "mode": "m",
        "date": "d",
        "load": "l",
        "seconds": {0: 1.0, 1: 2.0},
        "per_seed": {0: {"x": 1.0}, 1: {"x": 3.0}},
        "summary": summarise({0: {"x": 1.0}, 1: {"x": 3.0}}),
    }
    assert "| x | 2.0000 ± 1.4142 | 1.0000 | 3.0000 |" in markdown("hipmri", result)
