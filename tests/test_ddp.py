"""DDP through torchrun on CPU (gloo, 2 processes) against one process; opt-in trackers.

A toy pipeline (a small MLP on 2-D points: no BatchNorm, dropout or augmentation, a per-sample
mean loss) is registered in the test process for single-process runs, and by this file itself
when torchrun runs it as the training script (``python -m torch.distributed.run ...
tests/test_ddp.py --CFG ...``), since a subprocess cannot see registrations made here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import train  # torchrun runs this file as a script with the repository on PYTHONPATH
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.datasets import StageDataset
from utils.distributed import DistInfo, ShardSampler, per_rank_batch, train_sampler
from utils.engine import make_loader, predict
from utils.errors import InputError
from utils.fold_split import main as fold_main
from utils.registry import DATASETS, LOSSES, MODELS, PIPELINES, FoldInputs, Pipeline
from utils.tracking import Tracker, make_tracker

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 31  # folds of 10/10/11 rows: uneven validation blocks, a dropped partial training batch


class DdpPoints(StageDataset):
    """One 2-D point per row, target ``y``."""

    key_columns = ("case",)

    def __init__(self, table, cfg, train):
        super().__init__(table, cfg, train)
        self.x = torch.tensor(self.table[["x0", "x1"]].to_numpy(np.float32))
        self.y = torch.tensor(self.table["y"].to_numpy(np.float32))

    @staticmethod
    def load_table(cfg) -> pd.DataFrame:
        return pd.read_csv(f"{cfg.data_dir}/train.csv", dtype={"case": str})

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}

    @staticmethod
    def evaluate(out, table) -> dict:
        """Order-sensitive on purpose: a shuffled, padded or short gather changes ``dot``."""
        if len(out["score"]) != len(table):
            raise AssertionError(f"{len(out['score'])} outputs for {len(table)} rows")
        return {
            "dot": float(np.dot(out["score"], np.arange(len(table)) + table["y"].to_numpy())),
            "acc": float(((out["score"] > 0) == (table["y"] > 0)).mean()),
        }


class DdpMLP(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, batch):
        return {"score": self.net(batch["x"])[:, 0]}


class DdpBCE(nn.Module):
    def forward(self, out, batch):
        return nn.functional.binary_cross_entropy_with_logits(out["score"], batch["y"])


ENTRIES = [
    (
        PIPELINES,
        "ddp_toy",
        Pipeline(
            name="ddp_toy",
            id_col="case",
            fold_inputs=lambda cfg: FoldInputs(pd.read_csv(f"{cfg.data_dir}/train.csv", dtype=str)),
            preprocess=lambda argv: None,
        ),
    ),
    (DATASETS, "ddp_points", DdpPoints),
    (MODELS, "ddp_mlp", DdpMLP),
    (LOSSES, "ddp_bce", DdpBCE),
]


def register() -> None:
    for registry, name, obj in ENTRIES:
        registry.register(name)(obj)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(stage config path, overrides) of the toy pipeline; its components registered meanwhile."""
    register()
    root = tmp_path_factory.mktemp("ddp_toy")
    conf = root / "config" / "ddp_toy"
    conf.mkdir(parents=True)
    (conf / "base.yaml").write_text("n_folds: 3   # three folds\n")
    (conf / "mlp.yaml").write_text(
        "dataset: {name: ddp_points}\nmodel: {name: ddp_mlp}\nloss: {name: ddp_bce}\n"
        "num_workers: 0\nprogress: false\ntrain: {epochs: 2, batch_size: 4, lr: 0.01, amp: false, "
        "channels_last: false, warmup_epochs: 0, best_metric: val_acc, best_mode: max}\n"
        "infer: {batch_size: 3}\n"
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_ROWS, 2))
    data = root / "data"
    data.mkdir()
    pd.DataFrame(
        {"case": [f"c{i:02d}" for i in range(N_ROWS)], "x0": x[:, 0], "x1": x[:, 1]}
    ).assign(y=(x[:, 0] + 0.5 * x[:, 1] > 0) * 1).to_csv(data / "train.csv", index=False)
    ov = [f"data_dir={data}", f"output_dir={root / 'output'}"]
    fold_main(["--CFG", str(conf / "base.yaml"), *ov])
    yield str(conf / "mlp.yaml"), ov
    for registry, name, _ in ENTRIES:
        registry.remove(name)


