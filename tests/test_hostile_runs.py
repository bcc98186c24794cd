"""Nothing lost, no silent wrong result on --resume (issue #15): every refused command leaves the run folder
byte for byte as it was (each file hashed before and after); the ones that go ahead do what they say."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from launch import ROOT, best_delta, cli_run, env, metrics, snapshot, text_rows, write_config, write_jsonl
from tiny import save_tiny_model_dir

from deltatune import cli, storage
from deltatune.config import load_config
from deltatune.errors import ConfigError
from deltatune.optim.schedule import lr_factor
from deltatune.runs.session import run_training
from deltatune.runs.folder import LOCK_NAME, output_folder, run_lock
from deltatune.train.checkpoint import checkpoint_dirs, load_checkpoint, replace_dir

STEPS = 12  # 24 examples, batch 4, 2 epochs


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny GPT-2 + LoRA run config (dropout on, so the RNG state matters) and its data, in `cfg/`."""
    tmp = tmp_path_factory.mktemp("hostile")
    model = save_tiny_model_dir(tmp / "gpt2", "gpt2", head="lm", dropout=0.1)
    (tmp / "cfg").mkdir()
    data = {"train": str(write_jsonl(tmp / "cfg" / "train.jsonl", text_rows(24, 0))), "format": "text",
            "max_length": 32, "validation": str(write_jsonl(tmp / "cfg" / "val.jsonl", text_rows(6, 1))),
            "split": [1.0, 0.0, 0.0]}
    return write_config(tmp / "cfg" / "config.yaml", model={"path": str(model)}, data=data,
                        delta=[{"method": "lora", "r": 4, "dropout": 0.1, "targets": ["c_attn", "c_proj"]}],
                        train={"epochs": 2, "batch_size": 4, "eval_every": 4, "keep_checkpoints": 2,
                               "optimizer": {"lr": 0.01, "warmup_steps": 2}},
                        output_dir=str(tmp / "unused"))


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory) -> Path:
    """A finished run of `setup` (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", str(setup), "--set", f"output_dir={out}"]) == 0
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def refused(run_dir: Path, *args: str) -> str:
    """The CLI's error for `args`, asserting exit code 1 and that no file under `run_dir` changed."""
    before = snapshot(run_dir) if run_dir.exists() else None
    code, out = cli_run(*args)
    assert code == 1, out
    assert (snapshot(run_dir) if run_dir.exists() else None) == before
    return out


# ---- 1. a run folder is never written into without --resume or --overwrite ------------------------------------
@pytest.mark.parametrize("entry", ["config.yaml", "results.json", "best", "metrics.jsonl", "checkpoints"])
def test_a_folder_holding_any_part_of_a_run_is_refused(setup, run, tmp_path, entry):
    started = tmp_path / "started"
    started.mkdir()
    shutil.copytree(run / entry, started / entry) if (run / entry).is_dir() else shutil.copy(run / entry, started)
    out = refused(started, "train", str(setup), "--set", f"output_dir={started}")
    assert f"error: {started} already holds a run ({entry}): continue it with --resume, replace it with " \
           "--overwrite" in out


@pytest.mark.parametrize("where", [".", "", " ", "config folder", "a file", "home"])
def test_output_dirs_no_run_may_use(setup, tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "a file").write_text("mine")
    value = {"config folder": str(setup.parent), "home": "~"}.get(where, where)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        run_training(load_config(setup).model_copy(update={"output_dir": value}), config_path=setup)
    assert snapshot(tmp_path) == before
    expected = {".": "is the current folder", "": "output_dir is empty", " ": "output_dir is empty",
                "config folder": "is the folder of the config file", "a file": "is an existing file, not a folder",
                "home": "is your home folder"}[where]
    assert expected in str(err.value)


def test_a_run_inside_another_runs_folder_is_refused(setup, run):
    out = refused(run, "train", str(setup), "--set", f"output_dir={run}/best/nested")
    assert f"error: output_dir '{run}/best/nested' is inside the run folder {run}: a run's folder holds only its " \
           "own files" in out


