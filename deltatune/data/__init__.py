"""Data: read files, validate records, split, tokenize per task format, and batch.

Formats (classification, regression, text, and the SFT formats alpaca, sharegpt, messages) live in FORMATS; a new
one is an `encode` function plus a `Format` entry. chat.py renders conversations with chat templates and masks
the prompt; packing.py packs causal-LM examples into rows without padding.
"""

from deltatune.data.batching import Collator, length_grouped_order, real_tokens
from deltatune.data.chat import TEMPLATE_FILE, TEMPLATES, resolve_template
from deltatune.data.config import CHAT_FORMATS, LM_FORMATS, Columns, DataConfig
from deltatune.data.formats import FORMATS, Format
from deltatune.data.load import SUPPORTED, Table, load_table, read_table
from deltatune.data.prepare import TaskData, prepare_data, split_table

__all__ = ["CHAT_FORMATS", "FORMATS", "LM_FORMATS", "SUPPORTED", "TEMPLATES", "TEMPLATE_FILE", "Collator", "Columns",
           "DataConfig", "Format", "Table", "TaskData", "length_grouped_order", "load_table", "prepare_data",
           "read_table", "real_tokens", "resolve_template", "split_table"]
