"""The generic machinery on a stage that exists only in this test: no change to train.py or inference.py.

A toy pipeline (its own config folder, fold spec, dataset, model and loss, all registered here)
is trained with train.py and predicted by inference.py: OOF rows stream from the fold model that
did not train on them, test rows from the fold mean, case ids that look numeric stay strings.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import inference
import train
from utils import experiments, paths
from utils.config import load_config
from utils.datasets import StageDataset
from utils.engine import stream_predictions
from utils.fold_split import main as fold_main
from utils.folds import load_folds
from utils.predict import run_config
from utils.registry import DATASETS, LOSSES, MODELS, PIPELINES, FoldInputs, Pipeline

TOY = Pipeline(
    name="toy",
    id_col="case",
    fold_inputs=lambda cfg: FoldInputs(pd.read_csv(f"{cfg.data_dir}/train.csv", dtype=str)),
    preprocess=lambda argv: None,
)


class ToyPoints(StageDataset):
    """One 2-D point per row; ``case`` (str) rides along in the batch as a non-tensor field."""

    key_columns = ("case",)

    def __init__(self, table, cfg, train):
        super().__init__(table, cfg, train)

    @staticmethod
    def load_table(cfg) -> pd.DataFrame:
        return pd.read_csv(f"{cfg.data_dir}/train.csv", dtype={"case": str})

    @staticmethod
    def test_table(cfg) -> pd.DataFrame:
        return pd.read_csv(f"{cfg.data_dir}/test.csv", dtype={"case": str})

    def __getitem__(self, i: int) -> dict:
        row = self.table.iloc[i]
        sample = {"x": torch.tensor([row.x0, row.x1], dtype=torch.float32), "case": row.case}
        if "y" in row:
            sample["y"] = torch.tensor(float(row.y))
        return sample

    @staticmethod
    def evaluate(out, table) -> dict:
        return {"mean_score": float(out["score"].mean())}


class ToyLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, batch):
        logits = self.fc(batch["x"])
        return {"score": logits[:, 1] - logits[:, 0], "probs": logits.softmax(dim=1)}


class ToyCE(nn.Module):
    def forward(self, out, batch):
        return nn.functional.binary_cross_entropy_with_logits(out["score"], batch["y"])


@pytest.fixture(scope="module")
def registered():
    """The toy components in the registries for this module only."""
    entries = [
        (PIPELINES, "toy", TOY),
        (DATASETS, "toy_points", ToyPoints),
        (MODELS, "toy_linear", ToyLinear),
        (LOSSES, "toy_ce", ToyCE),
    ]
    for registry, name, obj in entries:
        registry.register(name)(obj)
    yield
    for registry, name, _ in entries:
        registry.remove(name)


@pytest.fixture(scope="module")
def toy(registered, tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    (root / "config" / "toy").mkdir(parents=True)
    (root / "config" / "toy" / "base.yaml").write_text("n_folds: 3   # three folds\n")
    (root / "config" / "toy" / "linear.yaml").write_text(
        "dataset: {name: toy_points}\nmodel: {name: toy_linear}\nloss: {name: toy_ce}\n"
        "num_workers: 0\nprogress: false\ntrain: {epochs: 2, batch_size: 4, amp: false, "
        "channels_last: false}\ninfer: {batch_size: 5}\n"
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 2))
    cases = [f"{i:03d}" for i in range(24)]  # numeric-looking ids: 000 .. 023
    data = root / "data"
    data.mkdir()
    pd.DataFrame({"case": cases, "x0": x[:, 0], "x1": x[:, 1], "y": (x[:, 0] > 0) * 1}).to_csv(
        data / "train.csv", index=False
    )
    pd.DataFrame({"case": ["1e3", "0042"], "x0": [0.5, -1.0], "x1": [0.0, 2.0]}).to_csv(
        data / "test.csv", index=False
    )
    ov = [f"data_dir={data}", f"output_dir={root / 'output'}"]
    fold_main(["--CFG", str(root / "config" / "toy" / "base.yaml"), *ov])
    stage = str(root / "config" / "toy" / "linear.yaml")
    train.main(["--CFG", stage, *ov])
    return root, stage, ov


def test_oof_predictions_of_a_stage_registered_only_here(toy):
    root, stage, ov = toy
    inference.main(["--CFG", stage, "--split", "oof", *ov])
    preds = pd.read_csv(root / "output" / "toy" / "linear" / "preds_oof.csv", dtype={"case": str})
    folds = load_folds(root / "output" / "toy" / "folds.csv", "case")
    assert list(preds.columns) == ["case", "score", "probs_0", "probs_1", "fold"]
    assert sorted(preds["case"]) == [f"{i:03d}" for i in range(24)]
    merged = preds.merge(folds, on="case", suffixes=("", "_file"))
    assert (merged["fold"] == merged["fold_file"]).all() and len(merged) == 24
    np.testing.assert_allclose(preds[["probs_0", "probs_1"]].sum(axis=1), 1.0, rtol=1e-6)


def test_a_run_saved_before_a_runtime_key_existed_still_predicts(toy):
    """A run trained before a runtime key was added (its saved config lacks the key) still
    predicts: the caller's value is added (it changes nothing the run computes)."""
    root, stage, ov = toy
    cfg = load_config(stage, ov)
    saved = {}
    for fold in range(3):
        path = paths.checkpoint_path(cfg, fold, "best")
        saved[path] = path.read_bytes()
        state = torch.load(path, weights_only=False)
        del state["config"]["train"]["grad_checkpointing"]
        torch.save(state, path)
    try:
        run = run_config(cfg)
        assert run.train.grad_checkpointing is False
        inference.main(["--CFG", stage, "--split", "test", *ov])
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


