"""nnU-Net plumbing (utils/nnunet.py) and our trainer folder, checked with nnU-Net's own lookup."""

from __future__ import annotations

import importlib
import json
import pkgutil
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from utils import nnunet, paths
from utils.config import load_config
from utils.io import write_text

ROOT = nnunet.TRAINER_DIR.parents[1]
TRAINER_MODULES = sorted(m.name for m in pkgutil.iter_modules([str(nnunet.TRAINER_DIR)]))


def _cfg(tmp_path, *overrides: str):
    """An nnU-Net stage config (the nnunet.* keys are generic; any pipeline base carries them)."""
    base = [
        "nnunet.dataset_id=990",
        "nnunet.dataset_name=Toy",
        f"output_dir={tmp_path / 'out'}",
        "device=cpu",
    ]
    return load_config(ROOT / "config" / "hipmri" / "base.yaml", [*base, *overrides])


def test_environment_sets_every_root_and_the_trainer_folder(tmp_path):
    cfg = _cfg(tmp_path, "nnunet.n_proc=1", "nnunet.n_proc_da=0")
    env = nnunet.environment(cfg, base={"PATH": "/usr/bin"})
    out = (tmp_path / "out" / "hipmri" / "nnunet").resolve()
    assert env["nnUNet_raw"] == str(out / "raw")
    assert env["nnUNet_preprocessed"] == str(out / "preprocessed")
    assert env["nnUNet_results"] == str(out / "results")
    assert env["nnUNet_extTrainer"] == str(nnunet.TRAINER_DIR)
    assert (env["nnUNet_def_n_proc"], env["nnUNet_n_proc_DA"]) == ("1", "0")
    assert env["nnUNet_compile"] == "false"
    assert env["PATH"].endswith(":/usr/bin")
    assert "CUDA_VISIBLE_DEVICES" not in env
    assert (
        nnunet.environment(_cfg(tmp_path, "device=cuda:1"), base={})["CUDA_VISIBLE_DEVICES"] == "1"
    )
    assert paths.nnunet_raw_dataset(cfg).name == "Dataset990_Toy"


def test_commands_follow_the_config(tmp_path):
    cfg = _cfg(
        tmp_path,
        "nnunet.trainer=nnUNetTrainerSmoke",
        "nnunet.num_gpus=2",
        "nnunet.val_probabilities=true",
        "nnunet.disable_tta=true",
        "nnunet.planner=nnUNetPlannerResEncM",
        "n_folds=3",
    )
    train = nnunet.train_command(cfg, 1, resume=True)
    assert train[:4] == ["nnUNetv2_train", "990", "2d", "1"]
    assert shlex.join(train).endswith(
        "-tr nnUNetTrainerSmoke -p nnUNetPlans -device cpu -num_gpus 2 --npz --c"
    )
    pred = nnunet.predict_command(cfg, "in", "out")
    assert pred[pred.index("-f") + 1 : pred.index("-f") + 4] == ["0", "1", "2"]
    assert "--disable_tta" in pred and "--save_probabilities" not in pred
    assert nnunet.plan_command(cfg)[-3:-1] == ["-pl", "nnUNetPlannerResEncM"]
    assert nnunet.folds(_cfg(tmp_path, "nnunet.folds=[2]")) == [2]


def test_parallel_folds_need_cuda(tmp_path):
    with pytest.raises(SystemExit) as exc:
        nnunet.main(
            ["--CFG", str(ROOT / "config" / "hipmri" / "base.yaml"), "train", "all",
             "nnunet.dataset_id=990", "nnunet.dataset_name=Toy", "nnunet.parallel_folds=2",
             "device=cpu", f"output_dir={tmp_path}"]
        )  # fmt: skip
    assert str(exc.value) == "error: nnunet.parallel_folds > 1 needs device cuda (one fold per GPU)"


