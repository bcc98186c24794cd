"""Training: the loop (`train`, `evaluate`), exact-resume checkpoints, losses and metrics."""

from deltatune.train.checkpoint import (
           Checkpoint,
           load_checkpoint,
           load_latest,
           save_checkpoint,
)
from deltatune.train.evaluation import evaluate
from deltatune.train.loop import TrainConfig, TrainResult, train
from deltatune.train.metrics import METRICS, MINIMISED

__all__ = ["METRICS", "MINIMISED", "Checkpoint", "TrainConfig", "TrainResult", "evaluate", "load_checkpoint",
           "load_latest", "save_checkpoint", "train"]
