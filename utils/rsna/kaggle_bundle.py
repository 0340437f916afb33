"""Build the folders the Kaggle submission uploads: ``make kaggle-bundle`` (docs/kaggle.md).

Usage::

    python -m utils.rsna.kaggle_bundle {code,wheels,kernel,all} [--out output/kaggle]
        [--python 3.11] [--owner NAME] [key=value ...]

- ``code``: ``<out>/code/`` = the inference code (the git-tracked files of ``CODE_PATHS``), the
  trained runs of every stage of ``CONFIG`` (``runs/rsna/<exp>/fold<k>/{best.pth,config.yaml}``,
  the ``infer.checkpoint`` kind only, weights and config without the optimizer state; for a stage
  that is an ensemble, its ``ensemble.json`` and the runs of every member), the CV report's
  products the test-time chain reads (``utils.rsna.submit.chain_products``: train priors,
  calibration fit, plausibility reference), ``bundle.json`` (config, profile, overrides, runs
  folder, commit) and ``dataset-metadata.json``. ``key=value`` overrides select the runs (e.g.
  ``output_dir=...``, ``profile=demo``, ``stages.fracture=stage2_ensemble``); those other than
  ``MANIFEST_SKIPS`` go to ``bundle.json`` and the notebook applies them.
- ``wheels``: ``<out>/wheels/`` = ``requirements-kaggle.txt`` (every distribution the inference
  code imports, with its dependencies, pinned to this environment's versions, except what
  Kaggle's GPU image provides: ``KAGGLE_PROVIDED``) and one wheel per line for CPython
  ``--python`` on manylinux x86_64 (``pip download --no-deps --only-binary=:all:``; needs the
  package index), plus ``dataset-metadata.json``.
- ``kernel``: ``<out>/kernel/`` = the notebook and ``kernel-metadata.json`` with ``--owner``.

Dataset and kernel ids come from ``kaggle/kernel-metadata.json`` (owner replaced by ``--owner``).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

from utils import cli, ensemble, paths
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import load_config
from utils.errors import InputError
from utils.io import write_text
from utils.predict import trained_folds
from utils.rsna import layout
from utils.rsna.submit import chain_products

log = logging.getLogger("kaggle_bundle")
ROOT = Path(__file__).resolve().parents[2]
KAGGLE_DIR = ROOT / "kaggle"
NOTEBOOK = "rsna_submission.ipynb"
CONFIG = "config/rsna/patient_head.yaml"  # the calling config of the test chain (train.sh step 10)
CODE_PATHS = (
    "inference.py",
    "utils",
    "models",
    "config",
)  # what `python -m utils.rsna.kaggle` imports
# Overrides of the bundle's build that the notebook does not take: where the runs and data are
# here, and the profile, which bundle.json records on its own.
MANIFEST_SKIPS = ("profile", "data_dir", "output_dir")
# Checkpoint entries inference reads (utils/predict.py); optimizer and scheduler state stay home.
INFERENCE_KEYS = ("model", "config", "fold", "seed", "epoch")
CODE_SLUG, WHEELS_SLUG = "rsna-2022-fracture-code", "rsna-2022-fracture-wheels"
# Distributions the inference code imports (requirements.txt names); their dependencies follow.
# Left out: torch and torchvision (Kaggle's CUDA build stays), nnunetv2 and
# dynamic-network-architectures (not used by the RSNA chain), pycocotools (FracAtlas).
INFERENCE_PACKAGES = [
    "timm",
    "albumentations",
    "numpy",
    "pandas",
    "scikit-learn",
    "pyyaml",
    "tqdm",
    "matplotlib",
    "opencv-python-headless",
    "pydicom",
    "dicomsdl",
    "python-gdcm",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-rle",
    "nibabel",
    "imagecodecs",
]
# Provided by Kaggle's GPU image and tied to its CUDA driver: never shipped, never replaced.
KAGGLE_PROVIDED = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
# Kaggle's image is Ubuntu 22.04 (glibc 2.35): any manylinux wheel up to 2.35 runs there.
GLIBC_MINORS = (35, 34, 31, 28, 27, 17)
PLATFORMS = (*(f"manylinux_2_{m}_x86_64" for m in GLIBC_MINORS), "manylinux2014_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(roots: list[str]) -> dict[str, str]:
    """``{distribution: installed version}`` of ``roots`` and their (non-extra) dependencies,
    without ``KAGGLE_PROVIDED`` ones (nor what only they need)."""
    found: dict[str, str] = {}
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or KAGGLE_PROVIDED.match(name):
            continue
        dist = md.distribution(name)
        found[name] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return dict(sorted(found.items()))


def owner_metadata(owner: str | None) -> dict:
    """kaggle/kernel-metadata.json with its owner replaced by ``owner`` (if given)."""
    meta = json.loads((KAGGLE_DIR / "kernel-metadata.json").read_text())
    old = meta["id"].split("/")[0]
    owner = owner or old
    text = json.dumps(meta).replace(f'"{old}/', f'"{owner}/')
    meta = json.loads(text)
    expected = sorted(f"{owner}/{slug}" for slug in (CODE_SLUG, WHEELS_SLUG))
    if sorted(meta["dataset_sources"]) != expected:
        raise InputError(f"kernel-metadata.json dataset_sources must be {expected}")
    return meta


def dataset_metadata(folder: Path, owner: str, slug: str, title: str) -> None:
    meta = {"title": title, "id": f"{owner}/{slug}", "licenses": [{"name": "CC0-1.0"}]}
    write_text(json.dumps(meta, indent=2) + "\n", folder / "dataset-metadata.json")


def fresh_folder(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def bundle_runs(cfg, exp: str, dest: Path) -> None:
    """Every trained fold of ``exp`` into ``dest/fold<k>/``: its ``infer.checkpoint`` file cut to
    what inference reads, and its config."""
    kind = cfg.infer.checkpoint
    folds = trained_folds(cfg, exp)
    if not folds:
        raise InputError(f"no trained fold of '{exp}' in {paths.exp_dir(cfg, exp)}")
    for fold in folds:
        src = paths.run_dir(cfg, fold, exp)
        state = load_checkpoint(src / f"{kind}.pth")
        save_checkpoint({k: state[k] for k in INFERENCE_KEYS}, dest / src.name / f"{kind}.pth")
        shutil.copy2(src / "config.yaml", dest / src.name / "config.yaml")
    log.info("%s: folds %s", exp, folds)


def build_code(out: Path, owner: str, overrides: list[str]) -> Path:
    """``<out>/code``: code, runs of every stage, priors, bundle.json, dataset-metadata.json."""
    cfg = load_config(ROOT / CONFIG, overrides)
    code = fresh_folder(out / "code")
    tracked = subprocess.run(
        ["git", "ls-files", *CODE_PATHS], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    for rel in tracked:
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, code / rel)
    runs = Path("runs")
    for stage in (e for e in cfg.stages.values() if e):
        if paths.ensemble_json(cfg, stage).is_file():  # an ensemble: its record, then its members
            record = paths.ensemble_json(cfg, stage)
            (code / runs / cfg.pipeline / stage).mkdir(parents=True)
            shutil.copy2(record, code / runs / cfg.pipeline / stage / record.name)
        for exp in ensemble.trained_exps(cfg, stage):
            bundle_runs(cfg, exp, code / runs / cfg.pipeline / exp)
    for role, product in chain_products(cfg).items():  # what the test-time chain reads
        if not product.is_file():
            raise InputError(
                f"no {role} file {product}: run the CV report (inference.py --split oof)"
            )
        shutil.copy2(product, code / runs / cfg.pipeline / product.name)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    manifest = {
        "config": CONFIG,
        "profile": cfg.profile,
        "overrides": [o for o in overrides if o.split("=")[0] not in MANIFEST_SKIPS],
        "runs": str(runs),
        "commit": commit,
    }
    write_text(json.dumps(manifest, indent=2) + "\n", layout.bundle_manifest(code))
    dataset_metadata(code, owner, CODE_SLUG, "RSNA 2022 fracture detection: code and checkpoints")
    return code


def build_wheels(out: Path, owner: str, python: str) -> Path:
    """``<out>/wheels``: requirements-kaggle.txt and its wheels for CPython ``python``."""
    wheels = fresh_folder(out / "wheels")
    pins = dependency_closure(INFERENCE_PACKAGES)
    lines = [f"{name}=={version}" for name, version in pins.items()]
    write_text("\n".join(lines) + "\n", wheels / "requirements-kaggle.txt")
    abi = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", python, "--implementation", "cp", "--abi", abi, "--abi", "abi3"]
    cmd += ["--abi", "none"] + [f"--platform={p}" for p in PLATFORMS] + ["--platform=any"]
    subprocess.run([*cmd, "-d", str(wheels), *lines], check=True)
    dataset_metadata(wheels, owner, WHEELS_SLUG, "RSNA 2022 fracture detection: offline wheels")
    return wheels


def build_kernel(out: Path, meta: dict) -> Path:
    """``<out>/kernel``: the notebook and its kernel-metadata.json."""
    kernel = fresh_folder(out / "kernel")
    shutil.copy2(KAGGLE_DIR / NOTEBOOK, kernel / NOTEBOOK)
    write_text(json.dumps(meta, indent=2) + "\n", kernel / "kernel-metadata.json")
    return kernel


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg=None, commands=("code", "wheels", "kernel", "all"))
    parser.add_argument("--out", type=Path, default=Path("output/kaggle"))
    parser.add_argument("--python", default="3.11", help="Kaggle image's Python (major.minor)")
    parser.add_argument("--owner", default=None, help="Kaggle user (default: kernel-metadata's)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    with cli.running():
        meta = owner_metadata(args.owner)
        owner = meta["id"].split("/")[0]
        built = []
        if args.command in ("code", "all"):
            built.append(build_code(args.out, owner, args.overrides))
        if args.command in ("wheels", "all"):
            built.append(build_wheels(args.out, owner, args.python))
        if args.command in ("kernel", "all"):
            built.append(build_kernel(args.out, meta))
    for folder in built:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"{folder}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
