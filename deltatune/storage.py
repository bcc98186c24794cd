"""Atomic file writes: a file is either the old version or the complete new one, never half-written."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.errors import CheckpointError, ConfigError, DeltaTuneError
from deltatune.safety import check_safetensors_header
from deltatune.safety import read_json as read_json  # the one size-capped JSON reader, also storage.read_json

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success fsync and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise DeltaTuneError(f"no space left on device for {path}: nothing was written (a previous version is "
                                 "unchanged); free some space and try again") from exc
        raise


@contextmanager
def new_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success rename it to `path`, so `path` is never half-written.
    `path` must not exist yet or be an empty folder."""
    path = Path(path)
    check_new_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_new_folder(path: Path) -> None:
    """An output folder must not exist yet, or be empty: nothing of the user's is ever overwritten."""
    check_not_special(path, "output folder")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"output folder {path} already exists and is not empty; choose a new folder")


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    libc = _libc()
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EPERM):
        return False  # not supported here: the caller falls back to two renames
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def check_not_special(path: str | Path, what: str) -> None:
    """ConfigError if `path` is empty, or the current, home or root folder: never a command's output folder."""
    if not str(path).strip():
        raise ConfigError(f"{what} is empty: give a new folder, e.g. runs/my-run")
    where = Path(path).expanduser().resolve()
    special = {Path.cwd().resolve(): "the current folder", Path.home().resolve(): "your home folder",
               Path(where.anchor): "the file system root"}
    if where in special:
        raise ConfigError(f"{what} {path} is {special[where]}: give the output a new folder of its own, "
                          "e.g. runs/my-run")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line, ASCII-escaped: text may hold U+2028, which `str.splitlines` would split on."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors with safetensors (contiguous copies, shared storage broken) atomically."""
    plain = {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous()
             for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(plain, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # safetensors reports I/O errors as text: a full disk must read as one
            if full := next((code for code in DISK_FULL if f"(os error {code})" in str(exc)), None):
                raise OSError(full, os.strerror(full), str(tmp)) from exc
            raise


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; its header size is checked before parsing, and a damaged or hostile
    file is one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    check_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}); restore or re-save it") from None


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shares_storage(t: torch.Tensor, all_tensors: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(o.untyped_storage().data_ptr() == ptr for o in all_tensors.values()) > 1
