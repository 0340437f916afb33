"""The command line every entry point shares: ``--CFG`` + ``key=value`` overrides, logging set-up
and the one error path.

Usage in an entry point::

    args = cli.parser(__doc__).parse_args(argv)        # --CFG, overrides (+ the tool's own flags)
    with cli.running():                                 # logging; a UserError -> one 'error:' line
        cfg = cli.load(args)
        ...

A :class:`~utils.errors.UserError` (a bad config, a missing input, a failed nnU-Net command) ends
the program with ``error: <message>`` and exit status 1 (argparse uses 2 for bad flags); anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from utils.config import Config, load_config
from utils.errors import UserError

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def parser(
    doc: str | None,
    cfg: str | None = "config/<pipeline>/<stage>.yaml",
    overrides: bool = True,
    commands: Sequence[str] = (),
) -> argparse.ArgumentParser:
    """An ArgumentParser showing ``doc`` as help, with ``--CFG`` (``cfg``: what it takes; None =
    no config), a first positional ``command`` among ``commands`` (if any) and trailing
    ``key=value`` overrides. Tools add their own arguments to it; with a command, parse with
    ``parse_intermixed_args`` so that options may come anywhere."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if cfg is not None:
        p.add_argument("--CFG", required=True, help=f"config file, e.g. {cfg}")
    if commands:  # before the overrides: argparse fills positionals in the order they are added
        p.add_argument("command", choices=list(commands))
    if overrides:
        p.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys)")
    return p


def load(args: argparse.Namespace, extra: Iterable[str] = ()) -> Config:
    """The config of ``args.CFG`` with the command line's overrides, then ``extra`` ones."""
    return load_config(args.CFG, [*getattr(args, "overrides", []), *extra])


def process_rank() -> int:
    """This process's rank in a ``torchrun`` job (``RANK``), 0 when run alone."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging; under torchrun the ranks other than 0 show warnings and errors only."""
    logging.basicConfig(level=level if process_rank() == 0 else logging.WARNING, format=FORMAT)


def add_file_log(path) -> logging.Handler:
    """Also log to ``path`` (a run's ``train.log``); remove the returned handler when done."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def config_command(
    doc: str | None, fn: Callable[[Config], object], cfg: str, argv: list[str] | None = None
) -> None:
    """A command ``--CFG FILE [key=value ...]`` that prints what ``fn(config)`` returns."""
    args = parser(doc, cfg=cfg).parse_args(argv)
    with running():
        print(fn(load(args)))


@contextlib.contextmanager
def running(level: int = logging.INFO) -> Iterator[None]:
    """Set up logging, then turn a :class:`~utils.errors.UserError` into ``SystemExit('error: …')``."""
    setup_logging(level)
    try:
        yield
    except UserError as err:
        raise SystemExit(f"error: {err}") from None


def generator(
    doc: str | None,
    generate: Callable[..., Mapping],
    presets: Iterable[str],
    argv: list[str] | None = None,
    default: str = "tiny",
) -> Mapping:
    """The command line of a synthetic-data generator ``generate(out, preset, seed, ...)``:
    ``--out DIR --preset NAME --seed N``, plus ``--workers`` / ``--overwrite`` when ``generate``
    takes them. Prints and returns its summary."""
    p = parser(doc, cfg=None, overrides=False)
    p.add_argument("--out", type=Path, required=True, help="data folder to create")
    p.add_argument("--preset", choices=sorted(presets), default=default)
    p.add_argument(
        "--seed", type=int, default=0, help="the data set is a function of preset and seed"
    )
    takes = inspect.signature(generate).parameters
    if "workers" in takes:
        p.add_argument("--workers", type=int, default=1, help="processes writing cases")
    if "overwrite" in takes:
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    extra = {k: getattr(args, k) for k in ("workers", "overwrite") if k in takes}
    with running():
        summary = generate(args.out, args.preset, args.seed, **extra)
    print(f"wrote {args.out}: {json.dumps(summary)}")
    return summary
