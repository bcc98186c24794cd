"""Run folders: where a run may write, one writer at a time, and what a `--resume` may change.

Every check here reads only; the first write of a run (the lock file, then `config.yaml`) comes after them, so a
refused command leaves the folder exactly as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from deltatune import storage
from deltatune.errors import ConfigError, DeltaTuneError

if TYPE_CHECKING:
    from deltatune.config import RunConfig

CONFIG_NAME = "config.yaml"
LOCK_NAME = ".deltatune.lock"
# What a run writes into its folder: any of these means the folder holds a finished or started run.
RUN_ENTRIES = ("config.yaml", "results.json", "best", "checkpoints", "metrics.jsonl", "metrics.csv", "report.html",
               "tensorboard", "chat_template.jinja", "generations.jsonl", "predictions.jsonl")
# Keys a --resume may change: they do not change what the steps already taken mean. Epochs and max_steps extend
# (or shorten, down to the step reached) the LR schedule; anything else changed is refused.
RESUMABLE = ("output_dir", "eval_generation", "train.epochs", "train.max_steps", "train.eval_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.num_threads",
             "train.eval_batch_size", "train.patience", "train.gradient_checkpointing")


def output_folder(value: str, *, config_path: str | Path | None = None, resume: bool = False) -> Path:
    """The folder `value` (`output_dir`) names, `~` expanded; ConfigError if no run may be written there:
    empty, the current / home / root folder, the config file's own folder (except its run's `config.yaml` on
    --resume), a folder inside another run's folder, an existing file, or a folder this process cannot write
    into."""
    storage.check_not_special(value, "output_dir")
    path = Path(value).expanduser()
    where = path.resolve()
    if config_path is not None:
        config_path = Path(config_path).expanduser().resolve()
        own_run = resume and config_path.name == CONFIG_NAME
        if where == config_path.parent and not own_run:
            raise ConfigError(f"output_dir {value!r} is the folder of the config file {config_path}: the run would "
                              f"write its files among yours (and its own {CONFIG_NAME}); choose a new folder")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir {value!r} is an existing file, not a folder; choose a new folder")
    if inside := next((p for p in where.parents if _is_run(p)), None):
        raise ConfigError(f"output_dir {value!r} is inside the run folder {inside}: a run's folder holds only its own "
                          "files; choose a folder outside it")
    _check_writable(path, value)
    return path


def _check_writable(path: Path, value: str) -> None:
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {value!r} cannot be written: {existing} is read-only for this user or "
                          "not a folder; choose a folder you can write into")


def run_entries(folder: Path) -> list[str]:
    """The names of a run's files and folders present in `folder`."""
    return [name for name in RUN_ENTRIES if (folder / name).exists()] if folder.is_dir() else []


def _is_run(folder: Path) -> bool:
    """`folder` holds a run: its config.yaml and what training wrote (a config.yaml alone may be anyone's)."""
    entries = run_entries(folder)
    return "config.yaml" in entries and len(entries) > 1