def test_read_only_output_dir_is_one_config_error(tmp_path):
    if os.geteuid() == 0:  # root writes into a 0555 folder: only a read-only mount stops it (see the tmpfs test)
        locked = Path("/proc/self")  # a folder nobody can create files in
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match=r"cannot be written: .* is read-only for this user or not a folder"):
        output_folder(str(locked / "run"))


def test_tilde_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert output_folder("~/runs/a") == tmp_path / "runs" / "a"


def test_overwrite_moves_the_old_run_aside_and_trains_anew(setup, run, finished):
    before = snapshot(run)
    (run / "notes.txt").write_text("the user's own file stays where it is")
    code, out = cli_run("train", str(setup), "--set", f"output_dir={run}", "--set", "train.max_steps=3",
                        "--overwrite")
    assert code == 0, out
    [aside] = run.parent.glob("run.old-*")
    assert snapshot(aside) == before  # every file of the old run, unchanged, nothing deleted
    assert "moved the earlier run's files (config.yaml, results.json, best, checkpoints" in out
    assert (run / "notes.txt").read_text() == "the user's own file stays where it is"
    assert json.loads((run / "results.json").read_text())["steps"] == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["max_steps"] == 3


def test_resume_and_overwrite_together_are_refused(setup, run):
    out = refused(run, "train", str(setup), "--set", f"output_dir={run}", "--resume", "--overwrite")
    assert "--resume and --overwrite contradict each other" in out


def test_resume_without_checkpoints_changes_nothing(setup, run):
    shutil.rmtree(run / "checkpoints")
    out = refused(run, "train", str(setup), "--set", f"output_dir={run}", "--resume")
    board = ", tensorboard" if (run / "tensorboard").is_dir() else ""  # with the optional tensorboard package
    assert f"nothing to resume in {run}: it holds config.yaml, results.json, best, metrics.jsonl, metrics.csv, " \
           f"report.html{board} but no checkpoints/" in out


def test_a_failed_run_leaves_no_folder_behind(setup, tmp_path):
    out = tmp_path / "new"
    code, printed = cli_run("train", str(setup), "--set", f"output_dir={out}", "--set", "data.label_column=x",
                            "--set", "data.format=classification")
    assert code == 1, printed
    assert not out.exists()  # validated (data included) before the first write: a retry needs no --overwrite


# ---- 2. and 6. a refused --resume changes nothing; what a resume may change -------------------------------------
@pytest.mark.parametrize("change, listed", [
    (["train.optimizer.lr=0.02"], "train.optimizer.lr: 0.01 → 0.02"),
    (["train.optimizer.schedule=cosine"], 'train.optimizer.schedule: "linear" → "cosine"'),
    (["train.optimizer.warmup_steps=3"], "train.optimizer.warmup_steps: 2 → 3"),
    (["train.batch_size=2", "train.seed=5"], "train.batch_size: 4 → 2\n  train.seed: 0 → 5"),
    (["delta.0.r=8"], "delta.0.r: 4 → 8"),
    (["data.max_length=16"], "data.max_length: 32 → 16"),
])
def test_resume_with_changed_settings_is_refused_listing_each(setup, run, change, listed):
    args = [a for c in change for a in ("--set", c)]
    out = refused(run, "train", str(setup), "--set", f"output_dir={run}", *args, "--resume")
    assert f"error: cannot resume {run}: the run was trained with other settings or data than given now. " \
           f"Changed:\n  {listed}\nResume with the run's own config ({run}/config.yaml)" in out


