"""Configuration: generic defaults + a pipeline's keys + a stage file's deltas + profiles + CLI overrides.

Usage::

    cfg = load_config("config/<pipeline>/<stage>.yaml", ["train.lr=1e-4", "profile=demo"])
    cfg.train.lr, cfg["train"]["lr"], cfg.get("train.lr"), cfg.pipeline  # -> "<pipeline>"

Layers, in order: ``config/base.yaml`` (generic keys), ``config/<pipeline>/base.yaml`` (the keys
only that pipeline has, declared once), the stage file ``config/<pipeline>/<stage>.yaml``
(deltas), the ``profiles.<profile>`` block of each of the three, then the overrides. The
pipeline is the stage file's folder; loading ``config/<pipeline>/base.yaml`` itself gives the
pipeline's defaults without a stage.

Rules (strict, so a typo never silently trains the wrong thing):
- every key of a stage file, a profile block or an override must be declared in config/base.yaml
  or in the pipeline's base.yaml, except inside a `params` mapping, whose keys are checked
  against the registered component's constructor when it is built;
- overrides are ``dotted.key=value`` with the value parsed as YAML (``null``, ``true``, ``[1, 2]``);
- each override is logged; the resolved config is frozen and can be dumped next to a run.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError
from utils.io import write_text

log = logging.getLogger(__name__)

BASE_CONFIG = Path(__file__).resolve().parents[1] / "config" / "base.yaml"
PIPELINE_BASE = "base.yaml"  # config/<pipeline>/base.yaml: the pipeline's own keys
_FREE_KEYS = ("params",)  # mappings whose keys are validated by the component, not by base.yaml
_RESERVED = ("pipeline", "runtime")  # set by the loader, never by a file or an override
RUNTIME_SCOPES = ("call", "run")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 insists on ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text with the config loader."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(UserError, ValueError):
    """A config file or override is invalid (unknown key, bad syntax, unknown profile)."""


class Config(Mapping):
    """Read-only nested mapping with attribute access (``cfg.train.lr``)."""

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", {k: _freeze(v) for k, v in data.items()})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(
                f"config has no key '{key}'; valid keys: {sorted(self._data)}"
            ) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise TypeError("Config is frozen; use load_config(..., overrides) or Config.replace()")

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def get(self, key: str, default: Any = None) -> Any:
        """Dotted lookup: ``cfg.get("train.lr")``."""
        node: Any = self
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, Config) else thaw(v) for k, v in self._data.items()}

    def replace(self, **dotted: Any) -> Config:
        """A copy with ``dotted.key=value`` changes (validated like CLI overrides, not logged)."""
        data = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(data, key, value, source="replace()")
        return Config(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config(value)
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """Frozen config values (Config, tuples) -> plain dicts and lists."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _check_keys(delta: Mapping[str, Any], schema: Mapping[str, Any], where: str, prefix: str = ""):
    """Raise if ``delta`` holds a key that ``schema`` (the generic + pipeline keys) does not declare."""
    for key, value in delta.items():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(
                f"unknown config key '{name}' in {where}; valid keys"
                f"{' under ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(sorted(schema))}"
            )
        if key in _FREE_KEYS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{name}' in {where} must be a mapping")
            continue
        if isinstance(schema[key], Mapping) and schema[key]:
            if not isinstance(value, Mapping):
                raise ConfigError(f"'{name}' in {where} must be a mapping, got {value!r}")
            _check_keys(value, schema[key], where, prefix=f"{name}.")


