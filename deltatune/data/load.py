"""Reading data files (.jsonl, .json, .csv, .parquet; .gz/.bz2 for text formats) into tables with record locations."""

from __future__ import annotations

import bz2
import gzip
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset

from deltatune.errors import DataError

_OPENERS: dict[str, Callable[..., IO[str]]] = {".gz": gzip.open, ".bz2": bz2.open}
ENCODING = "utf-8-sig"  # UTF-8; a byte-order mark (as some Windows editors write) is skipped
CHAT_TURNS = ("messages", "conversations")  # a single chat record is one key holding a list of turns
SUPPORTED = ".jsonl, .json, .csv, .parquet (and .jsonl/.json/.csv compressed as .gz or .bz2)"


@dataclass(frozen=True)
class Table:
    """A dataset read from `path`; `positions[i]` is the 1-based line (or record number) of row i in the file."""

    path: Path
    data: Dataset
    positions: list[int]
    by_line: bool = True

    def where(self, i: int) -> str:
        """`file:line` (or `file: record n` for formats without lines) of row i, for error messages."""
        return _where(self.path, self.positions[i], self.by_line)

    def select(self, rows: list[int]) -> Table:
        return Table(self.path, self.data.select(rows), [self.positions[i] for i in rows], self.by_line)

    def column(self, name: str) -> list[Any]:
        """All values of a column; DataError listing the columns if the file has no such column."""
        if name not in self.data.column_names:
            raise DataError(f"{self.path}: no column {name!r} (columns: {', '.join(self.data.column_names)})")
        return self.data[name][:]


def load_table(path: str | Path) -> Dataset:
    """Read a data file into a Dataset; any problem with the file is one DataError naming file (and line)."""
    return read_table(path).data