def test_resume_with_changed_data_contents_is_refused(setup, run, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = text_rows(24, 0)
    rows[3]["text"] = "an edited record"
    write_jsonl(data, rows)
    config = yaml.safe_load(setup.read_text())
    digest = storage.sha256(config["data"]["train"])
    shutil.copy(config["data"]["train"], tmp_path / "kept.jsonl")
    shutil.copy(data, config["data"]["train"])  # same path, other contents
    try:
        out = refused(run, "train", str(setup), "--set", f"output_dir={run}", "--resume")
    finally:
        shutil.copy(tmp_path / "kept.jsonl", config["data"]["train"])
    assert f"data.train: the contents of {config['data']['train']} changed since the run started " \
           f"(sha256 {digest[:12]}… → {storage.sha256(data)[:12]}…)" in out


def test_eval_after_a_refused_resume_uses_the_runs_own_data(setup, run, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", text_rows(24, 7))
    refused(run, "train", str(setup), "--set", f"output_dir={run}", "--set", f"data.train={other}", "--resume")
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["train"] == yaml.safe_load(
        setup.read_text())["data"]["train"]


def test_resume_cannot_shorten_below_the_step_reached(setup, run):
    out = refused(run, "train", str(setup), "--set", f"output_dir={run}", "--set", "train.max_steps=5", "--resume")
    assert f"error: cannot resume {run}: it is at step {STEPS} already, but epochs / max_steps now allow only 5 " \
           "steps" in out


def test_an_early_stopped_run_is_not_extended_silently(setup, run):
    state_file = checkpoint_dirs(run / "checkpoints")[-1] / "state.json"
    state = json.loads(state_file.read_text())
    storage.write_json(state_file, {**state, "stopped_early": True})
    sums = json.loads((state_file.parent / "checksums.json").read_text())
    storage.write_json(state_file.parent / "checksums.json", {**sums, "state.json": storage.sha256(state_file)})
    out = refused(run, "train", str(setup), "--set", f"output_dir={run}", "--set", "train.epochs=3", "--resume")
    assert f"error: cannot extend {run}: it stopped early at step {STEPS} (train.patience: no improvement), " \
           "so more epochs / max_steps would train nothing" in out


def test_resume_with_more_epochs_extends_the_schedule(setup, run):
    """A finished 2-epoch run resumed with epochs=3 trains 6 more steps on the schedule of a 3-epoch run (linear
    decay to 0 at step 18, the same 2 warmup steps): never at LR 0 while the config says 0.01."""
    own = run / "config.yaml"  # the run's own config: its folder is output_dir, allowed with --resume
    code, out = cli_run("train", str(own), "--set", f"output_dir={run}", "--set", "train.epochs=3", "--resume")
    assert code == 0, out
    rows = [r for r in metrics(run) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 19))
    for r in rows[STEPS:]:
        assert r["lr"] == pytest.approx(0.01 * lr_factor("linear", r["step"] - 1, 2, 18), rel=1e-12)
        assert r["lr"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 3
    assert json.loads((run / "results.json").read_text())["steps"] == 18
    state = load_checkpoint(checkpoint_dirs(run / "checkpoints")[-1]).state
    assert state["run"]["config"]["train"]["epochs"] == 3  # the next resume compares against the extended run


def test_checkpoints_record_the_config_and_data_hashes(setup, finished):
    state = load_checkpoint(checkpoint_dirs(finished / "checkpoints")[-1]).state
    config = yaml.safe_load(setup.read_text())
    assert state["run"]["config"]["train"]["optimizer"]["lr"] == 0.01
    assert state["run"]["data"] == {
        f"data.{split}": {"path": config["data"][key], "sha256": storage.sha256(config["data"][key])}
        for split, key in (("train", "train"), ("validation", "validation"))}


def test_the_library_refuses_a_changed_optimizer_on_resume(setup, run):
    """`train(resume=True)` called directly (no run folder checks) still refuses another LR than the run's."""
    from deltatune.runs.session import open_session
    from deltatune.train import train

    config = load_config(setup, [f"output_dir={run}", "train.optimizer.lr=0.5"])
    session = open_session(config)
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"cannot resume .* with other settings than the run used: optimizer: "):
        train(session.model, session.delta, session.data, config.train, run, collate=session.collator(), resume=True)
    assert snapshot(run) == before


# ---- 3. one writer per run folder -------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(setup, run):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from deltatune.runs.folder import run_lock\n"
                               f"with run_lock(Path({str(run)!r})):\n    print('held', flush=True)\n"
                               "    time.sleep(600)"], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(run)
        code, out = cli_run("train", str(setup), "--set", f"output_dir={run}", "--set", "train.epochs=3",
                            "--resume")
        assert code == 1
        assert f"error: {run} is in use by another deltatune process (pid {holder.pid} on {socket.gethostname()}, " \
               "started " in out
        assert "two runs must not write into one folder" in out
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning_and_released(setup, run):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "started": "yesterday"}))
    code, out = cli_run("train", str(setup), "--set", f"output_dir={run}", "--set", "train.epochs=3", "--resume")
    assert code == 0, out
    assert f"warning: took over the lock of {run} left by pid {dead.pid} on elsewhere (started yesterday), which " \
           "is no longer running" in out
    assert not (run / LOCK_NAME).exists()


