"""Generation-based evaluation: greedy outputs on held-out prompts scored against reference answers.

Metrics: `exact_match` (same text after lower-casing and collapsing whitespace) and `rougeL` (ROUGE-L F1: longest
common subsequence of the lower-cased whitespace tokens), means over the examples in [0, 1]; `bleu`, sacrebleu's
corpus BLEU (0-100, its default 13a tokenisation, case-sensitive, exponential smoothing) of all answers at once.
Available as `deltatune eval RUN --generate FILE` and as the `eval_generation:` section of a run config.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from deltatune.errors import ConfigError, DataError
from deltatune.generation.sampling import Sampling
from deltatune.generation.generator import Generator
from deltatune.storage import write_json, write_jsonl
from deltatune.generation.prompts import PromptRecord, output_rows, read_prompts

if TYPE_CHECKING:
    from deltatune.generation.config import GenerationEval
    from deltatune.runs.session import Session
    from deltatune.train import TrainResult

GENERATIONS_FILE = "generations.jsonl"


def tokens(text: str) -> list[str]:
    return text.lower().split()


def exact_match(prediction: str, reference: str) -> float:
    return float(tokens(prediction) == tokens(reference))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, one row at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (precision and recall weighted equally); 1.0 when both texts are empty."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = lcs_length(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) of the predictions against one reference each."""
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L, and corpus BLEU, of paired predictions and references."""
    n = len(references)
    return {"exact_match": sum(map(exact_match, predictions, references)) / n,
            "rougeL": sum(map(rouge_l, predictions, references)) / n,
            "bleu": corpus_bleu(predictions, references)}


def reference_records(path: str | Path, limit: int | None = None, skip: int = 0) -> list[PromptRecord]:
    """The prompts of an evaluation file (after the first `skip`), each with its reference answer: the given
    `reference`, or the last assistant turn of its messages (later turns are dropped)."""
    from deltatune.models.assets import resolve_data_path

    if skip < 0 or (limit is not None and limit < 1):
        raise ConfigError(f"skip must be 0 or more and limit 1 or more (got skip={skip}, limit={limit})")
    records = read_prompts(resolve_data_path(str(path)))[skip:]
    records = [_answer_as_reference(r) for r in records[:limit]]
    if not records:
        raise DataError(f"{path}: no records left after skipping {skip}")
    return records


def _answer_as_reference(record: PromptRecord) -> PromptRecord:
    if record.reference is not None:
        return record
    last = max((i for i, m in enumerate(record.messages or ()) if m["role"] == "assistant"), default=0)
    if last == 0:
        raise DataError(f"{record.where}: no reference answer; give a 'reference' next to the 'prompt', or "
                        "'messages' with an assistant turn after a user turn")
    messages = record.messages or ()
    return replace(record, messages=messages[:last], reference=messages[last]["content"])


def evaluate_generation(generator: Generator, records: list[PromptRecord], sampling: Sampling, *,
                        system: str | None = None, batch_size: int = 8,
                        on_batch: Callable[[int, int], None] | None = None) -> tuple[dict[str, float], list[str]]:
    """(metrics, outputs) of the generator's current model on `records` (`on_batch(done, total)` after each
    batch)."""
    outputs = generator.complete(records, sampling, system=system, batch_size=batch_size, on_batch=on_batch)
    return score(outputs, [r.reference or "" for r in records]), outputs


def evaluate_after_training(session: Session, cfg: GenerationEval, out_dir: Path, result: TrainResult,
                            on_event: Callable[[str, dict[str, Any]], None] | None = None) -> None:
    """The `eval_generation` switch: score the fine-tuned model and (when the run evaluates a baseline) the base
    model into `result.generation`, rewrite results.json, and write every answer to generations.jsonl.
    Progress goes to `on_event` as "generation" events (model, done, total). The session keeps its delta attached."""
    records = reference_records(cfg.file, cfg.limit, cfg.skip)
    # the template training rendered with (and saved into best/)
    generator = Generator(session.model, session.tokenizer, out_dir / "best", session.data.chat_template, session.delta)
    emit = on_event or (lambda kind, info: None)

    def options(model: str) -> dict[str, Any]:
        started = time.perf_counter()
        return dict(system=cfg.system, batch_size=cfg.batch_size,
                    on_batch=lambda done, total: emit("generation", {"model": model, "done": done, "total": total,
                                                                     "elapsed": time.perf_counter() - started}))

    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, stop=cfg.stop)  # greedy
    tuned, outputs = evaluate_generation(generator, records, sampling, **options("fine-tuned"))
    base, base_outputs = None, None
    if result.baseline is not None:
        generator.detach_delta()
        base, base_outputs = evaluate_generation(generator, records, sampling, **options("base"))
        generator.attach_delta()
        session.delta = generator.delta
    result.generation = {"file": cfg.file, "examples": len(records), "base": base, "fine_tuned": tuned}
    write_jsonl(out_dir / GENERATIONS_FILE, output_rows(records, outputs, base_outputs))
    write_json(out_dir / "results.json", asdict(result))
