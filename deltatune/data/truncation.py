"""Records longer than the model can take: truncate with a warning (default), stop with an error, or stay silent.

The limit is `data.max_length`, lowered to the model's maximum (position embeddings / tokenizer) when that is
smaller, so no sequence can overflow the model. A format that truncates adds a `full_length` column (tokens
before truncation, one example per record); `check_truncation` applies `data.truncation` and drops it.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from deltatune.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset

    from deltatune.data.config import DataConfig
    from deltatune.data.load import Table

FULL_LENGTH = "full_length"


def effective_max_length(cfg: DataConfig, model_max_length: int | None) -> tuple[int, str]:
    """(limit in tokens, where it comes from) for `cfg` on a model taking at most `model_max_length` tokens."""
    if model_max_length is not None and model_max_length < cfg.max_length:
        return model_max_length, f"the model's maximum; data.max_length is {cfg.max_length}"
    return cfg.max_length, "data.max_length"


def check_truncation(dataset: Dataset, table: Table, cfg: DataConfig, origin: str) -> Dataset:
    """Apply `cfg.truncation` to the records of `table` longer than `cfg.max_length`; `dataset` minus its lengths."""
    if FULL_LENGTH not in dataset.column_names:
        return dataset
    lengths = dataset[FULL_LENGTH]
    if cfg.truncation != "silent" and (over := [i for i, n in enumerate(lengths) if n > cfg.max_length]):
        first = over[0]
        what = (f"{len(over)} of {len(lengths)} records in {table.path} are longer than {cfg.max_length} tokens "
                f"({origin}; the first is {table.where(first)} with {lengths[first]} tokens)")
        if cfg.truncation == "error":
            raise DataError(f"{what}; shorten them, raise data.max_length if the model allows, or set "
                            "data.truncation: warn to truncate them")
        warnings.warn(f"{what}; they were truncated (data.truncation: error stops instead, silent hides this)",
                      stacklevel=2)
    return dataset.remove_columns(FULL_LENGTH)