def test_export_lines_are_shell_code(tmp_path):
    cfg = _cfg(tmp_path, f"output_dir={tmp_path / 'a dir'}")
    script = "\n".join(nnunet.export_lines(cfg)) + '\nprintf "%s|%s" "$nnUNet_raw" "$NNUNET_FOLDS"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    raw, folds = out.stdout.split("|")
    assert raw == str(paths.nnunet_root(cfg, "raw").resolve()) and folds == "0 1 2 3 4"


@pytest.mark.parametrize("module", TRAINER_MODULES)
def test_trainer_module_imports_and_is_found_by_nnunet(module, monkeypatch):
    """Every module imports cleanly and each trainer it defines is what nnU-Net's lookup returns."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    monkeypatch.setenv("nnUNet_extTrainer", str(nnunet.TRAINER_DIR))
    monkeypatch.syspath_prepend(str(nnunet.TRAINER_DIR))
    mod = importlib.import_module(module)
    trainers = [
        name
        for name, obj in vars(mod).items()
        if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj.__module__ == module
    ]
    assert trainers, f"{module} defines no trainer"
    for name in trainers:
        found = recursive_find_trainer_class_by_name(name)
        assert found.__name__ == name and found.__module__ == module
    sys.modules.pop(module, None)


def _toy_dataset(raw) -> None:
    """10 grayscale 64x64 PNGs with one bright disc each, labelled 1 (nnU-Net's 2D PNG format)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for kind in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / kind).mkdir(parents=True)
    for i in range(12):
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(6, 12)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        img = (40 + 150 * mask + rng.normal(0, 15, mask.shape)).clip(0, 255).astype(np.uint8)
        kind = "imagesTr" if i < 10 else "imagesTs"
        Image.fromarray(img, "L").save(raw / kind / f"toy_{i:03d}_0000.png")
        if i < 10:
            Image.fromarray(mask, "L").save(raw / "labelsTr" / f"toy_{i:03d}.png")
    dataset = {
        "channel_names": {"0": "XR"},
        "labels": {"background": 0, "disc": 1},
        "numTraining": 10,
        "file_ending": ".png",
    }
    write_text(json.dumps(dataset), raw / "dataset.json")


@pytest.mark.slow
def test_stock_cli_plans_trains_and_predicts_with_our_trainer(tmp_path):
    """plan -> train (our smoke trainer, found via nnUNet_extTrainer) -> predict, all on CPU."""
    overrides = [
        "nnunet.dataset_id=990",
        "nnunet.dataset_name=Toy",
        "nnunet.trainer=nnUNetTrainerSmoke",
        "nnunet.folds=[0]",
        "nnunet.n_proc=1",
        "nnunet.n_proc_da=0",
        "nnunet.disable_tta=true",
        f"output_dir={tmp_path / 'out'}",
        "device=cpu",
    ]
    cfg = load_config(ROOT / "config" / "hipmri" / "base.yaml", overrides)
    raw = paths.nnunet_raw_dataset(cfg)
    _toy_dataset(raw)
    cli = [sys.executable, "-m", "utils.nnunet", "--CFG", "config/hipmri/base.yaml"]
    steps = (
        ["plan"],
        ["train"],
        ["train"],
        ["predict", str(raw / "imagesTs"), str(tmp_path / "pred")],
    )
    outs = []
    for step in steps:
        res = subprocess.run([*cli, *step, *overrides], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        outs.append(res.stdout)
    assert "Using trainer 'nnUNetTrainerSmoke' from: " + str(nnunet.TRAINER_DIR) in outs[1]
    assert "fold 0: trained already" in outs[2] and "nnUNetv2_train" not in outs[2]
    assert (nnunet.fold_dir(cfg, 0) / "checkpoint_final.pth").is_file()
    preds = sorted(p.name for p in (tmp_path / "pred").glob("*.png"))
    assert preds == ["toy_010.png", "toy_011.png"]
    mask = np.asarray(Image.open(tmp_path / "pred" / "toy_010.png"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 1}
