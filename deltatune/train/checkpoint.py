"""Training checkpoints for exact resume: atomic, checksummed, pickle-free.

`checkpoints/step-{N:08d}/` holds
  delta.safetensors + delta.json      the delta's tensors (`delta.save`)
  optimizer.safetensors + .json       optimizer state: tensors in safetensors, param_groups and scalars in JSON
  scheduler.json                      LR scheduler state
  rng.safetensors + rng.json          torch RNG state (uint8 tensor); python `random` and numpy states
  state.json                          the loop's own state (epoch, batch, step, best metric, ...)
  checksums.json                      sha256 of every file above, written last and verified on load
A checkpoint is written into a hidden temporary folder and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltatune import storage
from deltatune.delta import TENSOR_FILE, DeltaBase, read_delta_config
from deltatune.fingerprint import check_finite
from deltatune.errors import CheckpointError, DeltaTuneError
from deltatune.safety import inside

NAME = re.compile(r"^step-(\d{8})$")
CHECKSUMS = "checksums.json"


@dataclass
class Checkpoint:
    """A verified, loaded checkpoint: apply it with the matching `load_state_dict` calls and `set_rng_state`."""

    path: Path
    step: int
    delta: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any]
    base: dict[str, Any]  # fingerprint of the base model the delta was trained on


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and NAME.match(p.name)), key=lambda p: p.name)


def checkpoint_path(root: str | Path, step: int) -> Path:
    """The folder of checkpoint `step` under `root`."""
    return Path(root) / f"step-{step:08d}"


def save_checkpoint(root: str | Path, step: int, *, delta: DeltaBase, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints."""
    root = Path(root)
    final = checkpoint_path(root, step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        delta.save(tmp)
        tensors, meta = encode(optimizer.state_dict(), "optimizer")
        storage.save_tensors(tmp / "optimizer.safetensors", tensors)
        storage.write_json(tmp / "optimizer.json", meta)
        tensors, meta = encode(scheduler.state_dict(), "scheduler")
        if tensors:
            raise CheckpointError("the LR scheduler state holds tensors; only plain values are supported")
        storage.write_json(tmp / "scheduler.json", meta)
        rng_tensors, rng_json = get_rng_state()
        storage.save_tensors(tmp / "rng.safetensors", rng_tensors)
        storage.write_json(tmp / "rng.json", rng_json)
        storage.write_json(tmp / "state.json", {"step": step, **state})
        storage.write_json(tmp / CHECKSUMS, {p.name: storage.sha256(p) for p in sorted(tmp.iterdir())})
        replace_dir(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, DeltaTuneError) and isinstance(exc.__cause__, OSError):  # e.g. the disk is full
            kept = checkpoint_dirs(root)
            then = (f"the previous checkpoint {kept[-1]} is unchanged. Free some space and continue with --resume"
                    if kept else "there is no earlier checkpoint. Free some space and start the run again")
            raise CheckpointError(f"checkpoint {final.name} was not written: {exc.__cause__.strerror}; {then}") \
                from exc
        raise
    for old in checkpoint_dirs(root)[:-max(keep, 1)]:
        trash = old.with_name(f".{old.name}.deleting")  # gone in one rename: never a half-deleted step-N
        old.rename(trash)
        shutil.rmtree(trash)
    return final


def load_latest(root: str | Path) -> Checkpoint:
    """The newest checkpoint that verifies; a broken newer one is skipped with a warning."""
    root = Path(root)
    dirs = checkpoint_dirs(root)
    if not dirs:
        raise CheckpointError(f"nothing to resume in {root}: no checkpoints (step-*) found; "
                              "start without resume, or point to the output folder of an earlier run")
    errors = []
    for path in reversed(dirs):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            warnings.warn(f"skipped {len(errors)} broken checkpoint(s) ({'; '.join(errors)}); "
                          f"resuming from the previous good one, {path.name}", stacklevel=2)
        return ckpt
    raise CheckpointError(f"no usable checkpoint in {root}: " + "; ".join(errors))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Verify the checksums of one checkpoint folder and read it; CheckpointError if anything is off."""
    path = Path(path)
    try:
        sums = storage.read_json(path / CHECKSUMS)
        if not isinstance(sums, dict):
            raise CheckpointError(f"{path / CHECKSUMS}: expected an object of file name -> SHA-256")
        required = {TENSOR_FILE, "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors",
                    "rng.json", "state.json"}
        if missing := sorted(required - set(sums)):
            raise CheckpointError(f"{path.name} lacks {', '.join(missing)}")
        for name, digest in sums.items():
            if not inside(path, name, str(path / CHECKSUMS)).is_file() or storage.sha256(path / name) != digest:
                raise CheckpointError(f"{path / name} is missing or corrupted (checksum mismatch)")
        optimizer = decode(storage.read_json(path / "optimizer.json"),
                           storage.load_tensors(path / "optimizer.safetensors"))
        state = storage.read_json(path / "state.json")
        delta = storage.load_tensors(path / TENSOR_FILE)
        check_finite(delta, str(path / TENSOR_FILE))
        return Checkpoint(path=path, step=int(state["step"]), delta=delta, base=read_delta_config(path)["base"],
                          optimizer=optimizer, scheduler=decode(storage.read_json(path / "scheduler.json"), {}),
                          rng={"tensors": storage.load_tensors(path / "rng.safetensors"),
                               **storage.read_json(path / "rng.json")}, state=state)
    except CheckpointError:
        raise
    except Exception as exc:  # unreadable JSON/safetensors, missing keys: the checkpoint is unusable
        raise CheckpointError(f"{path} is unreadable: {type(exc).__name__}: {exc}") from None


def set_aside_newer(root: str | Path, step: int) -> list[Path]:
    """Rename checkpoints newer than `step` (skipped as broken) to `*.corrupt`, so new ones can take their place;
    delete the temporary folders of saves that were interrupted."""
    for leftover in Path(root).glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    moved = []
    for path in checkpoint_dirs(root):
        if int(NAME.match(path.name)[1]) > step:
            target = path.with_name(path.name + ".corrupt")
            shutil.rmtree(target, ignore_errors=True)
            path.rename(target)
            moved.append(target)
    return moved


# ---- RNG -----------------------------------------------------------------------------------------------------
def get_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(rng: dict[str, Any]) -> None:
    tensors = rng["tensors"]
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- state dicts without pickle ------------------------------------------------------------------------------
def encode(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state dict into tensors (by generated key) and a JSON tree that refers to them.

    Dicts with non-string keys (the optimizer's `state` is keyed by int) keep their key types; tuples become lists.
    Anything else (arbitrary objects) is refused rather than pickled.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[key] = x.detach().cpu()
            return {"__tensor__": key}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and "__tensor__" not in x and "__items__" not in x:
                return {k: walk(v, f"{key}.{k}") for k, v in x.items()}
            if all(isinstance(k, (int, str)) and not isinstance(k, bool) for k in x):
                return {"__items__": [[k, walk(v, f"{key}.{k}")] for k, v in x.items()]}
        raise CheckpointError(f"cannot checkpoint {key} of type {type(x).__name__} without pickle")

    return tensors, walk(obj, where)


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [decode(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__items__" in tree:
            return {k: decode(v, tensors) for k, v in tree["__items__"]}
        return {k: decode(v, tensors) for k, v in tree.items()}
    return tree


def save_delta(delta: DeltaBase, folder: Path, files: dict[str, str] | None = None) -> None:
    """Save the delta (and text `files`) into a temporary folder and swap it in for `folder`: `folder` is always
    either the complete old or the complete new delta."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        delta.save(tmp)
        for name, text in (files or {}).items():
            storage.write_text(tmp / name, text)
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename folder `src` onto `dst`. An existing `dst` is swapped with `src` in one step where the file system
    can (renameat2 RENAME_EXCHANGE), else moved aside first; then the old contents are removed."""
    if dst.exists() and storage.exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)
    else:
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
