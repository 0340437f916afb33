"""The RSNA 2022 Kaggle submission: find the inputs, link the bundled runs, run the test chain.

Run by the notebook ``kaggle/rsna_submission.ipynb`` from the attached code bundle
(``make kaggle-bundle``), as ``python -m utils.rsna.kaggle [--data-dir D] [key=value ...]`` with
the bundle as the working directory (so its ``utils`` is the one imported; nothing edits
``sys.path``):

1. the input root is ``/kaggle`` unless the environment variable ``KAGGLE_ROOT`` names another;
2. the competition folder is ``--data-dir`` if given, else found under ``<root>/input`` by a
   glob for ``test.csv`` / ``sample_submission.csv`` (both mount styles: ``input/<slug>/`` and
   ``input/competitions/<slug>/``; see :func:`find_competition`);
3. the bundle's trained runs (read-only) are linked into ``<root>/working/output`` so that the
   test-time cache and intermediates can be written beside them;
4. ``inference.main`` runs ``--split test`` with the bundle's config, profile and overrides,
   exactly as ``inference.py --split test`` does, into ``<root>/working/submission.csv``.

If the chain itself fails, the error is logged with its traceback and every row gets the train
priors: the notebook never ends without a submission.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

import inference
from utils import cli
from utils.config import load_config
from utils.errors import InputError
from utils.rsna import layout
from utils.rsna.datasets import train_priors
from utils.rsna.metric import TARGETS, UID
from utils.rsna.submit import read_test_rows, write_submission

log = logging.getLogger("kaggle")
SLUG = "rsna-2022-cervical-spine-fracture-detection"
CODE_ROOT = Path(__file__).resolve().parents[2]
MARKERS = ("test.csv", "sample_submission.csv")  # files that make a folder a competition folder
MAX_DEPTH = 3  # input/<slug>, input/competitions/<slug>, input/datasets/<owner>/<slug>


def find_competition(root: Path, slug: str = SLUG, override: Path | None = None) -> Path:
    """The competition folder under ``<root>/input`` (or ``override``, which must hold test.csv).

    Candidates are the folders up to ``MAX_DEPTH`` levels below the input folder that hold
    ``test.csv`` or ``sample_submission.csv`` (a bounded glob: test_images holds ~450k files).
    One candidate is taken as it is; among several, the one named ``slug``, the newer mount
    (``competitions/<slug>``) first.
    """
    if override is not None:
        if not (Path(override) / "test.csv").is_file():
            raise InputError(f"--data-dir {override} has no test.csv")
        return Path(override)
    base = layout.kaggle(root).input
    found = sorted(
        {
            hit.parent
            for depth in range(1, MAX_DEPTH + 1)
            for name in MARKERS
            for hit in base.glob("/".join(["*"] * depth + [name]))
        }
    )
    if len(found) == 1:
        return found[0]
    named = [p for p in reversed(layout.kaggle(root).competition_candidates(slug)) if p in found]
    if named:
        return named[0]
    raise InputError(
        f"{'no' if not found else 'several'} competition folders (with {' or '.join(MARKERS)}) "
        f"under {base}: {[str(p) for p in found]}; pass --data-dir"
    )


def link_runs(runs: Path, output: Path) -> None:
    """Symlink each pipeline product of the bundle's ``runs`` folder into ``output``.

    ``runs/<pipeline>/<exp>/`` (checkpoints) and ``runs/<pipeline>/<file>`` (saved priors) stay
    read-only where they are; ``output/<pipeline>/test/`` is then written by the chain.
    """
    for item in sorted(runs.glob("*/*")):
        link = output / item.relative_to(runs)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(item.resolve(), target_is_directory=item.is_dir())


def write_priors_only(cfg, data: Path, out: Path) -> pd.DataFrame:
    """Every test.csv row with its train prior (the submission of last resort)."""
    return write_submission(
        read_test_rows(data), pd.DataFrame(columns=[UID, *TARGETS]), train_priors(cfg), out
    )


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg=None)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="competition folder (default: found)"
    )
    args = parser.parse_args(argv)
    with cli.running():
        submit_from_bundle(args.data_dir, args.overrides)


def submit_from_bundle(data_dir: Path | None, extra: list[str]) -> None:
    """The notebook's work: find the inputs, link the bundled runs, write the submission."""
    manifest_path = layout.bundle_manifest(CODE_ROOT)
    if not manifest_path.is_file():
        raise InputError(
            f"{manifest_path} not found: run this from a `make kaggle-bundle` code folder"
        )
    manifest = json.loads(manifest_path.read_text())
    root = layout.kaggle()
    data = find_competition(root.root, SLUG, data_dir)
    output = root.working / "output"
    link_runs(CODE_ROOT / manifest["runs"], output)
    out = root.submission
    overrides = [
        *manifest["overrides"],  # e.g. stages.fracture=<an ensemble>, as the bundle was built
        f"profile={manifest['profile']}",
        f"data_dir={data}",
        f"output_dir={output}",
        "submit.keep_cache=false",  # the hidden test's cache would not fit in working/
        *extra,
    ]
    log.info("input root %s, competition folder %s, submission %s", root.root, data, out)
    config = str(CODE_ROOT / manifest["config"])
    try:
        inference.main(["--CFG", config, "--split", "test", "--out", str(out), *overrides])
    except (Exception, SystemExit) as err:
        log.exception("error: the test-time chain failed (%s): every row gets the train prior", err)
        write_priors_only(load_config(config, overrides), data, out)
    log.info("submission: %s (%d rows)", out, len(pd.read_csv(out)))


if __name__ == "__main__":
    main()
