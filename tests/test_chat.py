"""Multi-turn chat: streamed replies equal non-streamed greedy generation of the same history; history handling."""

from __future__ import annotations

import pytest

from deltatune.errors import ConfigError
from deltatune.generation.sampling import Sampling, generate
from deltatune.generation.generator import Conversation, Generator
from deltatune.generation.prompts import render_chat
from tests.tiny_lm import CHATML, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def generator() -> Generator:
    tokenizer = tiny_tokenizer()
    return Generator(tiny_llama(tokenizer), tokenizer)


def expected_reply(generator: Generator, messages: list[dict], sampling: Sampling) -> str:
    """Non-streamed greedy generation for the rendered history (the reference for the chat)."""
    prompt = render_chat(generator.tokenizer, messages, CHATML)
    return generate(generator.model, generator.tokenizer, [prompt], sampling, add_special_tokens=False)[0]


def test_streamed_replies_equal_non_streamed_generation_over_several_turns(generator):
    sampling = Sampling(max_new_tokens=10, stop=["o"])
    chat = Conversation(generator, sampling, system="be brief")
    history = [{"role": "system", "content": "be brief"}]
    for text in ["hello", "how are you?", "what is your name?"]:
        pieces: list[str] = []
        reply = chat.reply(text, on_text=pieces.append)
        history.append({"role": "user", "content": text})
        assert "".join(pieces) == reply == expected_reply(generator, history, sampling)
        history.append({"role": "assistant", "content": reply})
    assert chat.messages == history


def test_reset_keeps_only_the_system_prompt(generator):
    sampling = Sampling(max_new_tokens=4)
    chat = Conversation(generator, sampling, system="sys")
    first = chat.reply("hello")
    chat.reply("more")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "sys"}]
    assert chat.reply("hello") == first


def test_old_turns_are_dropped_when_the_history_outgrows_the_context(generator):
    sampling = Sampling(max_new_tokens=40)  # the context is 128 tokens
    chat = Conversation(generator, sampling, system="sys")
    for text in ["the quick brown fox", "jumps over the lazy dog", "hello world", "how are you today?"]:
        reply = chat.reply(text)
        prompt = render_chat(generator.tokenizer, chat.messages[:-1], CHATML)
        assert len(generator.tokenizer(prompt)["input_ids"]) + 40 <= 128
        assert reply == expected_reply(generator, chat.messages[:-1], sampling)
    assert chat.messages[0] == {"role": "system", "content": "sys"}
    assert "the quick brown fox" not in [m["content"] for m in chat.messages]  # the first exchange is gone
    assert chat.messages[-2] == {"role": "user", "content": "how are you today?"}


def test_a_message_too_long_for_the_context_is_an_error_and_is_not_kept(generator):
    chat = Conversation(generator, Sampling(max_new_tokens=40))
    with pytest.raises(ConfigError, match="the message is too long: it and 40 new tokens do not fit the model's "
                                          "context of 128 tokens"):
        chat.reply("hello world " * 60)
    assert chat.messages == []


def test_an_interrupted_reply_leaves_the_history_as_it_was(generator):
    chat = Conversation(generator, Sampling(max_new_tokens=4), system="sys")
    chat.reply("hello")
    before = list(chat.messages)

    def interrupt(text: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.reply("more", on_text=interrupt)
    assert chat.messages == before


def test_chat_needs_a_template():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        Conversation(Generator(None, tokenizer), Sampling())
