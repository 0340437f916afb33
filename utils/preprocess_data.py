"""Convert a data set into its pipeline's training inputs (the pipeline's ``preprocess.py``).

Usage (from the repository root)::

    python -m utils.preprocess_data --pipeline NAME [--data-dir D] [--workers N] [key=value ...]
    python -m utils.preprocess_data --CFG config/<pipeline>/<stage>.yaml [--data-dir D] ...

The products go to ``<output_dir>/<pipeline>/`` (the pipeline's ``layout.py`` names them); a rerun
keeps what is already converted. ``key=value`` overrides apply to the pipeline's config
(``--pipeline NAME`` reads ``config/NAME/base.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence

from utils import cli
from utils.config import ConfigError, load_config
from utils.registry import CONFIG_DIR, available_pipelines, load_pipeline


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg=None)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--pipeline", help=f"one of {', '.join(available_pipelines())}")
    which.add_argument("--CFG", help="a config of the pipeline, e.g. config/<pipeline>/base.yaml")
    parser.add_argument("--data-dir", help="the data set's folder (default: the config's data_dir)")
    parser.add_argument(
        "--workers", type=int, default=1, help="parallel processes (cases converted at once)"
    )
    args = parser.parse_args(argv)
    with cli.running():
        path = args.CFG or CONFIG_DIR / args.pipeline / "base.yaml"
        if args.pipeline and args.pipeline not in available_pipelines():
            raise ConfigError(
                f"unknown pipeline {args.pipeline!r}; valid: {', '.join(available_pipelines())}"
            )
        extra = [f"data_dir={args.data_dir}"] if args.data_dir else []
        cfg = load_config(path, [*args.overrides, *extra])
        print(load_pipeline(cfg.pipeline).preprocess(cfg, args.workers))


if __name__ == "__main__":
    main()