def test_the_lock_is_released_on_errors(run):
    with pytest.raises(RuntimeError), run_lock(run):
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
        raise RuntimeError
    assert not (run / LOCK_NAME).exists()
    with run_lock(run):  # and can be taken again
        pass


# ---- 4. Ctrl-C / SIGTERM: a checkpoint of the current step, advice that is true ----------------------------------
@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    """The uninterrupted run, with a checkpoint only at epoch ends (so an interruption's checkpoint is its own)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(["train", str(setup), "--set", f"output_dir={out}", "--set", "train.log_every=1"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum, step", [(signal.SIGINT, 3), (signal.SIGTERM, 8)])
def test_signal_saves_the_current_step_and_resume_equals_an_uninterrupted_run(setup, reference, tmp_path, signum,
                                                                              step):
    run = tmp_path / "run"
    args = ["train", str(setup), "--set", f"output_dir={run}", "--set", "train.log_every=1"]
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", *args], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or f'"step": {step},' not in (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.001)
    proc.send_signal(signum)
    printed = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, printed
    saved = checkpoint_dirs(run / "checkpoints")[-1]
    reached = load_checkpoint(saved).step  # the step boundary after the signal (a step may be under way)
    assert step <= reached < STEPS
    assert " ".join(f"training stopped by {signal.Signals(signum).name} at step {reached}: the state after step "
                    f"{reached} is saved in {saved}".split()) in " ".join(printed.split())
    assert f"continue with: deltatune train {setup} --set output_dir={run} --set train.log_every=1 --resume" \
           in " ".join(printed.split())
    assert not (run / LOCK_NAME).exists() and not (run / "results.json").exists()

    assert cli.main([*args, "--resume"]) == 0
    assert metrics(run) == metrics(reference)  # every step once, bitwise the same losses, LRs and evaluations
    for name, value in best_delta(reference).items():
        assert torch.equal(best_delta(run)[name], value), name


def test_a_signal_before_the_first_step_saves_step_0_and_resume_is_exact(setup, reference, tmp_path):
    """SIGINT while the baseline is evaluated: the loop stops at its first step boundary with a step-0 checkpoint."""
    from deltatune.train.interrupt import TrainingInterrupted

    run = tmp_path / "run"
    config = load_config(setup, [f"output_dir={run}", "train.log_every=1"])

    def on_event(kind: str, info: dict) -> None:
        if kind == "start":
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match=rf"training stopped by SIGINT at step 0: the state after step 0 is "
                                                  rf"saved in {run}/checkpoints/step-00000000$"):
        run_training(config, on_event=on_event)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the loop's handler is gone again
    assert not (run / LOCK_NAME).exists()
    code, out = cli_run("train", str(setup), "--set", f"output_dir={run}", "--set", "train.log_every=1", "--resume")
    assert code == 0, out
    assert metrics(run) == metrics(reference)
    for name, value in best_delta(reference).items():
        assert torch.equal(best_delta(run)[name], value), name


# ---- 5. disk full on a real (small) tmpfs ---------------------------------------------------------------------
@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs_keeps_the_previous_checkpoint(setup, tmp_path):
    """tests/tmpfs_worker.py runs in its own mount namespace (`unshare -rm`) on a 2 MB tmpfs: it trains, fills the
    disk, resumes (refused: no space), frees space and resumes to the end. Needs unshare; under CI it must work."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("cannot create a mount namespace for the tmpfs test (unshare -rm): CI must allow it")
        pytest.skip("no user/mount namespaces here (unshare -rm); CI runs this test")
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["unshare", "-rm", sys.executable, str(ROOT / "tests" / "tmpfs_worker.py"), str(setup),
                           str(mount)], env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["full"]["code"] == 1
    assert "no space left on device" in report["full"]["error"].lower()
    assert "the previous checkpoint" in report["full"]["error"] and "is unchanged" in report["full"]["error"]
    assert report["full"]["checkpoint_unchanged"] and report["full"]["best_unchanged"]
    assert report["full"]["no_temporary_files"]
    assert report["no_byte"] == {"code": 1, "unchanged": True, "error": f"error: no space left on device in "
                                 f"{mount}/run: nothing was written; free some space and try again"}
    assert report["resumed"] == {"code": 0, "steps": 6}
    assert report["read_only"]["code"] == 1
    assert "cannot be written" in report["read_only"]["error"] and "read-only" in report["read_only"]["error"]


