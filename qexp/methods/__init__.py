"""Method registry: ``@register`` on a :class:`Method` subclass; every module here is imported."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Method, MethodConfig, MethodLayer

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method under ``cls.name``; refuses duplicate names."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    """All methods, by name (imports every module in this package once)."""
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base":
            importlib.import_module(f"{__name__}.{mod.name}")
    return dict(_REGISTRY)


def get(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        raise KeyError(f"method={name!r} is unknown; choose one of: {', '.join(sorted(methods))}")
    return methods[name]


__all__ = ["Method", "MethodConfig", "MethodLayer", "get", "register", "registry"]