def torchrun(stage: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc tests/test_ddp.py --CFG stage args`` (gloo)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", __file__, "--CFG", stage, *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def run_dir(stage: str, ov: list[str], exp: str, fold: int) -> Path:
    cfg = load_config(stage, [*ov, f"exp_name={exp}"])
    return Path(cfg.output_dir) / "ddp_toy" / exp / f"fold{fold}"


def validate_alone(stage: str, ov: list[str], run: Path, fold: int) -> dict:
    """The validation metrics of ``run``'s last.pth, computed by one process from scratch."""
    cfg = load_config(stage, ov)
    model = DdpMLP()
    model.load_state_dict(load_checkpoint(run / "last.pth")["model"])
    val = train.split_table(cfg, fold)[1]
    ds = DdpPoints(val, cfg, False)
    outs, _ = predict(cfg, model, make_loader(cfg, ds, False), torch.device("cpu"))
    return DdpPoints.evaluate(outs, ds.table)


class RowIndex(StageDataset):
    """Each row's own index ``i``: which rows a batch holds."""

    def __getitem__(self, index: int) -> dict:
        return {"i": torch.tensor(index)}


@pytest.mark.parametrize("n, batch, world", [(21, 4, 2), (40, 8, 4), (7, 6, 3), (10, 4, 2)])
def test_rank_batches_together_are_the_single_process_batch(n, batch, world):
    """Per epoch and step, the ranks' batches joined = the one-process batch; validation blocks
    joined in rank order = the table order, each row once."""
    cfg = {
        "train": {"batch_size": batch},
        "infer": {"batch_size": 3},
        "num_workers": 0,
        "seed": 7,
    }
    ds = RowIndex(pd.DataFrame({"i": range(n)}), cfg, True)
    ranks = [DistInfo(r, world) for r in range(world)]
    for epoch in (0, 1):
        alone = [b["i"].tolist() for b in make_loader(cfg, ds, True, epoch)]
        shards = [
            [
                b["i"].tolist()
                for b in make_loader(
                    cfg, ds, True, epoch, train_sampler(n, 7, r), per_rank_batch(batch, r)
                )
            ]
            for r in ranks
        ]
        assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(alone)
        for k, single in enumerate(alone):
            assert sorted(sum((s[k] for s in shards), [])) == sorted(single)
    blocks = [list(ShardSampler(n, r)) for r in ranks]
    assert sum(blocks, []) == list(range(n))


def test_two_processes_equal_one(toy):
    """Same global batch: the same weights (to float rounding) and the same validation metrics."""
    stage, ov = toy
    train.main(["--CFG", stage, "--fold", "0", *ov, "exp_name=single"])
    done = torchrun(stage, "--fold", "0", *ov, "exp_name=ddp")
    single, ddp = run_dir(stage, ov, "single", 0), run_dir(stage, ov, "ddp", 0)
    a, b = load_checkpoint(single / "last.pth"), load_checkpoint(ddp / "last.pth")
    assert set(a["model"]) == set(b["model"])  # unwrapped: no "module." prefix
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    ma, mb = (pd.read_csv(r / "metrics.csv").drop(columns="seconds") for r in (single, ddp))
    pd.testing.assert_frame_equal(ma, mb, rtol=1e-5, atol=1e-6)
    # The gathered validation equals a single-process evaluation of the DDP weights.
    alone = validate_alone(stage, ov, ddp, 0)
    assert mb["val_dot"].iloc[-1] == pytest.approx(alone["dot"], rel=1e-6)
    assert mb["val_acc"].iloc[-1] == alone["acc"]
    # Only rank 0 logged and wrote: every epoch line once, in the console and in train.log.
    assert done.stderr.count("fold 0 epoch 2/2") == 1, done.stderr[-2000:]
    assert "global batch 4 (2 processes x 2)" in done.stderr
    log = (ddp / "train.log").read_text()
    assert log.count("fold 0 epoch 1/2") == 1 and log.count("fold 0 epoch 2/2") == 1
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())


