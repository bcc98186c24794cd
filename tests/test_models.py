"""load_model: task heads, labels, pad tokens, dtype, and clear errors."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import (
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from deltatune.models.assets import resolve_model_path
from deltatune.errors import ConfigError, DeltaTuneError
from deltatune.models.load import load_model

TEXTS = ["a fine film", "a long and very tedious piece of work"]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer GPT-2 with MiniLM's WordPiece tokenizer stripped of its pad token."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    backend = Tokenizer.from_file(str(resolve_model_path("minilm") / "tokenizer.json"))
    backend.no_padding()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[SEP]", unk_token="[UNK]")
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def test_minilm_classification() -> None:
    model, tokenizer = load_model("minilm", "classification", 2)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.pad_token_id == tokenizer.pad_token_id == 0
    assert set(model.deltatune_new_weights) >= {"classifier.weight", "classifier.bias"}
    assert not any(k.startswith("bert.encoder") for k in model.deltatune_new_weights)
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_minilm_regression_and_labels() -> None:
    model, tokenizer = load_model("minilm", "regression")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    out = model(**tokenizer(TEXTS, padding=True, return_tensors="pt"), labels=torch.tensor([0.5, -1.0]))
    assert out.logits.shape == (2, 1) and out.loss.ndim == 0

    model, _ = load_model("minilm", "classification", id2label={0: "negative", 1: "positive", 2: "neutral"})
    assert model.config.num_labels == 3 and model.config.label2id["positive"] == 1


def test_tiny_gpt2_gets_pad_token(tiny_gpt2: Path) -> None:
    model, tokenizer = load_model(str(tiny_gpt2), "causal_lm")
    assert isinstance(model, GPT2LMHeadModel)
    assert tokenizer.pad_token == "[SEP]" and model.config.pad_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id
    assert model.deltatune_new_weights == []

    # sequence classification on a decoder finds the last real token through config.pad_token_id
    model, tokenizer = load_model(str(tiny_gpt2), "classification", 3, dtype="bfloat16")
    assert isinstance(model, GPT2ForSequenceClassification) and model.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 3)


def test_bad_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="classification.*regression.*causal_lm.*base"):
        load_model("minilm", "translation")
    with pytest.raises(ConfigError, match="num_labels"):
        load_model("minilm", "classification")
    with pytest.raises(ConfigError, match="id2label"):
        load_model("minilm", "classification", 2, id2label={0: "a", 1: "b", 2: "c"})
    with pytest.raises(ConfigError, match="float32"):
        load_model("minilm", "base", dtype="float8")


def test_bad_paths_raise_deltatune_error(tmp_path: Path) -> None:
    with pytest.raises(DeltaTuneError, match="/no/such/model"):
        load_model("/no/such/model", "base")
    with pytest.raises(DeltaTuneError, match=f"{tmp_path}.*config.json"):
        load_model(str(tmp_path), "base")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(DeltaTuneError, match=str(tmp_path)):
        load_model(str(tmp_path), "base")
