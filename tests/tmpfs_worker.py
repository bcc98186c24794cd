"""Disk full on a real file system (run by tests/test_hostile_runs.py inside `unshare -rm`, as root of its own
mount namespace): `python tmpfs_worker.py CONFIG MOUNT_POINT` prints one JSON report as its last line.

1. a 2 MB tmpfs on MOUNT_POINT; train 3 steps into it (a checkpoint after every step);
2. fill the disk up to 16 KB, resume to step 6: the next checkpoint does not fit -> the error, the files before;
3. fill it completely: resuming is refused before anything changes;
4. free the space, resume again: the run ends at step 6;
5. a read-only tmpfs as output_dir: one clear error.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

from launch import cli_run, snapshot

from deltatune.train.checkpoint import checkpoint_dirs, load_checkpoint

FREE = 16 * 1024  # less than one checkpoint of the tiny LoRA run, more than its logs and config need


def fill(folder: Path, leave: int) -> Path:
    """A file that takes all the free space of `folder`'s file system but `leave` bytes."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    filler.write_bytes(b"\0" * (filler.stat().st_size - leave))
    return filler


def main(config: str, mount: Path) -> dict:
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    run = mount / "run"
    train = ["train", config, "--set", f"output_dir={run}", "--set", "train.checkpoint_every=1",
             "--set", "train.eval_every=100"]
    code, out = cli_run(*train, "--set", "train.max_steps=3")
    assert code == 0, out
    filler = fill(mount, FREE)
    before, last = snapshot(run), checkpoint_dirs(run / "checkpoints")[-1]
    code, out = cli_run(*train, "--set", "train.max_steps=6", "--resume")
    after = snapshot(run)
    full = {"code": code, "error": next((line for line in out.splitlines() if line.startswith("error")), out),
            "checkpoint_unchanged": {k: v for k, v in after.items() if k.startswith(f"checkpoints/{last.name}")}
            == {k: v for k, v in before.items() if k.startswith(f"checkpoints/{last.name}")}
            and load_checkpoint(last).step == 3,
            "best_unchanged": {k: v for k, v in after.items() if k.startswith("best")}
            == {k: v for k, v in before.items() if k.startswith("best")},
            "no_temporary_files": not [k for k in after if Path(k).name.startswith(".")]}
    filler.unlink()
    filler = fill(mount, 0)  # not a byte left: the first write (the lock's holder) fails, nothing changes
    code, out = cli_run(*train, "--set", "train.max_steps=6", "--resume")
    no_byte = {"code": code, "error": out.strip().splitlines()[-1], "unchanged": snapshot(run) == after}
    filler.unlink()
    code, out = cli_run(*train, "--set", "train.max_steps=6", "--resume")
    resumed = {"code": code, "steps": json.loads((run / "results.json").read_text())["steps"] if code == 0 else out}

    read_only = mount / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], check=True)
    code, out = cli_run(*train, "--set", f"output_dir={read_only / 'run'}")
    return {"full": full, "no_byte": no_byte, "resumed": resumed,
            "read_only": {"code": code, "error": out.strip().splitlines()[-1]}}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
