"""Tiny random-weight models built from configs, shared by the tests."""

from __future__ import annotations

import copy

import torch
import transformers as T

from deltatune.delta import Delta, DeltaConfig

VOCAB = 96


DROPOUT_KEYS = {"gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "llama": ("attention_dropout",),
                "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob")}


def tiny_config(arch: str, dropout: float | None = None, **extra):
    """A 2-layer config of `arch`; `dropout` (if given) sets every dropout probability of the family."""
    common = {"vocab_size": extra.pop("vocab_size", VOCAB), "pad_token_id": 0}
    if dropout is not None:
        extra.update(dict.fromkeys(DROPOUT_KEYS[arch], dropout))
    if arch == "gpt2":
        return T.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2,
                            **common, **extra)
    if arch == "llama":
        return T.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                             **common, **extra)
    if arch == "bert":
        return T.BertConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            max_position_embeddings=64, **common, **extra)
    raise ValueError(arch)


def tiny_model(arch: str, head: str = "classification", seed: int = 0, num_labels: int = 2,
               dropout: float | None = None) -> torch.nn.Module:
    """A tiny model with random weights: `head` is "classification" or "lm"."""
    torch.manual_seed(seed)
    if head == "classification":
        config = tiny_config(arch, dropout, num_labels=num_labels)
        model = T.AutoModelForSequenceClassification.from_config(config)
    else:
        lm_class = T.AutoModelForMaskedLM if arch == "bert" else T.AutoModelForCausalLM
        model = lm_class.from_config(tiny_config(arch, dropout))
    return model.eval()


def tiny_batch(batch: int = 4, length: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded row, so masks matter
    ids[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


class AllParams(DeltaConfig):
    pass


class TrainAll(Delta):
    """Test-only delta (not registered): trains every parameter in place."""

    config_class = AllParams

    def build(self):
        return list(self.model.parameters())


_BIASED: dict[tuple[str, str], torch.nn.Module] = {}


def biased_tiny_model(arch: str, head: str = "lm") -> torch.nn.Module:
    """A fresh copy of one cached tiny model with random biases (HF zero-inits them), so merges' bias handling shows."""
    if (arch, head) not in _BIASED:
        base = tiny_model(arch, head=head)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(std=0.1)
        _BIASED[arch, head] = base
    return copy.deepcopy(_BIASED[arch, head])


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def save_tiny_model_dir(folder, arch: str = "bert", head: str = "classification", dropout: float | None = None):
    """Save a 2-layer random `arch` model with the real MiniLM tokenizer, like any Hugging Face model folder."""
    from deltatune.models.assets import resolve_model_path

    tokenizer = T.AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = tiny_config(arch, dropout, vocab_size=len(tokenizer))
    auto = T.AutoModelForSequenceClassification if head == "classification" else T.AutoModelForCausalLM
    auto.from_config(config).save_pretrained(folder)
    return folder


CHAT_SPECIAL = ("<unk>", "<pad>", "<|im_start|>", "<|im_end|>")


def tiny_chat_tokenizer(chat_template: str | None = None):
    """A fast character-level tokenizer (< VOCAB ids, offsets exact) with ChatML special tokens; eos = <|im_end|>."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = string.ascii_letters + string.digits + " .,?!'\n#:-"
    vocab = {token: i for i, token in enumerate([*CHAT_SPECIAL, *chars])}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(CHAT_SPECIAL))
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                          eos_token="<|im_end|>")
    tokenizer.chat_template = chat_template
    return tokenizer