def test_test_predictions_are_the_fold_mean(toy):
    root, stage, ov = toy
    out = root / "toy_test.csv"
    inference.main(["--CFG", stage, "--split", "test", "--out", str(out), *ov])
    preds = pd.read_csv(out, dtype={"case": str})
    assert preds["case"].tolist() == ["1e3", "0042"]
    # The mean of the three fold models, computed by hand from their checkpoints.
    scores = []
    for k in range(3):
        state = torch.load(root / "output" / "toy" / "linear" / f"fold{k}" / "best.pth")
        model = ToyLinear()
        model.load_state_dict(state["model"])
        with torch.no_grad():
            scores.append(model({"x": torch.tensor([[0.5, 0.0], [-1.0, 2.0]])})["score"].numpy())
    np.testing.assert_allclose(preds["score"], np.mean(scores, axis=0), rtol=1e-5, atol=1e-6)


def test_stream_keeps_non_tensor_fields_and_yields_per_batch(toy):
    root, stage, ov = toy
    cfg = load_config(stage, ov)
    table = ToyPoints.load_table(cfg)
    loader = torch.utils.data.DataLoader(ToyPoints(table, cfg, False), batch_size=5)
    batches = list(stream_predictions(cfg, [ToyLinear(), ToyLinear()], loader, torch.device("cpu")))
    assert len(batches) == 5 and [len(b["case"]) for b, _ in batches] == [5, 5, 5, 5, 4]
    assert batches[0][0]["case"][:2] == ["000", "001"] and batches[0][1]["score"].shape == (5,)


def test_oof_without_its_fold_file_is_a_one_line_error(toy, tmp_path):
    """A user who deleted (or never copied) folds.csv gets one line, and no OOF file."""
    root, stage, ov = toy

    moved = shutil.copytree(root / "output", tmp_path / "output")
    (moved / "toy" / "folds.csv").unlink()
    (moved / "toy" / "linear" / "preds_oof.csv").unlink(missing_ok=True)
    with pytest.raises(SystemExit) as exc:
        inference.main(["--CFG", stage, "--split", "oof", ov[0], f"output_dir={moved}"])
    assert str(exc.value.code) == (
        f"error: {moved / 'toy' / 'folds.csv'} not found; run python -m utils.fold_split first"
    )
    assert not (moved / "toy" / "linear" / "preds_oof.csv").exists()


# ---- the experiment log -------------------------------------------------------------------------
def read_log(root) -> pd.DataFrame:
    return pd.read_csv(
        root / "output" / "toy" / "experiments.csv", dtype=str, keep_default_na=False
    )


def test_every_finished_fold_adds_one_row_and_a_skipped_rerun_none(toy, capsys):
    root, stage, ov = toy
    rows = read_log(root)
    trained = rows[rows["exp_name"] == "linear"]
    assert list(rows.columns) == list(experiments.COLUMNS)
    assert trained["fold"].tolist() == ["0", "1", "2"] and (trained["stage"] == "linear").all()
    assert (trained["metric"] == "val_loss").all() and (trained["mode"] == "min").all()
    assert trained["overrides"].iloc[0] == " ".join(ov) and trained["device"].iloc[0] == "cpu"
    assert trained["config_hash"].nunique() == 1 and trained["commit"].iloc[0] != "unknown"
    for fold in range(3):  # the best value is the best epoch of the fold's metrics.csv
        history = pd.read_csv(root / "output" / "toy" / "linear" / f"fold{fold}" / "metrics.csv")
        row = trained[trained["fold"] == str(fold)].iloc[0]
        assert float(row["best"]) == pytest.approx(history["val_loss"].min())
        assert float(row["seconds"]) == pytest.approx(history["seconds"].sum(), abs=0.1)
    train.main(["--CFG", stage, *ov])  # every fold finished: skipped, no row
    assert len(read_log(root)) == len(rows)
    experiments.main(["--pipeline", "toy", "--sort", "val_loss", f"output_dir={root / 'output'}"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["time", "pipeline", "stage"] and len(printed) >= 4
    with pytest.raises(SystemExit, match=r"^error: --sort nope: not a metric \(val_loss\)"):
        experiments.main(["--sort", "nope", f"output_dir={root / 'output'}"])


def test_a_stopped_fold_adds_its_row_when_a_later_run_finishes_it(toy):
    root, stage, ov = toy
    before = len(read_log(root))
    part = [*ov, "exp_name=partial", "train.stop_after=1"]
    train.main(["--CFG", stage, "--fold", "0", *part])
    assert len(read_log(root)) == before  # 1 of 2 epochs: not finished
    train.main(["--CFG", stage, "--fold", "0", *ov, "exp_name=partial"])
    rows = read_log(root)
    assert len(rows) == before + 1 and rows.iloc[-1]["exp_name"] == "partial"
    linear = rows[rows["exp_name"] == "linear"]["config_hash"].iloc[0]
    assert rows.iloc[-1]["config_hash"] == linear  # the same recipe under another name
    history = pd.read_csv(root / "output" / "toy" / "partial" / "fold0" / "metrics.csv")
    assert len(history) == 2
    assert float(rows.iloc[-1]["seconds"]) == pytest.approx(history["seconds"].sum(), abs=0.1)
