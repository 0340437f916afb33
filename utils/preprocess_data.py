"""Convert a data set into its pipeline's training inputs: ``python -m utils.preprocess_data --pipeline NAME ...``.

One conversion per data set (as nnU-Net keeps one conversion script per dataset); every argument
after ``--pipeline NAME`` goes to that pipeline's conversion, whose ``--help`` lists them::

    python -m utils.preprocess_data --pipeline rsna --data-dir data/rsna [--workers 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from utils.registry import load_pipeline


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    parser.add_argument("--pipeline", default="rsna", help="data set pipeline (default: rsna)")
    args, rest = parser.parse_known_args(argv)
    try:
        pipeline = load_pipeline(args.pipeline)
    except KeyError as err:
        raise SystemExit(f"error: {err.args[0]}") from None
    pipeline.preprocess(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
