"""Offline bridge to lm-evaluation-harness (the `lm_eval` package, the optional `eval` extra): `DeltaLM` implements
its `LM` interface over a deltatune model (any attached delta) and tokenizer, so lm-eval's own task logic
(prompt templates, few-shot, filters, metrics) scores a fine-tuned delta as the field reports it.

Tasks come from local task YAML files: `dataset_path: json` (or csv / parquet) with
`dataset_kwargs: {data_files: ...}`; relative data file names are taken relative to the YAML file, and a
packaged data set alias (e.g. `chatterbot_mc`) names its converted JSONL. Nothing is fetched from a hub. YAML that
runs Python (`!function`) is read only with `trust_remote_code`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from deltatune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from torch import nn

try:
    from lm_eval.api.model import LM
except ImportError as exc:  # the optional extra is missing
    raise ConfigError("the lm-eval bridge needs lm-evaluation-harness: pip install 'deltatune[eval]' "
                      f"(lm_eval==0.4.13) ({exc})") from None

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
BOOTSTRAP_ITERS = 100  # lm-eval's bootstrap standard errors (for metrics without a closed form, e.g. BLEU)


class DeltaLM(LM):
    """lm-eval's model interface over a model with its delta attached; `template` (a chat template's jinja
    source) serves lm-eval's `apply_chat_template`."""

    def __init__(self, model: nn.Module, tokenizer: Any, template: str | None = None, batch_size: int = 8,
                 on_batch: Callable[[int, int], None] | None = None) -> None:
        super().__init__()
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size, self.on_batch = batch_size, on_batch

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        from deltatune.generation.choices import loglikelihoods

        return loglikelihoods(self.model, self.tokenizer, [r.args for r in requests], self.batch_size, self.on_batch)

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Each text's log-likelihood in windows of the model's context (lm-eval's rolling windows: every token
        predicted once, from BOS / EOS for the first)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from deltatune.generation.choices import prefix_id, token_loglikelihoods
        from deltatune.generation.sampling import context_length

        limit = context_length(self.model) or len(self.tokenizer)
        results = []
        for request in requests:
            (text,) = request.args
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=prefix_id(self.tokenizer), max_seq_len=limit, context_len=1)]
            scores = token_loglikelihoods(self.model, windows, self.batch_size)
            results.append(sum(ll for ll, _ in scores))
        return results

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy (or sampled, as the task's generation kwargs say) continuations, cut at the `until` strings."""
        from deltatune.generation.sampling import generate

        outputs: dict[int, str] = {}
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            sampling = _sampling(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                texts = generate(self.model, self.tokenizer, [requests[i].args[0] for i in batch], sampling)
                outputs.update(zip(batch, texts))
        return [outputs[i] for i in range(len(requests))]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        from deltatune.data.chat import render

        if self.template is None:
            raise ConfigError("lm-eval asked for the chat template, but there is none: the run saved none and the "
                              "tokenizer has none (drop --chat)")
        return render(chat_history, self.template, self.tokenizer, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template if chat_template else None


def _sampling(kwargs: dict[str, Any]) -> Any:
    """lm-eval's generation kwargs (until, max_gen_toks, do_sample, temperature) as deltatune Sampling."""
    from deltatune.generation.sampling import Sampling

    until = kwargs.get("until") or []
    temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
    return Sampling(max_new_tokens=int(kwargs.get("max_gen_toks", 256)), temperature=temperature,
                    stop=[until] if isinstance(until, str) else list(until))


def task_configs(path: str | Path, trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """The task configs of a task YAML file, or of every *.yaml in a folder, with their data files resolved
    relative to the YAML and checked to exist."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.yaml"))
        if not files:
            raise ConfigError(f"{path}: no task .yaml files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise ConfigError(f"{path}: no such task YAML file or folder")
    return [_task_config(f, trust_remote_code) for f in files]


def _task_config(file: Path, trust_remote_code: bool) -> dict[str, Any]:
    cfg = _read_task_yaml(file, trust_remote_code)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
        raise ConfigError(f"{file}: a task YAML needs a `task:` name (lm-eval's task config format)")
    if cfg.get("dataset_path") not in LOCAL_BUILDERS:
        raise ConfigError(f"{file}: dataset_path {cfg.get('dataset_path')!r} would be fetched from a hub; use a "
                          f"local builder ({', '.join(LOCAL_BUILDERS)}) with dataset_kwargs: {{data_files: ...}}")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        raise ConfigError(f"{file}: dataset_kwargs.data_files is missing: name the local data file(s)")
    cfg["dataset_kwargs"] = dict(cfg["dataset_kwargs"], data_files=_resolve_files(files, file))
    return cfg


def _read_task_yaml(file: Path, trust_remote_code: bool) -> Any:
    """lm-eval's own reader (includes, `!function` code) when code is allowed; else plain data YAML."""
    if trust_remote_code:
        from lm_eval.tasks._yaml_loader import load_yaml

        return load_yaml(file)
    from deltatune.safety import read_yaml_file

    try:
        return read_yaml_file(file)
    except ConfigError as exc:
        if "!function" in str(exc):
            raise ConfigError(f"{file}: `!function` runs Python code from the task folder; pass "
                              "--trust-remote-code if you trust it") from None
        raise


def _resolve_files(files: Any, yaml_file: Path) -> Any:
    """data_files (a name, a list, or a split -> name(s) mapping) relative to the YAML's folder, each an existing
    file or a packaged data set alias (converted on first use)."""
    if isinstance(files, dict):
        return {split: _resolve_files(names, yaml_file) for split, names in files.items()}
    if isinstance(files, list):
        return [_resolve_files(name, yaml_file) for name in files]
    if not isinstance(files, str):
        raise ConfigError(f"{yaml_file}: dataset_kwargs.data_files holds {files!r}; give file names")
    from deltatune.models.assets import PACKAGED_DATASETS, resolve_data_path

    if files in PACKAGED_DATASETS:
        return str(resolve_data_path(files))
    path = yaml_file.parent / Path(files).expanduser()
    if not path.is_file():
        raise DataError(f"{yaml_file}: data file {str(path)!r} does not exist (data_files are relative to the "
                        "task YAML)")
    return str(path.resolve())


def evaluate_tasks(lm: DeltaLM, tasks: list[dict[str, Any]], *, limit: int | None = None, skip: int = 0,
                   chat: bool = False) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on the task configs (each task's documents after the first `skip`,
    `limit` at most): {"results": {task: {metric: value}}, "samples": {task: [per-document rows]}} (the values
    lm-eval reports; stderr keys end in `_stderr`)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if skip < 0 or (limit is not None and limit < 1):
        raise ConfigError(f"skip must be 0 or more and limit 1 or more (got skip={skip}, limit={limit})")
    manager = TaskManager(include_defaults=False)
    loaded = manager.load(tasks)["tasks"]
    samples = None
    if skip:  # lm-eval selects documents by index (`samples`), with no limit beside it
        samples = {name: _selection(name, len(task.eval_docs), skip, limit) for name, task in loaded.items()}
        limit = None
    out = simple_evaluate(model=lm, tasks=list(loaded.values()), limit=limit, samples=samples, task_manager=manager,
                          apply_chat_template=chat, log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS)
    if out is None:
        raise ConfigError("lm-eval returned no results")
    results = {task: {key.split(",")[0]: value for key, value in metrics.items()
                      if key != "alias" and isinstance(value, (int, float))}
               for task, metrics in out["results"].items()}
    samples = {task: [_sample_row(s) for s in rows] for task, rows in out.get("samples", {}).items()}
    return {"results": results, "samples": samples}


def _selection(task: str, documents: int, skip: int, limit: int | None) -> list[int]:
    if skip >= documents:
        raise ConfigError(f"task {task}: skipping {skip} documents leaves none of its {documents}")
    return list(range(skip, documents if limit is None else min(documents, skip + limit)))


def _sample_row(sample: dict[str, Any]) -> dict[str, Any]:
    """One document's record: its id, the target and the model's (filtered) responses, JSON-ready."""
    return {"doc_id": sample["doc_id"], "target": sample.get("target"),
            "responses": json.loads(json.dumps(sample.get("filtered_resps"), default=str))}
