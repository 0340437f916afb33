"""Named component registries: configs pick the pipeline, dataset, model and loss by name.

An unknown name, or a ``params`` key the component's constructor does not take, is an error
that lists the valid choices. A pipeline's package registers its components when it is imported:
:func:`load_pipeline` imports ``utils/<pipeline>/pipeline.py`` the first time a config of that
pipeline is used, so train.py and inference.py never name a data set.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from utils.config import Config, ConfigError, thaw
from utils.datasets import StageDataset
from utils.weights import check_available


class Registry:
    """``REG = Registry("model")``; ``@REG.register("name")``; ``REG.build("name", params)``.

    ``base``: a class every registered entry must derive from (the datasets' stage contract).
    """

    def __init__(self, kind: str, base: type | None = None):
        self.kind = kind
        self.base = base
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise TypeError(f"{self.kind} '{name}' must derive from {self.base.__name__}")
            self._items[name] = obj
            return obj

        return deco

    def remove(self, name: str) -> None:
        """Forget ``name`` (a test or notebook that registered a component of its own)."""
        self.get(name)
        del self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}")
        return self._items[name]

    def check(self, name: str, keys: Iterable[str]) -> Callable[..., Any]:
        """The factory ``name`` after checking that it takes every keyword in ``keys``."""
        factory = self.get(name)
        sig = inspect.signature(factory)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        valid = [
            n
            for n, p in sig.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        unknown = sorted(set(keys) - set(valid))
        if unknown and not takes_any:
            raise ConfigError(
                f"{self.kind} '{name}' got unknown params {unknown}; valid: {', '.join(valid)}"
            )
        return factory

    def build(self, name: str, params: Mapping[str, Any] | None = None, **extra: Any) -> Any:
        """Construct ``name`` with ``params`` (from the config) plus ``extra`` (from the code)."""
        kwargs = {**dict(params or {}), **extra}
        factory = self.check(name, kwargs)
        return factory(**{k: thaw(v) for k, v in kwargs.items()})


MODELS = Registry("model")
DATASETS = Registry("dataset", base=StageDataset)
LOSSES = Registry("loss")
PIPELINES = Registry("pipeline")


@dataclass(frozen=True)
class FoldInputs:
    """What utils/fold_split.py splits: one row per case, optional strata and groups (N,).

    ``given``: a fold per row fixed by the data set itself (e.g. its published train/validate
    split), written as it is instead of drawn. ``summary``: label columns of ``table`` whose
    per-fold mean is printed as a balance check.
    """

    table: pd.DataFrame
    strata: Any = None
    groups: Any = None
    given: Any = None
    summary: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pipeline:
    """A data set's pipeline as the generic entry points see it.

    - ``id_col``: names a case in every table and in the fold file;
    - ``fold_inputs(cfg)``: the cases utils/fold_split.py splits;
    - ``preprocess(cfg, workers)``: converts the data set (utils/preprocess_data.py) and returns
      a summary line;
    - ``train_folds(cfg, available)`` (optional): the folds ``train.py --fold all`` trains among
      the fold file's ``available`` ones (default: all of them);
    - ``after_oof(cfg)`` (optional): reports once a stage's OOF predictions exist (``report.py``);
      returns a ``utils.experiments.CvResult`` (the summary line and the CV metric the experiment
      log records) or None when that stage has no CV report;
    - ``test(cfg, out)`` (optional): the whole test-time chain on ``cfg.data_dir``, written to
      ``out`` (None: the pipeline's default place); returns where it wrote (``submit.py``).
    """

    name: str
    id_col: str
    fold_inputs: Callable[[Config], FoldInputs]
    preprocess: Callable[[Config, int], str]
    train_folds: Callable[[Config, list[int]], list[int]] | None = None
    after_oof: Callable[[Config], Any] | None = None
    test: Callable[[Config, Path | None], Path] | None = None


CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"


def available_pipelines() -> list[str]:
    """Pipelines of this repository (config/<name>/base.yaml) plus any registered in-process."""
    shipped = {p.parent.name for p in CONFIG_DIR.glob("*/base.yaml")}
    return sorted(shipped | set(PIPELINES.names()))


def load_pipeline(name: str) -> Pipeline:
    """The registered pipeline ``name``, importing ``utils.<name>.pipeline`` on first use."""
    if name not in PIPELINES.names():
        try:
            importlib.import_module(f"utils.{name}.pipeline")
        except ModuleNotFoundError as err:
            if err.name not in (f"utils.{name}", f"utils.{name}.pipeline"):
                raise
            raise ConfigError(
                f"unknown pipeline {name!r}; valid: {', '.join(available_pipelines())}"
            ) from None
    return PIPELINES.get(name)


def check_components(cfg) -> None:
    """Fail before any work on an unknown pipeline, component or parameter, or missing weights.

    Raises ConfigError (an ensemble config, which is not trained; an unknown name or ``params``
    key, listing the valid choices), or
    InputError when pretrained encoder weights are neither local nor downloadable
    (utils/weights.py: check_available).
    """
    load_pipeline(cfg["pipeline"])
    if cfg.get("ensemble"):
        raise ConfigError(
            f"'{cfg['exp_name']}' is an ensemble (ensemble: ...): nothing to train; train its "
            "members, then predict it with inference.py (utils/ensemble.py)"
        )
    MODELS.check(cfg["model"]["name"], [*cfg["model"]["params"], *_model_extra(cfg)])
    DATASETS.check(cfg["dataset"]["name"], [*cfg["dataset"]["params"], "table", "cfg", "train"])
    LOSSES.check(cfg["loss"]["name"], cfg["loss"]["params"])
    check_available(cfg)


def _model_extra(cfg) -> dict[str, Any]:
    """Constructor arguments a model gets from elsewhere in the config (``in_chans``)."""
    if "in_chans" in cfg["dataset"]["params"]:
        return {"in_chans": cfg["dataset"]["params"]["in_chans"]}
    return {}


def build_model(cfg):
    """The model named by ``cfg.model.name`` built with ``cfg.model.params``.

    ``in_chans`` is taken from the dataset params when the dataset declares it, so the number of
    stacked slices is configured once and really reaches the encoder.
    """
    load_pipeline(cfg["pipeline"])
    return MODELS.build(cfg["model"]["name"], cfg["model"]["params"], **_model_extra(cfg))


def build_dataset(cfg, table: pd.DataFrame, train: bool, **extra: Any):
    """The dataset named by ``cfg.dataset.name`` over ``table`` (``extra``: e.g. a cache folder)."""
    load_pipeline(cfg["pipeline"])
    return DATASETS.build(
        cfg["dataset"]["name"], cfg["dataset"]["params"], table=table, cfg=cfg, train=train, **extra
    )


def build_loss(cfg):
    load_pipeline(cfg["pipeline"])
    return LOSSES.build(cfg["loss"]["name"], cfg["loss"]["params"])