def test_torchrun_resumes_and_skips_a_finished_fold(toy):
    stage, ov = toy
    args = ["--fold", "1", *ov, "exp_name=resumed"]
    torchrun(stage, *args, "train.stop_after=1")
    run = run_dir(stage, ov, "resumed", 1)
    assert load_checkpoint(run / "last.pth")["epoch"] == 0
    done = torchrun(stage, *args)
    assert "resuming from" in done.stderr and load_checkpoint(run / "last.pth")["epoch"] == 1
    train.main(["--CFG", stage, "--fold", "1", *ov, "exp_name=straight"])
    a = load_checkpoint(run_dir(stage, ov, "straight", 1) / "last.pth")["model"]
    b = load_checkpoint(run / "last.pth")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    before = (run / "last.pth").stat().st_mtime_ns
    done = torchrun(stage, *args)
    assert done.stderr.count("already trained") == 1  # rank 0's line; rank 1 skipped silently
    assert (run / "last.pth").stat().st_mtime_ns == before


def test_global_batch_must_split_evenly():
    assert per_rank_batch(32, DistInfo(0, 4)) == 8 and per_rank_batch(5, DistInfo()) == 5
    with pytest.raises(InputError, match="not divisible by the 2 processes"):
        per_rank_batch(5, DistInfo(1, 2))


# ---- opt-in trackers ----------------------------------------------------------------------------
def test_no_tracker_by_default(toy, tmp_path):
    stage, ov = toy
    tracker = make_tracker(load_config(stage, ov), tmp_path, 0)
    assert type(tracker) is Tracker


def test_missing_tracker_package_is_a_one_line_error(toy, tmp_path, monkeypatch):
    stage, ov = toy
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(InputError, match="needs the 'wandb' package"):
        make_tracker(load_config(stage, [*ov, "tracker.name=wandb"]), tmp_path, 0)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(InputError, match="needs the 'tensorboard' package"):
        make_tracker(load_config(stage, [*ov, "tracker.name=tensorboard"]), tmp_path, 0)


def test_tensorboard_gets_the_metrics_rows(toy, monkeypatch):
    """A stand-in SummaryWriter (the tensorboard package is not a dependency) sees metrics.csv."""
    stage, ov = toy
    scalars: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    train.main(["--CFG", stage, "--fold", "2", *ov, "exp_name=tb", "tracker.name=tensorboard"])
    metrics = pd.read_csv(run_dir(stage, ov, "tb", 2) / "metrics.csv")
    logged = pd.DataFrame(scalars, columns=["tag", "value", "step"])
    wide = logged.pivot(index="step", columns="tag", values="value")
    assert sorted(wide.columns) == sorted(set(metrics.columns) - {"epoch"})
    np.testing.assert_allclose(wide.loc[metrics["epoch"], "val_acc"], metrics["val_acc"])


def test_wandb_is_offline_without_entity(toy, monkeypatch):
    stage, ov = toy
    calls: dict = {}

    class Run:
        def log(self, values, step):
            calls.setdefault("logged", []).append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    train.main(["--CFG", stage, "--fold", "2", *ov, "exp_name=wb", "tracker.name=wandb"])
    kw = calls["init"]
    assert kw["mode"] == "offline" and kw["project"] == "wb" and "entity" not in kw
    assert kw["name"] == "wb-fold2" and calls["finished"]
    assert [step for step, _ in calls["logged"]] == [1, 2]
    # Switching the tracker is not a config change: the finished fold is skipped, not refused.
    train.main(["--CFG", stage, "--fold", "2", *ov, "exp_name=wb"])


if __name__ == "__main__":  # torchrun's entry: the toy components, then train.py's main
    register()
    train.main(sys.argv[1:])