def check_run_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """A new run needs a folder without an earlier run (or `overwrite`); a resume needs its checkpoints."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run, or replace it")
    entries = run_entries(folder)
    if resume and not (folder / "checkpoints").is_dir():
        what = f"it holds {', '.join(entries)} but no checkpoints/" if entries else "it holds no run"
        raise ConfigError(f"nothing to resume in {folder}: {what}. Start the run again with --overwrite "
                          "(the earlier files are moved aside), or point output_dir at the run to continue")
    if entries and not resume and not overwrite:
        raise ConfigError(f"{folder} already holds a run ({', '.join(entries)}): continue it with --resume, "
                          f"replace it with --overwrite (its files are moved to {aside_name(folder)}), or "
                          "choose another folder with --set output_dir=...")


def aside_name(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")


def set_aside(folder: Path) -> Path | None:
    """Move the earlier run's files (only those, see RUN_ENTRIES) into a new sibling folder `<name>.old-<time>`;
    nothing is deleted. Returns that folder, or None if there was nothing to move."""
    entries = run_entries(folder)
    if not entries:
        return None
    target, n = aside_name(folder), 1
    while target.exists():
        target, n = target.with_name(f"{aside_name(folder).name}-{n}"), n + 1
    target.mkdir()
    for name in entries:
        os.rename(folder / name, target / name)
    warnings.warn(f"moved the earlier run's files ({', '.join(entries)}) from {folder} to {target}", stacklevel=2)
    return target


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold `folder/.deltatune.lock` (flock'ed, naming pid, host and start time) while the block runs.

    A second holder gets a ConfigError naming the first; a lock file left by a process that died is taken over
    with a warning (the kernel drops a dead process's flock). A folder created here and left empty is removed."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _acquire(path)
    try:
        if (previous := _holder(fd)) and previous.get("pid") != os.getpid():
            warnings.warn(f"took over the lock of {folder} left by pid {previous.get('pid')} on "
                          f"{previous.get('host')} (started {previous.get('started')}), which is no longer running; "
                          "its run stopped without finishing", stacklevel=3)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write_holder(fd, me, folder)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created and not any(folder.iterdir()):
            folder.rmdir()


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(f"{path.parent} is in use by another deltatune process (pid {holder.get('pid')} on "
                              f"{holder.get('host')}, started {holder.get('started')}): wait for it to finish or "
                              "stop it; two runs must not write into one folder") from None
        except OSError as exc:  # e.g. ENOLCK: a network file system without locks
            os.close(fd)
            raise ConfigError(f"cannot lock {path}: {exc.strerror}; put output_dir on a local file system") from exc
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # not unlinked by a holder releasing it meanwhile
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _write_holder(fd: int, me: dict[str, Any], folder: Path) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    except OSError as exc:
        if exc.errno not in storage.DISK_FULL:
            raise
        raise DeltaTuneError(f"no space left on device in {folder}: nothing was written; free some space and "
                             "try again") from exc


def _holder(fd: int) -> dict[str, Any]:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


# ---- what a resume may change --------------------------------------------------------------------------------
def run_record(config: RunConfig) -> dict[str, Any]:
    """The resolved config and the SHA-256 of every data file it reads: saved in each checkpoint."""
    from deltatune.models.assets import resolve_data_path

    files = {}
    for where, data in config.data_configs().items():
        for split in ("train", "validation", "test"):
            if (name := getattr(data, split)) is not None and (path := resolve_data_path(name)).is_file():
                files[f"{where}.{split}"] = {"path": str(path), "sha256": storage.sha256(path)}
    return {"config": json.loads(json.dumps(config.to_dict(), default=str)), "data": files}


def check_resume(folder: Path, saved: dict[str, Any], record: dict[str, Any]) -> None:
    """ConfigError listing every key (old → new) a resume may not change, and every data file whose contents
    changed since the checkpoint was written."""
    old, new = flatten(saved.get("config", {})), flatten(record["config"])
    changed = [f"{key}: {_show(old.get(key))} → {_show(new.get(key))}" for key in sorted(old.keys() | new.keys())
               if old.get(key) != new.get(key) and not key.startswith(RESUMABLE)]
    for key, now in record["data"].items():
        before = saved.get("data", {}).get(key)
        if before is not None and before["sha256"] != now["sha256"]:
            changed.append(f"{key}: the contents of {now['path']} changed since the run started "
                           f"(sha256 {before['sha256'][:12]}… → {now['sha256'][:12]}…)")
    if changed:
        raise ConfigError(f"cannot resume {folder}: the run was trained with other settings or data than given now. "
                          "Changed:\n  " + "\n  ".join(changed) + "\nResume with the run's own config "
                          f"({folder / CONFIG_NAME}) — only {', '.join(RESUMABLE[2:])} may change — or start a "
                          "new run in another folder")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "l": [x]}` -> `{"a.b": 1, "l.0": x}`."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list) and tree:
        return {k: v for i, value in enumerate(tree) for k, v in flatten(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): tree}


def _show(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value)
