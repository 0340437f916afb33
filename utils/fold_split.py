"""Write a pipeline's one fold file (and optionally nnU-Net's ``splits_final.json`` from it).

Usage (from the repository root)::

    python -m utils.fold_split --CFG config/<pipeline>/base.yaml [--data-dir D] [--out F] \
        [--force] [--nnunet-splits PATH/splits_final.json [--nnunet-case-map CASES_CSV]] \
        [key=value ...]        # e.g. n_folds=5 seed=42 profile=demo

The pipeline (the config's folder) says which column names a case and how cases are stratified
and grouped, or gives the data set's own split; ``n_folds`` and ``seed`` come from the config. The default output is
``<output_dir>/<pipeline>/folds.csv``. Re-running writes identical bytes; an existing file with
a different assignment is only replaced with ``--force``, because stages trained on different
folds leak validation cases into training.

``--nnunet-splits`` also writes nnU-Net v2's ``splits_final.json`` from the same folds, so
segmentation OOF predictions line up with the classifier folds. ``--nnunet-case-map`` names the
cases of the nnU-Net dataset (the pipeline's id column) and optionally their nnU-Net case
identifiers (column ``case_id``, default: the id itself); without it every case is listed.
nnU-Net reads the file from ``$nnUNet_preprocessed/DatasetXXX/``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from utils import cli, folds, paths
from utils.registry import load_pipeline

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg="config/<pipeline>/base.yaml")
    parser.add_argument("--data-dir", help="the data set's folder (default: the config's data_dir)")
    parser.add_argument(
        "--out", type=Path, help="fold file (default: <output_dir>/<pipeline>/folds.csv)"
    )
    parser.add_argument("--force", action="store_true", help="replace a different fold file")
    parser.add_argument("--nnunet-splits", help="also write nnU-Net's splits_final.json here")
    parser.add_argument(
        "--nnunet-case-map", help="CSV: <id column>[,case_id] of the nnU-Net dataset's cases"
    )
    args = parser.parse_args(argv)
    if args.nnunet_case_map and not args.nnunet_splits:
        parser.error("--nnunet-case-map needs --nnunet-splits")
    with cli.running():
        cfg = cli.load(args, [f"data_dir={args.data_dir}"] if args.data_dir else [])
        pipeline = load_pipeline(cfg.pipeline)
        spec = pipeline.fold_inputs(cfg)
        if spec.given is not None:
            fold_table = folds.given_folds(spec.table, pipeline.id_col, spec.given)
        else:
            fold_table = folds.make_folds(
                spec.table, pipeline.id_col, cfg.n_folds, cfg.seed, spec.strata, spec.groups
            )
        out = args.out or paths.folds_csv(cfg)
        folds.save_folds(fold_table, out, force=args.force)
        if args.nnunet_splits:
            case_ids = (
                folds.read_case_map(args.nnunet_case_map, pipeline.id_col)
                if args.nnunet_case_map
                else None
            )
            folds.write_nnunet_splits(fold_table, args.nnunet_splits, case_ids)
            logger.info("wrote %s", args.nnunet_splits)
    summary = folds.fold_summary(fold_table, spec.table, spec.summary)
    print(summary.to_string(float_format="{:.3f}".format))
    how = "the data set's given split" if spec.given is not None else f"seed {cfg.seed}"
    n = fold_table["fold"].nunique()
    print(f"wrote {out}: {len(fold_table)} cases in {n} folds ({how})")


if __name__ == "__main__":
    main()
