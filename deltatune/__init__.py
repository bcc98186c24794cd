"""deltatune: every fine-tuning method as a small delta on a frozen pretrained model.

The public API is imported on first use (`deltatune.attach`, `deltatune.LoRA`, ...), so that importing the
package, e.g. for `deltatune --help`, does not load torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

_API = {"Delta": "deltatune.delta", "DeltaConfig": "deltatune.delta", "DeltaGroup": "deltatune.delta",
        "attach": "deltatune.delta", "load": "deltatune.delta", "merge_deltas": "deltatune.interop.merge",
        "CheckpointError": "deltatune.errors", "ConfigError": "deltatune.errors", "DataError": "deltatune.errors",
        "DeltaTuneError": "deltatune.errors", "TargetError": "deltatune.errors",
        "OptimizerConfig": "deltatune.optim", "register": "deltatune.registry",
        "TrainConfig": "deltatune.train", "TrainResult": "deltatune.train", "evaluate": "deltatune.train",
        "train": "deltatune.train"}


def _method_configs() -> dict[str, type]:
    """Every registered method's config class by class name (deltatune.LoRA, deltatune.Full, ...): the registry
    stays the only list."""
    from deltatune.registry import methods

    return {method.config_class.__name__: method.config_class for method in methods().values()}


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
    elif name == "list_methods":
        from deltatune.registry import methods as value
    elif name == "METHOD_CONFIGS":
        value = _method_configs()
    elif name == "__all__":
        value = sorted([*_API, "list_methods", *_method_configs()])
    elif name[:1].isupper() and name in (configs := _method_configs()):
        value = configs[name]
    else:
        raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})


class _Package(ModuleType):
    """Importing the subpackage `deltatune.train` must not bind it over the public `deltatune.train()` function
    (the import system sets a parent's attribute to each child module it loads)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _API and isinstance(value, ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
