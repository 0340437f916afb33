"""A real RSNA stage under torchrun (2 gloo processes on CPU) against one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import train
from tests.conftest import ROOT
from tests.rsna.conftest import tiny_overrides
from utils import paths
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.engine import make_loader, predict, prepare_model
from utils.registry import DATASETS, build_dataset, build_loss, build_model


@pytest.mark.slow
def test_rsna_stage1_under_torchrun(tiny_data, tiny_output):
    """A real stage (resnet18, BatchNorm, bf16 autocast, channels_last, augmentation) on 2 ranks:
    rank 0's run folder is complete and its logged validation metrics are those of one process
    evaluating the saved weights on the whole validation table."""

    stage = "config/rsna/stage1_vertebra.yaml"
    ov = [*tiny_overrides(tiny_data, tiny_output), "exp_name=ddp_stage1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*cmd, "train.py", "--CFG", stage, "--fold", "0", *ov],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = load_config(stage, ov)
    run = paths.run_dir(cfg, 0)
    for name in ("config.yaml", "train.log", "metrics.csv", "curves.png", "last.pth", "best.pth"):
        assert (run / name).is_file(), name
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(run / "last.pth")["model"])  # unwrapped keys
    model = prepare_model(model, cfg, torch.device("cpu"))  # channels_last, as train.py
    val = build_dataset(cfg, train.split_table(cfg, 0)[1], False)
    outs, loss = predict(
        cfg, model, make_loader(cfg, val, False), torch.device("cpu"), build_loss(cfg)
    )
    expected = DATASETS.get(cfg.dataset.name).evaluate(outs, val.table)
    logged = pd.read_csv(run / "metrics.csv").iloc[-1]
    for key, value in expected.items():
        assert logged[f"val_{key}"] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert logged["val_loss"] == pytest.approx(loss, rel=1e-2)