def read_table(path: str | Path) -> Table:
    """Read a data file into a Table (Dataset plus the line of each record)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    name = path.name.lower()
    compression = next((c for c in _OPENERS if name.endswith(c)), "")
    kind = Path(name.removesuffix(compression)).suffix
    reader = _READERS.get(kind)
    if reader is None or (compression and kind == ".parquet"):
        raise DataError(f"{path}: unsupported file type; supported: {SUPPORTED}")
    try:
        table = reader(path, _OPENERS.get(compression, open))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read file ({e})") from None
    if len(table.data) == 0:
        raise DataError(f"{path}: no records")
    return table


def _read_jsonl(path: Path, opener: Callable[..., IO[str]]) -> Table:
    records, lines = [], []
    with opener(path, "rt", encoding=ENCODING) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                records.append(_json_object(line.strip(), f"{path}:{n}"))
                lines.append(n)
    return _table(path, records, lines)


def _read_json(path: Path, opener: Callable[..., IO[str]]) -> Table:
    with opener(path, "rt", encoding=ENCODING) as f:
        text = f.read()
    try:
        items = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        if not text.lstrip().startswith("["):  # many ".json" files are JSON lines
            return _read_jsonl(path, opener)
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    except _NonFinite as e:
        raise DataError(f"{path}: {e}") from None
    if isinstance(items, dict):  # one record, unless the records sit in lists
        _check_orientation(items, path)
        return _table(path, [items], [1])
    if not isinstance(items, list):
        raise DataError(f"{path}: expected an array of records or JSON lines, got a JSON {type(items).__name__}")
    records = [_check_object(item, f"{path}: record {i}") for i, item in enumerate(items, 1)]
    return _table(path, records, list(range(1, len(records) + 1)), by_line=False)


def _check_orientation(whole: dict[str, Any], path: Path) -> None:
    """DataError for a JSON object holding the records by column (pandas' default `to_json`: lists, or objects by
    row index) or in a list under one key (`{"data": [...]}`); deltatune reads arrays of records, or JSON lines."""
    fix = ("write one record per line (JSON lines) or an array of records [{...}, {...}], e.g. "
           "pandas.read_json(file).to_json(out, orient='records', lines=True)")
    columns, key = list(whole.values()), next(iter(whole), "")
    if len(whole) == 1 and key not in CHAT_TURNS and isinstance(columns[0], list) and len(columns[0]) > 1 \
            and all(isinstance(v, dict) for v in columns[0]):
        raise DataError(f"{path}: the records are inside the key {key!r} of one JSON object; {fix}")
    by_list = all(isinstance(v, list) and len(v) == len(columns[0]) > 1 and not any(isinstance(x, dict) for x in v)
                  for v in columns)
    by_index = all(isinstance(v, dict) and len(v) > 1 and v.keys() == columns[0].keys() for v in columns)
    if columns and (by_list or by_index):
        raise DataError(f"{path}: one JSON object of columns ({', '.join(map(repr, list(whole)[:4]))}), not a list "
                        f"of records; {fix}")


def _read_csv(path: Path, opener: Callable[..., IO[str]]) -> Table:
    try:  # only empty cells are missing: a text "NA" stays text
        with warnings.catch_warnings():  # rows longer than the header: pandas would drop (or index by) fields
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(path, encoding=ENCODING, keep_default_na=False, na_values=[""], index_col=False)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: malformed CSV (rows have more fields than the header; quote fields that contain "
                        "commas)") from None
    except pd.errors.ParserError as e:
        msg = str(e).strip().removeprefix("Error tokenizing data. C error: ")
        line = re.search(r"line (\d+)", msg)
        raise DataError(f"{path}:{line.group(1)}: malformed CSV ({msg})" if line
                        else f"{path}: malformed CSV ({msg})") from None
    # data row i sits on line i + 2 (after the header) unless quoted fields span lines
    return _table(path, {str(c): df[c].tolist() for c in df.columns}, list(range(2, len(df) + 2)))


def _read_parquet(path: Path, opener: Callable[..., IO[str]]) -> Table:
    table = pq.read_table(path)
    return Table(path, Dataset(table), list(range(1, table.num_rows + 1)), by_line=False)


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _json_object(line: str, where: str) -> dict[str, Any]:
    try:
        return _check_object(json.loads(line, parse_constant=_no_constant), where)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
    except _NonFinite as e:
        raise DataError(f"{where}: {e}") from None


class _NonFinite(ValueError):
    """A NaN or Infinity in a JSON data file (Python's json reads them; they are not JSON)."""


def _no_constant(name: str) -> None:
    raise _NonFinite(f"{name} is not a JSON value (JSON has no NaN or infinity): write a finite number, or null "
                    "for a missing value")


def _check_object(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return item


def _where(path: Path, position: int, by_line: bool) -> str:
    return f"{path}:{position}" if by_line else f"{path}: record {position}"


def _table(path: Path, data: list[dict[str, Any]] | dict[str, list[Any]], positions: list[int],
           by_line: bool = True) -> Table:
    """Records or columns (keys in order of first appearance, absent = null) -> Table; a column of mixed value
    types is a DataError at the first record whose type differs."""
    if isinstance(data, list):
        keys = dict.fromkeys(k for record in data for k in record)
        data = {k: [record.get(k) for record in data] for k in keys}
    arrays = {}
    for name, values in data.items():
        try:
            arrays[name] = pa.array(values, from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
            kinds = [_kind(v) for v in values]
            first = next(k for k in kinds if k != "null")
            i = next((i for i, k in enumerate(kinds) if k not in ("null", first)), None)
            where = _where(path, positions[_first_misfit(values) if i is None else i], by_line)
            if i is None:  # one kind of value, but what is inside (or a number's size) does not fit one type
                raise DataError(f"{where}: column {name!r} cannot hold this record's value ({e}); use one type per "
                                "column, also inside lists and objects, and integers within 64 bits") from None
            raise DataError(f"{where}: column {name!r} holds {values[i]!r} but earlier "
                            f"records hold {first} values; use one type per column ({e})") from None
    return Table(path, Dataset(pa.table(arrays)), positions, by_line)


def _first_misfit(values: list[Any]) -> int:
    """Index of the first value that cannot join the ones before it in one Arrow column (binary search)."""
    fits, fails = 0, len(values)  # values[:fits] convert, values[:fails] do not
    while fails - fits > 1:
        mid = (fits + fails) // 2
        try:
            pa.array(values[:mid], from_pandas=True)
            fits = mid
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            fails = mid
    return fails - 1


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__
