"""Data: read files, validate records, split, tokenize per task format, and batch.

Formats (classification, regression, text) live in FORMATS; a new one is an `encode` function plus a `Format` entry.
"""

from deltatune.data.batching import Collator, length_grouped_order
from deltatune.data.config import DataConfig
from deltatune.data.formats import FORMATS, Format
from deltatune.data.load import SUPPORTED, Table, load_table, read_table
from deltatune.data.prepare import TaskData, prepare_data, split_table

__all__ = ["FORMATS", "SUPPORTED", "Collator", "DataConfig", "Format", "Table", "TaskData", "length_grouped_order",
           "load_table", "prepare_data", "read_table", "split_table"]
