"""nnU-Net v2 stages: nnU-Net's environment and its stock CLI commands, built from the config.

nnU-Net is used as published (``nnunetv2`` from PyPI, never forked or patched): this module only
sets the environment in one place (``nnunet.*`` and ``output_dir`` of the config) and spells the
stock commands. Our trainers live in ``models/nnunet_trainers/`` and are found by nnU-Net's own
lookup through ``nnUNet_extTrainer``. Usage, from the repository root::

    python -m utils.nnunet --CFG config/<pipeline>/base.yaml env [key=value ...]      # export lines
    eval "$(python -m utils.nnunet --CFG config/<pipeline>/base.yaml env)"           # then any nnUNetv2_* by hand
    python -m utils.nnunet --CFG ... plan [key=value ...]   # nnUNetv2_plan_and_preprocess (skipped when planned)
    python -m utils.nnunet --CFG ... train [all|FOLD ...] [key=value ...]  # nnUNetv2_train per fold (finished skipped)
    python -m utils.nnunet --CFG ... predict IN_DIR OUT_DIR [--probabilities] [key=value ...]  # fold ensemble

Overrides follow the sub-command.

Each command is printed before it runs, so a user can copy it. A failing nnU-Net command ends with
one ``error:`` line naming it (nnU-Net's own output above says why).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils import cli, paths
from utils.config import ConfigError, load_config
from utils.errors import CommandError, InputError

TRAINER_DIR = Path(__file__).resolve().parents[1] / "models" / "nnunet_trainers"
# nnU-Net constructs trainers with a fixed signature (plans, configuration, fold, dataset_json,
# device), so options of our trainers travel as JSON in this variable (``nnunet.trainer_options``).
TRAINER_OPTIONS_ENV = "NNUNET_TRAINER_OPTIONS"
Cfg = Mapping[str, Any]


def device(cfg: Cfg) -> tuple[str, str | None]:
    """(``cpu`` | ``cuda``, the CUDA device index to expose or None) from the config's ``device``."""
    name = str(cfg["device"])
    if name == "auto":
        import torch

        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:<n> for nnU-Net, got {name!r}")
    return kind, index or None


