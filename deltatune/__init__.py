"""deltatune: every fine-tuning method as a small delta on a frozen pretrained model."""

__version__ = "0.1.0"

from deltatune.delta import Delta, DeltaConfig, DeltaGroup, attach, load  # noqa: E402
from deltatune.errors import CheckpointError, ConfigError, DataError, DeltaTuneError, TargetError  # noqa: E402
from deltatune.registry import methods as list_methods, register  # noqa: E402
from deltatune.methods.lora import LoRA  # noqa: E402

__all__ = ["Delta", "DeltaConfig", "DeltaGroup", "attach", "load", "list_methods", "register", "LoRA", "CheckpointError",
           "ConfigError", "DataError", "DeltaTuneError", "TargetError"]
