"""The registry: the one list of fine-tuning methods. `@register("lora")` on a Delta subclass adds it.

The registry imports no method: on the first lookup it imports every module of the `deltatune.methods` package
(plugin discovery; modules whose name starts with `_` hold shared plumbing and are skipped), and each method module
registers itself. A method defined anywhere else (a test, a user's module) registers the same way.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from deltatune.errors import ConfigError, problems_error

if TYPE_CHECKING:
    from deltatune.delta import Delta, DeltaConfig


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type[DeltaConfig]
    delta_class: type[Delta]

    @property
    def description(self) -> str:
        return (self.delta_class.__doc__ or "").strip().splitlines()[0]


_METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[type[Delta]], type[Delta]]:
    """Class decorator: register a Delta subclass (with its `config_class`) under `name`."""

    def add(delta_class: type[Delta]) -> type[Delta]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].delta_class.__name__}")
        config_class = delta_class.config_class
        if any(m.config_class is config_class for m in _METHODS.values()):
            raise ValueError(f"config class {config_class.__name__} is already registered")
        if not (delta_class.__doc__ or "").strip():
            raise ValueError(f"{delta_class.__name__} needs a docstring: its first line describes the method")
        config_class.method = name
        delta_class.method = name
        _METHODS[name] = Method(name, config_class, delta_class)
        return delta_class

    return add


METHOD_PACKAGE = "deltatune.methods"  # discovered, never imported statically: the core depends on no method
_discovered = False


def _ensure_loaded() -> None:
    """Import the built-in method modules once (each registers its method)."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # before importing: a method module's own registry calls must not recurse
    try:
        package = importlib.import_module(METHOD_PACKAGE)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{METHOD_PACKAGE}.{module.name}")
    except BaseException:
        _discovered = False
        raise


def methods() -> dict[str, Method]:
    """All registered methods by name, sorted."""
    _ensure_loaded()
    return dict(sorted(_METHODS.items()))


def get_method(name: str) -> Method:
    _ensure_loaded()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Registered methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_of(config: DeltaConfig) -> Method:
    _ensure_loaded()
    for method in _METHODS.values():
        if type(config) is method.config_class:
            return method
    raise ConfigError(f"{type(config).__name__} is not a registered method config")


def parse_delta_config(raw: dict[str, Any], where: str = "delta") -> DeltaConfig:
    """Build a method config from a mapping with a `method` key (as written in YAML)."""
    if not isinstance(raw, dict) or "method" not in raw:
        raise problems_error([([where], f"expected a mapping with a 'method' key, e.g. {{method: lora, r: 8}}; "
                                        f"got {raw!r}")])
    fields = {k: v for k, v in raw.items() if k != "method"}
    try:
        method = get_method(str(raw["method"]))
        return method.config_class(**fields)
    except ConfigError as exc:
        problems = getattr(exc, "problems", None) or [(["method"], str(exc))]
        raise problems_error([([where, *loc], text) for loc, text in problems]) from None