# ---- 7. more of the same kind ---------------------------------------------------------------------------------
def test_best_is_swapped_in_one_step(tmp_path):
    """replace_dir swaps the new folder in with renameat2(RENAME_EXCHANGE): no moment without `best/`."""
    new, best = tmp_path / ".best.tmp", tmp_path / "best"
    new.mkdir()
    best.mkdir()
    (new / "delta.json").write_text("new")
    (best / "delta.json").write_text("old")
    assert storage.exchange(new, best)
    assert (best / "delta.json").read_text() == "new" and (new / "delta.json").read_text() == "old"
    replace_dir(new, best)  # swaps back, removes the other
    assert (best / "delta.json").read_text() == "old" and not new.exists()


def test_compare_refuses_a_single_runs_folder(setup, finished, tmp_path):
    config = yaml.safe_load(setup.read_text())
    compare_cfg = write_config(tmp_path / "compare.yaml", **{**config, "output_dir": str(finished)},
                               compare={"methods": ["lora"]})
    out = refused(finished, "compare", str(compare_cfg))
    board = ", tensorboard" if (finished / "tensorboard").is_dir() else ""
    assert f"output_dir {finished} holds a single training run (config.yaml, results.json, best, checkpoints, " \
           f"metrics.jsonl, metrics.csv, report.html{board}), not a comparison" in out


def test_compare_force_moves_the_earlier_run_aside(setup, finished, tmp_path):
    config = yaml.safe_load(setup.read_text())
    shutil.copytree(finished, tmp_path / "cmp" / "lora")
    before = snapshot(tmp_path / "cmp" / "lora")
    compare_cfg = write_config(tmp_path / "compare.yaml", **{**config, "output_dir": str(tmp_path / "cmp"),
                                                             "train": {**config["train"], "max_steps": 2}})
    code, out = cli_run("compare", str(compare_cfg), "--methods", "lora", "--force", "--in-process")
    assert code == 0, out
    [aside] = (tmp_path / "cmp").glob("lora.old-*")
    assert snapshot(aside) == {k: v for k, v in before.items() if k != "train.log"}
    assert json.loads((tmp_path / "cmp" / "lora" / "results.json").read_text())["steps"] == 2


def test_export_into_the_current_folder_is_refused(finished, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = refused(tmp_path, "export", str(finished), ".", "--format", "peft")
    assert "output folder . is the current folder" in out


def test_generate_output_never_replaces_an_existing_file(finished, tmp_path):
    mine = tmp_path / "train.jsonl"
    mine.write_text('{"text": "my data"}\n')
    out = refused(tmp_path, "generate", "--run", str(finished), "--prompt", "hi", "--max-new-tokens", "2",
                  "--output", str(mine))
    assert f"--output {mine} already exists: choose a new file name (nothing was generated or written)" in out


def test_interrupt_before_any_checkpoint_says_nothing_was_saved(setup, tmp_path, monkeypatch):
    import deltatune.runs.session as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "open_session", interrupted)
    code, out = cli_run("train", str(setup), "--set", f"output_dir={tmp_path / 'new'}")
    assert code == 130
    assert f"interrupted: nothing was saved in {tmp_path / 'new'} (no checkpoint yet)" in out
    assert not (tmp_path / "new").exists()