def environment(cfg: Cfg, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus every variable nnU-Net reads.

    The roots are absolute (nnU-Net resolves them from its own working directory); the Python
    scripts folder of this interpreter comes first on PATH so ``nnUNetv2_*`` are the installed ones.
    """
    nn = cfg["nnunet"]
    env = dict(os.environ if base is None else base)
    for kind in paths.NNUNET_ROOTS:
        env[f"nnUNet_{kind}"] = str(paths.nnunet_root(cfg, kind).resolve())
    env["nnUNet_extTrainer"] = str(TRAINER_DIR)
    env["nnUNet_def_n_proc"] = str(nn["n_proc"])
    env["nnUNet_n_proc_DA"] = str(nn["n_proc_da"])
    env["nnUNet_compile"] = "true" if nn["compile"] else "false"
    env[TRAINER_OPTIONS_ENV] = json.dumps(nn["trainer_options"].to_dict())
    env["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), env.get("PATH", "")])
    _, index = device(cfg)
    if index is not None:
        env["CUDA_VISIBLE_DEVICES"] = index
    return env


def folds(cfg: Cfg) -> list[int]:
    """The folds to train and ensemble: ``nnunet.folds`` or every fold of the fold file."""
    chosen = cfg["nnunet"]["folds"]
    return [int(f) for f in chosen] if chosen is not None else list(range(int(cfg["n_folds"])))


def _model_args(cfg: Cfg) -> list[str]:
    nn = cfg["nnunet"]
    return ["-tr", nn["trainer"], "-p", nn["plans"], "-device", device(cfg)[0]]


def plan_command(cfg: Cfg, verify: bool = True) -> list[str]:
    """``nnUNetv2_plan_and_preprocess`` for this dataset and configuration."""
    nn = cfg["nnunet"]
    n = str(nn["n_proc"])
    cmd = ["nnUNetv2_plan_and_preprocess", "-d", str(nn["dataset_id"])]
    cmd += ["-c", nn["configuration"], "-np", n, "-npfp", n, "--no_pbar"]
    if nn["planner"]:
        cmd += ["-pl", nn["planner"]]
    return cmd + (["--verify_dataset_integrity"] if verify else [])


def train_command(cfg: Cfg, fold: int | str, resume: bool = False) -> list[str]:
    """``nnUNetv2_train`` of one fold (``resume``: continue from checkpoint_latest.pth)."""
    nn = cfg["nnunet"]
    cmd = ["nnUNetv2_train", str(nn["dataset_id"]), nn["configuration"], str(fold)]
    cmd += _model_args(cfg)
    if int(nn["num_gpus"]) > 1:
        cmd += ["-num_gpus", str(nn["num_gpus"])]
    if nn["val_probabilities"]:
        cmd.append("--npz")
    return cmd + (["--c"] if resume else [])


def predict_command(
    cfg: Cfg,
    in_dir: str | Path,
    out_dir: str | Path,
    use_folds: Sequence[int] | None = None,
    probabilities: bool = False,
) -> list[str]:
    """``nnUNetv2_predict`` of the fold ensemble on every ``*_0000.*`` image of ``in_dir``."""
    nn = cfg["nnunet"]
    n = str(nn["n_proc"])
    cmd = ["nnUNetv2_predict", "-i", str(in_dir), "-o", str(out_dir)]
    cmd += ["-d", str(nn["dataset_id"]), "-c", nn["configuration"], *_model_args(cfg)]
    cmd += ["-f", *(str(f) for f in (use_folds if use_folds is not None else folds(cfg)))]
    cmd += ["-npp", n, "-nps", n, "--continue_prediction", "--disable_progress_bar"]
    if nn["disable_tta"]:
        cmd.append("--disable_tta")
    return cmd + (["--save_probabilities"] if probabilities else [])


def run(cmd: Sequence[str], env: Mapping[str, str]) -> None:
    """Print and run one nnU-Net command; raise CommandError naming it when it fails."""
    print("+ " + shlex.join(cmd), flush=True)
    code = subprocess.run(list(cmd), env=dict(env), check=False).returncode
    if code != 0:
        raise CommandError(f"{cmd[0]} exited with code {code}: {shlex.join(cmd)}")


def fold_dir(cfg: Cfg, fold: int) -> Path:
    return paths.nnunet_model_dir(cfg) / f"fold_{fold}"


def is_planned(cfg: Cfg) -> bool:
    """True when the plans and the configuration's preprocessed data exist."""
    pre = paths.nnunet_root(cfg, "preprocessed") / paths.nnunet_dataset(cfg)
    plans = pre / f"{cfg['nnunet']['plans']}.json"
    return plans.is_file() and any(pre.glob(f"{cfg['nnunet']['plans']}_*"))


def plan(cfg: Cfg, verify: bool = True) -> None:
    """Plan and preprocess once (a planned dataset is kept: delete the folder to re-plan)."""
    raw = paths.nnunet_raw_dataset(cfg)
    if not (raw / "dataset.json").is_file():
        raise InputError(f"{raw / 'dataset.json'} not found: convert the data set first")
    if is_planned(cfg):
        print(f"planned already: {paths.nnunet_root(cfg, 'preprocessed') / raw.name}")
        return
    env = environment(cfg)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0 (2.8.1).
    env["nnUNet_n_proc_DA"] = str(max(1, int(cfg["nnunet"]["n_proc_da"])))
    run(plan_command(cfg, verify), env)


def train(cfg: Cfg, which: Sequence[int]) -> None:
    """Train each fold in ``which``: finished folds are skipped, interrupted ones continued.

    With ``nnunet.parallel_folds`` > 1 (CUDA), that many folds run at once, fold ``i`` on GPU
    ``i mod parallel_folds`` (nnU-Net's recommended multi-GPU recipe).
    """
    todo = [f for f in which if not (fold_dir(cfg, f) / "checkpoint_final.pth").is_file()]
    for f in sorted(set(which) - set(todo)):
        print(f"fold {f}: trained already ({fold_dir(cfg, f) / 'checkpoint_final.pth'})")
    width = int(cfg["nnunet"]["parallel_folds"])
    if width > 1 and device(cfg)[0] != "cuda":
        raise ConfigError("nnunet.parallel_folds > 1 needs device cuda (one fold per GPU)")
    for start in range(0, len(todo), max(width, 1)):
        batch = todo[start : start + max(width, 1)]
        procs = []
        for slot, f in enumerate(batch):
            resume = (fold_dir(cfg, f) / "checkpoint_latest.pth").is_file()
            cmd = train_command(cfg, f, resume)
            env = environment(cfg)
            if width > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(slot)
            print("+ " + shlex.join(cmd), flush=True)
            procs.append((cmd, subprocess.Popen(cmd, env=env)))
        for cmd, proc in procs:
            if proc.wait() != 0:
                raise CommandError(
                    f"{cmd[0]} exited with code {proc.returncode}: {shlex.join(cmd)}"
                )


def export_lines(cfg: Cfg) -> list[str]:
    """``export`` lines for a shell: nnU-Net's variables plus the stage's names for scripts."""
    env = environment(cfg, base={"PATH": os.environ.get("PATH", "")})
    nn = cfg["nnunet"]
    env.update(
        NNUNET_DATASET_ID=str(nn["dataset_id"]),
        NNUNET_CONFIGURATION=nn["configuration"],
        NNUNET_TRAINER=nn["trainer"],
        NNUNET_PLANS=nn["plans"],
        NNUNET_DEVICE=device(cfg)[0],
        NNUNET_FOLDS=" ".join(map(str, folds(cfg))),
        NNUNET_RAW_DATASET=str(paths.nnunet_raw_dataset(cfg).resolve()),
        NNUNET_SPLITS=str(paths.nnunet_splits(cfg).resolve()),
    )
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def _split_args(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(positional arguments, key=value overrides)."""
    return [a for a in items if "=" not in a], [a for a in items if "=" in a]


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg="config/<pipeline>/base.yaml", overrides=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("env", "plan", "train", "predict"):
        p = sub.add_parser(name)
        p.add_argument("overrides", nargs="*", help="key=value config overrides (and arguments)")
    sub.choices["plan"].add_argument("--no-verify", action="store_true")
    sub.choices["predict"].add_argument("--probabilities", action="store_true")
    args = parser.parse_args(argv)
    positional, overrides = _split_args(args.overrides)
    with cli.running():
        cfg = load_config(args.CFG, overrides)
        if args.command == "env":
            print("\n".join(export_lines(cfg)))
        elif args.command == "plan":
            plan(cfg, verify=not args.no_verify)
        elif args.command == "train":
            chosen = positional or ["all"]
            if chosen != ["all"] and not all(f.isdigit() for f in chosen):
                raise ConfigError(f"train takes fold numbers or 'all', got {' '.join(chosen)}")
            train(cfg, folds(cfg) if chosen == ["all"] else [int(f) for f in chosen])
        else:
            if len(positional) != 2:
                raise ConfigError("predict needs IN_DIR and OUT_DIR")
            src = Path(positional[0])
            if not src.is_dir():
                raise InputError(f"{src}: no such folder of images to predict")
            run(
                predict_command(cfg, src, positional[1], probabilities=args.probabilities),
                environment(cfg),
            )


if __name__ == "__main__":
    main()
