"""Named component registries: configs pick models, datasets and losses by name.

An unknown name, or a ``params`` key the component's constructor does not take, is an error
that lists the valid choices.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from utils.config import Config


class Registry:
    """``REG = Registry("model")``; ``@REG.register("name")``; ``REG.build("name", params)``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}'; valid: {', '.join(self.names())}")
        return self._items[name]

    def build(self, name: str, params: Mapping[str, Any] | None = None, **extra: Any) -> Any:
        """Construct ``name`` with ``params`` (from the config) plus ``extra`` (from the code)."""
        factory = self.get(name)
        kwargs = {**dict(params or {}), **extra}
        sig = inspect.signature(factory)
        takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        valid = [
            n
            for n, p in sig.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown and not takes_any:
            raise TypeError(
                f"{self.kind} '{name}' got unknown params {unknown}; valid: {', '.join(valid)}"
            )
        return factory(**{k: _plain(v) for k, v in kwargs.items()})


def _plain(value: Any) -> Any:
    """Frozen config values (Config, tuples) -> plain dicts/lists for constructors."""
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
