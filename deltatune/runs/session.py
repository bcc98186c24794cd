"""Runs from a config: load model and data, attach the deltas, train, and write the run folder.

A run folder holds `config.yaml` (resolved), `metrics.jsonl/csv`, `checkpoints/`, `best/` (the delta),
`results.json` and `report.html`. `run_session` loads a finished one (runs/run.py: `Run`) for `eval` and `export`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from deltatune.runs import folder as run_folder
from deltatune.config import RunConfig, check_files
from deltatune.data import TEMPLATE_FILE, Collator, TaskData, prepare_data
from deltatune.data.config import CHAT_FORMATS
from deltatune.data.multitask import MultiTaskData, TaskCollator
from deltatune.data.packing import prepare_model
from deltatune.delta import DeltaBase, attach, load
from deltatune.errors import ConfigError
from deltatune.storage import write_json, write_jsonl, write_text
from deltatune.models.load import Pretrained
from deltatune.runs.run import Run
from deltatune.safety import read_yaml_file
from deltatune.train import TrainResult, train
from deltatune.train.checkpoint import Checkpoint, load_latest, save_delta
from deltatune.train.distributed import is_main_process
from deltatune.train.loop import TrainState, check_resumable, planned_steps
from deltatune.train.preference import PreferenceConfig
from deltatune.train.tasks import prepare_tasks, task_deltas

CONFIG_NAME = run_folder.CONFIG_NAME


@dataclass
class Session:
    """Everything a run needs in memory: config, model with its deltas attached, tokenizer, data."""

    config: RunConfig
    model: torch.nn.Module
    tokenizer: Any
    delta: DeltaBase
    data: TaskData | MultiTaskData

    def collator(self) -> Collator | TaskCollator:
        pack_to = self.config.data.max_length if _packs(self.config) else None
        seq2seq = self.config.task == "causal_lm" and getattr(self.model.config, "is_encoder_decoder", False)
        start = self.model.config.decoder_start_token_id if seq2seq else None
        collate = Collator(self.tokenizer.pad_token_id, pack_to=pack_to, decoder_start=start)
        return TaskCollator(collate) if isinstance(self.data, MultiTaskData) else collate


def _check_encoder_decoder(config: RunConfig, base: Pretrained, data_format: str | None) -> None:
    """An encoder-decoder generates a response to a prompt: it trains on prompt -> response data, unpacked."""
    if config.task != "causal_lm" or not base.is_encoder_decoder:
        return
    formats = [data_format] if config.tasks is None else [t.data.format for t in config.tasks]
    if bad := sorted({f for f in formats if f not in (*CHAT_FORMATS, "auto")}):
        raise ConfigError(f"data.format: {', '.join(bad)} has no prompt/response split, which the encoder-decoder "
                          f"{config.model.path} needs (the encoder reads the prompt, the decoder the response); use "
                          f"one of {', '.join(CHAT_FORMATS)}")
    if _packs(config):
        raise ConfigError("data.packing: packed rows are for decoder-only models; an encoder-decoder pads each "
                          "prompt and response instead: set packing: false")
    if config.tasks is None and config.data.train_on_prompt:
        raise ConfigError("data.train_on_prompt: an encoder-decoder reads the prompt with its encoder, so the loss "
                          "can only be on the response: set train_on_prompt: false")


def _preference(config: RunConfig, data: TaskData) -> PreferenceConfig | None:
    """The objective settings of preference pairs (`format: auto` may detect them); refused for other data."""
    if data.task == "preference":
        return config.preference or PreferenceConfig()
    if config.preference is not None:
        raise ConfigError(f"`preference:` needs preference pairs (prompt, chosen, rejected), but {config.data.train} "
                          f"holds {data.format} records; remove `preference:` or use preference data")
    return None


def _packs(config: RunConfig) -> bool:
    """Whether the run packs its batches (data.packing; multi-task runs never do)."""
    return config.tasks is None and config.data.packing


def open_session(config: RunConfig, delta_dir: Path | None = None) -> Session:
    """Load tokenizer, data and model for `config`; attach fresh deltas, or the saved ones in `delta_dir`."""
    torch.manual_seed(config.train.seed)  # new heads and delta tensors start the same way every run
    base = Pretrained.open(config.model.path, trust_remote_code=config.model.trust_remote_code)
    _check_encoder_decoder(config, base, config.data.format if config.tasks is None else None)
    tokenizer = base.tokenizer()
    limit = base.max_length(tokenizer)
    data = (prepare_data(config.data, tokenizer, seed=config.train.seed, model_max_length=limit)
            if config.tasks is None else
            prepare_tasks(config.tasks, config.multitask, tokenizer, seed=config.train.seed, model_max_length=limit))
    if isinstance(data, TaskData):
        _check_encoder_decoder(config, base, data.format)  # the detected format of `format: auto`
        data.preference = _preference(config, data)
    id2label = dict(enumerate(data.label_names)) if data.label_names else None
    # multi-task: the model keeps its saved head's size (task_heads replaces the head)
    num_labels = data.num_labels if config.tasks is None else base.num_labels
    model, _ = base.load(config.task, num_labels, **config.base_precision(), quantize=config.model.quantize,
                         id2label=id2label, tokenizer=tokenizer)
    delta = load(model, delta_dir) if delta_dir else attach(model, task_deltas(config.delta, data))
    if _packs(config):
        prepare_model(model)  # no KV cache; ConfigError unless packed rows keep their examples apart
    return Session(config, model, tokenizer, delta, data)


def run_training(config: RunConfig, *, resume: bool = False, overwrite: bool = False,
                 config_path: str | Path | None = None,
                 on_event: Callable[[str, dict], None] | None = None) -> tuple[Session, TrainResult]:
    """Train as `config` says, writing everything into `config.output_dir` (see runs/folder.py for which folders
    are refused). `resume` continues the run there; `overwrite` first moves an earlier run's files aside.
    Everything is validated before the first write, so a refused command changes nothing on disk."""
    out = run_folder.output_folder(config.output_dir, config_path=config_path, resume=resume)
    main = is_main_process()  # under torchrun only rank 0 checks the folder and writes (the others wait for it)
    if main:
        run_folder.check_run_folder(out, resume=resume, overwrite=overwrite)
    with run_folder.run_lock(out) if main else nullcontext():
        record = run_folder.run_record(config)
        resumed = _check_resume(out, record) if resume and main else None
        session = open_session(config)
        if resumed is not None:
            check_resumable(resumed, config.train, planned_steps(config.train, len(session.data.train)), out)
        if main:
            if overwrite:
                run_folder.set_aside(out)
            write_text(out / CONFIG_NAME, yaml.safe_dump(config.to_dict(), sort_keys=False))
            _save_chat_template(session, out)
        result = train(session.model, session.delta, session.data, config.train, out,
                       collate=session.collator(), resume=resume, on_event=on_event, record=record)
        session.delta.for_inference()  # e.g. prefix-tuning keeps only the prefixes its MLP computed
        if main:
            template = session.data.chat_template
            save_delta(session.delta, out / "best", {TEMPLATE_FILE: template} if template is not None else {})
            _write_predictions(session, out, result)
            if config.eval_generation is not None:
                from deltatune.generation.evaluate import evaluate_after_training

                evaluate_after_training(session, config.eval_generation, out, result, on_event)
            from deltatune.runs.report import write_report

            write_report(out, config, result)
    return session, result


def _write_predictions(session: Session, out: Path, result: TrainResult) -> None:
    """Classification and regression runs: every prediction of the best delta on the test split (else validation)
    into predictions.jsonl, its size and majority-class baseline into results.json (the report's diagnostics)."""
    from deltatune.runs.diagnostics import (PREDICTED_TASKS, PREDICTIONS_FILE, class_names, classification_summary,
                                       predict)

    data = session.data
    split = next((s for s in ("test", "validation") if len(getattr(data, s))), None)
    if isinstance(data, MultiTaskData) or data.task not in PREDICTED_TASKS or split is None:
        return
    batch_size = session.config.train.eval_batch_size or session.config.train.batch_size
    rows = predict(session.model, getattr(data, split), session.collator(), session.tokenizer, data.task,
                   data.label_names, batch_size)
    write_jsonl(out / PREDICTIONS_FILE, rows)
    result.predictions = {"split": split, "examples": len(rows), "file": PREDICTIONS_FILE}
    if data.task == "classification":
        summary = classification_summary(rows, class_names(data.label_names, data.num_labels or 0))
        result.predictions |= {k: summary[k] for k in ("majority_label", "majority_accuracy")}
    write_json(out / "results.json", asdict(result))


def _check_resume(out: Path, record: dict) -> Checkpoint:
    """Refuse a resume whose config or data differ from the run's (run_folder.check_resume); the checkpoint."""
    ck = load_latest(out / "checkpoints")
    state = TrainState.of(ck)  # one CheckpointError if its state.json is not a training state
    saved = state.run
    if saved is None:  # a checkpoint of an older deltatune: its train section, and config.yaml for the rest
        saved_config = read_yaml_file(out / CONFIG_NAME) if (out / CONFIG_NAME).is_file() else {}
        saved = {"config": {**(saved_config if isinstance(saved_config, dict) else {}),
                            "train": state.config}, "data": {}}
    run_folder.check_resume(out, saved, record)
    return ck


def _save_chat_template(session: Session, folder: Path) -> None:
    """The chat template the examples were rendered with, for generation and chat with the trained delta."""
    if session.data.chat_template is not None:
        write_text(folder / TEMPLATE_FILE, session.data.chat_template)


def run_session(run: Run, delta: str | Path | None = None, *, dense: bool = False) -> Session:
    """A finished run in memory for `eval` and `export`: its base model with the best delta (or `delta`, another
    saved delta of the same base, e.g. a merge-deltas result), its tokenizer and data (whose files must still
    exist). `dense`: the base with its checkpoint's own weights even if the run quantized it (for merging)."""
    check_files(run.config)
    config = run.config
    if dense and config.model.quantize:
        config = config.model_copy(update={"model": config.model.model_copy(update={"quantize": None})})
    return open_session(config, delta_dir=run.best if delta is None else Path(delta))