def _merge(into: dict[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``delta`` into a copy of ``into`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(into)
    for key, value in delta.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any, source: str) -> Any:
    """Set ``a.b.c`` in ``data``; only existing keys (or keys inside a params mapping). Returns the old value."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(_unknown(key, node, parts[: i + 1], source))
        node = node[part]
    last = parts[-1]
    inside_params = len(parts) > 1 and parts[-2] in _FREE_KEYS
    if last not in node and not inside_params:
        raise ConfigError(_unknown(key, node, parts, source))
    old = node.get(last)
    if isinstance(old, dict) and old and not isinstance(value, dict):
        raise ConfigError(
            f"'{key}' ({source}) is a section; set one of its keys: {', '.join(sorted(old))}"
        )
    if isinstance(old, bool) and not isinstance(value, bool):  # "false" would be truthy
        raise ConfigError(f"'{key}' ({source}) is true or false, got {value!r}")
    node[last] = value
    return old


def with_runtime_keys(saved: Config, values: Mapping[str, Any]) -> Config:
    """``saved`` (a trained run's config) with the caller's runtime ``values`` (dotted key ->
    value). A key the run was saved without (trained before the key existed) is added: a runtime
    key changes nothing the run computes, so an older run stays usable."""
    data = saved.to_dict()
    for key, value in values.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return Config(data)


def _unknown(key: str, node: Mapping[str, Any], parts: list[str], source: str) -> str:
    where = ".".join(parts[:-1])
    return (
        f"unknown config key '{key}' ({source}); valid keys"
        f"{' under ' + repr(where) if where else ''}: {', '.join(sorted(node))}"
    )


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-4", "model.params.rnn=lstm"]`` -> ``[("train.lr", 0.0001), ...]``."""
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or key != key.strip():
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err})") from None
        parsed.append((key, value))
    return parsed


def _layers(path: Path | None) -> tuple[str | None, list[tuple[str, dict[str, Any]]]]:
    """(pipeline name, [(where, mapping)] for the pipeline base and the stage file)."""
    if path is None:
        return None, []
    path = Path(path)
    pipeline_base = path.parent / PIPELINE_BASE
    if not pipeline_base.is_file() or path.parent.resolve() == BASE_CONFIG.parent:
        raise ConfigError(
            f"{path}: a stage config lives in config/<pipeline>/ beside that pipeline's "
            f"{PIPELINE_BASE}"
        )
    layers = [(str(pipeline_base), _read_yaml(pipeline_base))]
    if path.resolve() != pipeline_base.resolve():
        layers.append((str(path), _read_yaml(path)))
    return path.parent.name, layers


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve the layers for ``path`` (a stage file or a pipeline base; None = generic keys only)."""
    base = _read_yaml(BASE_CONFIG)
    profiles = [("base.yaml", base.pop("profiles", {}) or {})]
    runtime = _runtime_block(base.pop("runtime", {}), str(BASE_CONFIG))
    pipeline, layers = _layers(Path(path) if path is not None else None)
    data = base
    for i, (where, layer) in enumerate(layers):
        profiles.append((where, layer.pop("profiles", {}) or {}))
        if i:  # the pipeline base declares keys; every later layer may only use them
            _check_keys(layer, data, where)
        else:  # the pipeline base may declare runtime keys of its own
            extra = _runtime_block(layer.pop("runtime", {}), where)
            runtime = {s: [*runtime[s], *extra[s]] for s in RUNTIME_SCOPES}
        data = _merge(data, layer)
    schema = copy.deepcopy(data)
    pairs = parse_overrides(overrides)

    profile = dict(pairs).get("profile", data["profile"])
    if profile != "full":
        known = sorted({name for _, block in profiles for name in block} | {"full"})
        if profile not in known:
            raise ConfigError(f"unknown profile '{profile}'; available: {', '.join(known)}")
        for source, block in profiles:
            delta = block.get(profile) or {}
            _check_keys(delta, schema, f"{source} profiles.{profile}")
            data = _merge(data, delta)

    for key, value in pairs:
        if key.split(".")[0] in _RESERVED:
            raise ConfigError(
                f"'{key}' is set by the loader: 'pipeline' is the stage file's folder "
                "(config/<pipeline>/), 'runtime' the runtime blocks of the base files"
            )
        old = _set_dotted(data, key, value, source="command line")
        log.info("override %s: %r -> %r", key, old, value)
    data["pipeline"] = pipeline
    data["runtime"] = runtime
    if data["exp_name"] is None:
        data["exp_name"] = Path(path).stem if path is not None else "base"
    return Config(data)


def _runtime_block(block: Any, where: str) -> dict[str, list[str]]:
    """A base file's ``runtime`` mapping (scope -> dotted keys), checked."""
    block = block or {}
    if not isinstance(block, Mapping) or set(block) - set(RUNTIME_SCOPES):
        raise ConfigError(f"{where}: 'runtime' maps {' and/or '.join(RUNTIME_SCOPES)} to key lists")
    return {scope: list(block.get(scope) or []) for scope in RUNTIME_SCOPES}


def runtime_keys(cfg: Mapping[str, Any], scope: str | None = None) -> list[str]:
    """The dotted keys (a section name covers its keys) that do not change what a run computes.

    Declared by ``config/base.yaml`` and the pipeline's base in their ``runtime`` blocks:
    ``call`` keys say where data, runs and devices are (a calling config's value also applies to
    the upstream stages it loads), ``run`` keys how one stage was set up to run. ``scope``: one
    of them only. A config saved before these blocks existed has none.
    """
    block = cfg.get("runtime") or {}
    scopes = RUNTIME_SCOPES if scope is None else (scope,)
    return [k for s in scopes for k in block.get(s, ())]


def comparable(cfg: Mapping[str, Any], ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The flat ``{dotted key: value}`` of a resolved config without its runtime keys (nor the
    keys of ``ignore``, sections covering their keys): what decides what a run computes."""
    skip = {"runtime", *runtime_keys(cfg), *ignore}

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping) and v:
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = thaw(v)
        return out

    def skipped(key: str) -> bool:
        return any(key == k or key.startswith(f"{k}.") for k in skip)

    return {k: v for k, v in flat(cfg).items() if not skipped(k)}


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs, runtime keys of either left out."""
    fa, fb = comparable(a, runtime_keys(b)), comparable(b, runtime_keys(a))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def progress_off(cfg: Mapping[str, Any]) -> bool | None:
    """tqdm's ``disable``: None lets tqdm hide bars when stderr is not a terminal (log files, CI)."""
    return None if cfg["progress"] else True


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    return write_text(cfg.to_yaml(), path)


def main(argv: list[str] | None = None) -> None:
    """``python -m utils.config --CFG FILE [key=value ...] [--get KEY]``: the resolved config as
    YAML, or one value (a list space-separated) for shell scripts."""
    # cli builds on this module; under ``python -m`` this file runs as __main__, so the classes
    # of the configs cli loads are those of the imported module.
    from utils import cli, config

    parser = cli.parser(main.__doc__)
    parser.add_argument("--get", metavar="KEY", help="print only this dotted key's value")
    args = parser.parse_args(argv)
    with cli.running(logging.WARNING):
        cfg = cli.load(args)
        if args.get is None:
            print(cfg.to_yaml(), end="")
            return
        value = cfg.get(args.get, _MISSING)
        if value is _MISSING:
            raise config.ConfigError(f"unknown config key '{args.get}'")
    if isinstance(value, config.Config):
        print(value.to_yaml(), end="")
    else:
        print(" ".join(map(str, value)) if isinstance(value, tuple) else value)


_MISSING = object()

if __name__ == "__main__":
    main()
