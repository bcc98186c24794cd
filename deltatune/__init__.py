"""deltatune: every fine-tuning method as a small delta on a frozen pretrained model."""

__version__ = "0.1.0"

from deltatune.delta import Delta, DeltaConfig, DeltaGroup, attach, load  # noqa: E402
from deltatune.errors import (  # noqa: E402
           CheckpointError,
           ConfigError,
           DataError,
           DeltaTuneError,
           TargetError,
)
from deltatune.optim import OptimizerConfig  # noqa: E402
from deltatune.registry import methods as list_methods  # noqa: E402
from deltatune.registry import register
from deltatune.train import TrainConfig, TrainResult, evaluate, train  # noqa: E402

# Every registered method's config class (deltatune.LoRA, deltatune.Full, ...): the registry stays the only list.
METHOD_CONFIGS = {method.config_class.__name__: method.config_class for method in list_methods().values()}
globals().update(METHOD_CONFIGS)

__all__ = ["CheckpointError", "ConfigError", "DataError", "Delta", "DeltaConfig", "DeltaGroup", "DeltaTuneError",
           "OptimizerConfig", "TargetError", "TrainConfig", "TrainResult", "attach", "evaluate", "list_methods",
           "load", "register", "train", *METHOD_CONFIGS]
