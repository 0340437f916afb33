"""The HipMRI test hook: fold-mean masks of the test split, then the Dice report (utils/hipmri/report.py).

``python inference.py --CFG config/hipmri/unet.yaml --split test [--data-dir D] [--out DIR]``
writes ``DIR/seg_<p>_week_<w>_slice_<s>.nii.gz`` for every image of ``D/keras_slices_test/``
(input shape and affine, labels 0..5) and ``DIR/slices.csv`` (per-slice Dice); when the test
slices have masks, the report and overlays follow.
"""

from __future__ import annotations

import logging
from pathlib import Path

from utils import paths
from utils.config import Config
from utils.errors import InputError
from utils.hipmri import layout
from utils.hipmri.datasets import HipSlices
from utils.hipmri.report import dice_table, plot_overlays, write_report
from utils.predict import load_models, predict_to, run_config

log = logging.getLogger(__name__)


def test_chain(cfg: Config, out: Path | None) -> Path:
    """The pipeline's ``test`` hook: masks of ``cfg.data_dir``'s test split into ``out``.

    ``out`` None: ``masks/`` in the data folder's test folder (utils/paths.test_dir).
    """
    run = run_config(cfg)
    out = Path(out) if out is not None else paths.test_dir(cfg) / "masks"
    table = HipSlices.test_table(run)
    if table.empty:
        raise InputError(f"no test images in {layout.image_dir(paths.data_dir(run), 'test')}")
    models = load_models(run)
    log.info("predicting %d test slices with folds %s", len(table), sorted(models))
    with HipSlices.make_writer(run, out, table) as writer:
        predict_to(writer, run, models.values(), table)
    if writer.n_scored:
        report = write_report(run, writer, table, sorted(models))
        print(dice_table(report))
        plot_overlays(
            table, Path(out), paths.pipeline_dir(run) / "test_overlays", int(run.report.overlays)
        )
    print(f"test masks: {out} ({len(table)} slices)")
    return Path(out)
