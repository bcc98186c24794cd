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
from deltatune.methods.full import Full  # noqa: E402
from deltatune.methods.head import Head  # noqa: E402
from deltatune.methods.lora import LoRA  # noqa: E402
from deltatune.optim import OptimizerConfig  # noqa: E402
from deltatune.registry import methods as list_methods  # noqa: E402
from deltatune.registry import register
from deltatune.train import TrainConfig, TrainResult, evaluate, train  # noqa: E402

__all__ = ["CheckpointError", "ConfigError", "DataError", "Delta", "DeltaConfig", "DeltaGroup", "DeltaTuneError", "Full",
           "Head", "LoRA", "OptimizerConfig", "TargetError", "TrainConfig", "TrainResult", "attach", "evaluate",
           "list_methods", "load", "register", "train"]
