"""TextStream: incremental text equals a full decode at every step; pieces, stop strings, bounded work."""

from __future__ import annotations

from typing import Any

import pytest
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from service.demo import build_word_tokenizer
from service.textstream import PieceDecoder, TextStream, prompt_pieces

from .conftest import WORDS
from .tokenizers_bpe import byte_level_bpe, metaspace_bpe

TOKENIZERS = {"byte_level": byte_level_bpe(), "metaspace": metaspace_bpe(), "word": build_word_tokenizer(WORDS)}
PROMPTS = ["the sea is", "naïve café", "a ship sailed"]


def _decode(tok: Any, ids: list[int]) -> str:
    return str(tok.decode(ids, skip_special_tokens=True))


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_incremental_text_equals_full_decode_at_every_step(name: str, data: st.DataObject) -> None:
    tok = TOKENIZERS[name]
    prompt = tok(data.draw(st.sampled_from(PROMPTS)))["input_ids"]
    generated = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=40))
    generated += tok(" the end", add_special_tokens=False)["input_ids"]  # a clean ending: nothing left pending
    stream, pieces = TextStream(tok, (), prompt), []
    prompt_text = _decode(tok, prompt)
    for i, token in enumerate(generated):
        pieces.append(stream.push(token))
        full = _decode(tok, prompt + generated[: i + 1])
        assert full.startswith(prompt_text)
        want = full[len(prompt_text) :]
        # Text waits only for an incomplete multi-byte character at the end (which decodes as U+FFFD).
        assert want.startswith(stream.text)
        lag = want[len(stream.text) :]
        assert lag == "" or lag.endswith("\ufffd"), (lag, want)
        assert "".join(pieces) == stream.text
    assert stream.text == _decode(tok, prompt + generated)[len(prompt_text) :]
    assert stream.take() + stream.flush() == stream.text


@pytest.mark.parametrize("name", ["byte_level", "metaspace", "word"])
def test_pieces_keep_their_spaces(name: str) -> None:
    tok = TOKENIZERS[name]
    prompt = tok("the sea")["input_ids"]
    ids = tok(" is blue and the sky is grey.", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, (), prompt)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == " is blue and the sky is grey."
    assert pieces[0].startswith(" ")


def test_multibyte_character_split_over_tokens_arrives_whole() -> None:
    tok = TOKENIZERS["byte_level"]
    ids = tok(" 日本", add_special_tokens=False)["input_ids"]
    assert len(ids) > 2  # the characters span several byte tokens
    stream = TextStream(tok, (), tok("the sea")["input_ids"])
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == " 日本" and all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # a token ending mid-character adds nothing until the character is complete


@pytest.mark.parametrize("name", ["byte_level", "metaspace", "word"])
@pytest.mark.parametrize("stop", ["sky", " is", "."])
def test_stop_strings_cut_the_text_and_hold_back_what_they_may_claim(name: str, stop: str) -> None:
    tok = TOKENIZERS[name]
    prompt = tok("the sea")["input_ids"]
    ids = tok(" is blue and the sky is grey.", add_special_tokens=False)["input_ids"]
    stream, sent = TextStream(tok, (stop, "never"), prompt), ""
    for token in ids:
        stream.push(token)
        sent += stream.take()
        assert stop not in sent
        if stream.stopped:
            break
    sent += stream.flush()
    whole = " is blue and the sky is grey."
    assert stream.stopped and sent == stream.text == whole[: whole.find(stop)]


def test_prompt_pieces_concatenate_to_the_decoded_prompt() -> None:
    for tok in TOKENIZERS.values():
        for text in [*PROMPTS, "日本 🙂 ok"]:
            ids = tok(text)["input_ids"]
            pieces = prompt_pieces(tok, ids)
            assert len(pieces) == len(ids) and "".join(pieces) == _decode(tok, ids)


def test_peek_does_not_change_the_stream() -> None:
    tok = TOKENIZERS["metaspace"]
    decoder = PieceDecoder(tok, tok("the sea")["input_ids"])
    ids = tok(" is blue", add_special_tokens=False)["input_ids"]
    assert [decoder.peek(ids[0]), decoder.peek(ids[0])] == [" is", " is"]
    assert [decoder.push(i) for i in ids] == [" is", " blue"]


class _CountingTokenizer:
    """Records the longest id list any `decode` call saw."""

    def __init__(self, tok: transformers.PreTrainedTokenizerBase) -> None:
        self.tok, self.longest, self.calls = tok, 0, 0

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.longest, self.calls = max(self.longest, len(ids)), self.calls + 1
        return str(self.tok.decode(ids, **kwargs))


def test_work_per_token_does_not_grow_with_the_text() -> None:
    tok = TOKENIZERS["byte_level"]
    counting = _CountingTokenizer(tok)
    ids = tok(" the sea is blue and the sky is grey." * 30, add_special_tokens=False)["input_ids"]
    stream = TextStream(counting, ("zzz",), tok("the sea")["input_ids"])
    for token in ids:
        stream.push(token)
        stream.take()
    assert len(ids) > 300
    assert counting.longest <= 8  # a short window, never the whole text
    assert counting.calls <= 2 * len(ids) + 2
    assert stream.text == _decode(tok, ids)
