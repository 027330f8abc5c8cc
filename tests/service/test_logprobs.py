"""Logprobs line up with the text (OpenAI/vLLM shape), the EOS that ends generation is returned, usage chunks.

In-process apps on a tiny random Llama for three tokenizers: the demo's word-level one, a byte-level BPE
(multi-byte characters split over tokens) and a SentencePiece-style (Metaspace) BPE.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.backend import LoadedModel
from service.demo import CHAT_TEMPLATE, build_tiny_llama, build_word_tokenizer
from service.settings import Settings
from service.textstream import PieceDecoder
from service.tokenbytes import TokenBytes

from .conftest import WORDS
from .tokenizers_bpe import byte_level_bpe, metaspace_bpe

NAMES = ["word", "byte_level", "metaspace"]
PROMPT = "the sea is"


def _app(tokenizer: Any, eos: list[int] | None = None) -> TestClient:
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    model = build_tiny_llama(len(tokenizer), seed=1, pad_token_id=tokenizer.pad_token_id, **ids)
    if eos is not None:
        model.generation_config.eos_token_id = eos
    loaded = LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32, 128)
    return TestClient(create_app(Settings(model="unused", served_model_name="tiny", max_logprobs=20), loaded=loaded))


@pytest.fixture(scope="module")
def clients() -> Iterator[dict[str, TestClient]]:
    tokenizers = {"word": build_word_tokenizer(WORDS), "byte_level": byte_level_bpe(), "metaspace": metaspace_bpe()}
    apps = {name: _app(tok) for name, tok in tokenizers.items()}
    for app in apps.values():
        app.__enter__()
    yield apps
    for app in apps.values():
        app.__exit__(None, None, None)


def _complete(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _check_lined_up(text: str, logprobs: dict[str, Any], start: int = 0) -> None:
    tokens, offsets = logprobs["tokens"], logprobs["text_offset"]
    assert "".join(tokens) == text[start:]
    at = start
    for token, offset in zip(tokens, offsets):
        assert offset == at and text[offset : offset + len(token)] == token
        at += len(token)


@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_completion_tokens_are_the_text_pieces(clients: dict[str, TestClient], name: str, echo: bool) -> None:
    out = _complete(clients[name], max_tokens=24, logprobs=5, echo=echo)
    choice = out["choices"][0]
    _check_lined_up(choice["text"], choice["logprobs"])
    tops = choice["logprobs"]["top_logprobs"][1:] if echo else choice["logprobs"]["top_logprobs"]
    assert all(len(top) == 5 for top in tops)  # no two alternatives merged into one key
    generated = out["usage"]["completion_tokens"]
    prompt = out["usage"]["prompt_tokens"]
    assert len(choice["logprobs"]["tokens"]) == generated + (prompt if echo else 0)


def test_alternatives_that_decode_alike_keep_distinct_keys(clients: dict[str, TestClient]) -> None:
    # The word tokenizer's specials all decode to "" and byte tokens ending mid-character do too.
    for name in ("word", "byte_level"):
        out = _complete(clients[name], max_tokens=8, logprobs=20)
        for top in out["choices"][0]["logprobs"]["top_logprobs"]:
            assert len(top) == 20
            assert any(key.startswith("token_id:") for key in top) or len(set(top)) == 20


@pytest.mark.parametrize("name", NAMES)
def test_streamed_logprobs_line_up_across_chunks(clients: dict[str, TestClient], name: str) -> None:
    body: dict[str, Any] = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 24, "logprobs": 2}
    generated = _complete(clients[name], **body)["choices"][0]["text"]
    body.update(echo=True, stream=True, stop=["\u00e9\u00e9\u00e9", generated[6:10]])  # a stop cuts mid-piece
    text, tokens, offsets = "", [], []
    with clients[name].stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                if choice["logprobs"]:
                    tokens += choice["logprobs"]["tokens"]
                    offsets += choice["logprobs"]["text_offset"]
    whole = _complete(clients[name], **{k: v for k, v in body.items() if k not in ("stream", "model", "prompt")})
    assert text == whole["choices"][0]["text"] and whole["choices"][0]["finish_reason"] == "stop"
    _check_lined_up(text, {"tokens": tokens, "text_offset": offsets})


@pytest.mark.parametrize("name", NAMES)
def test_chat_logprob_tokens_keep_their_spaces(clients: dict[str, TestClient], name: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0}
    response = clients[name].post(
        "/v1/chat/completions", json={**body, "max_tokens": 16, "logprobs": True, "top_logprobs": 3}
    )
    choice = response.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    assert all(len(c["top_logprobs"]) == 3 for c in content)
    whole = [c for c in content if c["token"]]  # tokens ending inside a character have no text piece of their own
    assert all(c["bytes"] == list(c["token"].encode()) for c in whole) or name != "word"


@pytest.mark.parametrize("make", [byte_level_bpe, metaspace_bpe])
def test_token_bytes_rebuild_characters_that_tokens_split(make: Any) -> None:
    """Tokens of a text with multi-byte characters: each token's bytes are its own (not empty, not the whole
    character), so they join into the text's bytes, as OpenAI's `bytes` promise."""
    tokenizer = make()
    text = "naïve café said 한국어 Ωμέγα ✓ 日本語 🙂"  # some characters the tokenizers never saw
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder, token_bytes = PieceDecoder(tokenizer), TokenBytes(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "" in pieces  # some token ends inside a character
    joined = b"".join(bytes(token_bytes.of(i, p)) for i, p in zip(ids, pieces, strict=True))
    assert joined.decode().lstrip() == text  # SentencePiece drops the first token's space when it decodes
    assert all(token_bytes.of(i, p) for i, p in zip(ids, pieces, strict=True))


@pytest.mark.parametrize("name", ["byte_level", "metaspace"])
def test_chat_logprobs_give_split_tokens_their_bytes(clients: dict[str, TestClient], name: str) -> None:
    """Sampled from a random model, some tokens end inside a character: their `token` is "" and their `bytes`
    are theirs (empty before); alternatives carry bytes too."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "日本語 🙂"}], "max_tokens": 48}
    split = 0
    for seed in range(8):
        body.update(temperature=1.0, seed=seed, logprobs=True, top_logprobs=2)
        content = clients[name].post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
        split += sum(1 for c in content if not c["token"] and c["bytes"])
        assert all(alt["bytes"] for c in content for alt in c["top_logprobs"] if alt["token"])
    assert split


# ------------------------------------------------------------------------------------------ EOS
@pytest.fixture(scope="module")
def eos_client() -> Iterator[tuple[TestClient, list[int], int]]:
    """A model whose greedy next token after PROMPT is one of its EOS ids (models may have several)."""
    tokenizer = build_word_tokenizer(WORDS)
    prompt = tokenizer(PROMPT)["input_ids"]
    probe = build_tiny_llama(len(tokenizer), seed=1, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        greedy = int(probe(torch.tensor([prompt])).logits[0, -1].argmax())
    with _app(tokenizer, eos=[tokenizer.eos_token_id, greedy]) as client:
        yield client, prompt, greedy


def test_eos_that_ends_generation_is_a_generated_token(eos_client: tuple[TestClient, list[int], int]) -> None:
    client, prompt, _ = eos_client
    scored = _complete(client, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    out = _complete(client, prompt=prompt, max_tokens=1, echo=True, logprobs=1)  # lm-eval's request
    logprobs, choice = out["choices"][0]["logprobs"], out["choices"][0]
    assert len(logprobs["tokens"]) == len(prompt) + 1 and logprobs["tokens"][-1] == ""
    assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 1
    # dropping the last entry (the generated one) leaves exactly the prompt's scores
    assert logprobs["token_logprobs"][:-1] == scored["choices"][0]["logprobs"]["token_logprobs"]
    assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())
    _check_lined_up(choice["text"], logprobs)


def test_eos_is_returned_with_logprobs_and_not_counted_without(eos_client: tuple[TestClient, list[int], int]) -> None:
    client, prompt, _ = eos_client
    out = _complete(client, prompt=prompt, max_tokens=4, logprobs=0)
    assert out["choices"][0]["logprobs"]["tokens"] == [""] and out["usage"]["completion_tokens"] == 1
    assert out["choices"][0]["text"] == ""
    plain = _complete(client, prompt=prompt, max_tokens=4)
    assert plain["usage"]["completion_tokens"] == 0 and plain["choices"][0]["finish_reason"] == "stop"


# ------------------------------------------------------------------------------------------ usage chunk
def _chunks(client: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_include_usage_sends_a_final_usage_chunk(clients: dict[str, TestClient], path: str) -> None:
    client = clients["word"]
    body: dict[str, Any] = {"model": "tiny", "temperature": 0, "max_tokens": 5, "n": 2, "stream": True}
    if path == "/v1/completions":
        body["prompt"] = [PROMPT, "a cat sat"]
    else:
        body["messages"] = [{"role": "user", "content": PROMPT}]
    whole = client.post(path, json={**body, "stream": False}).json()
    plain = _chunks(client, path, body)
    assert all("usage" not in c for c in plain)
    chunks = _chunks(client, path, {**body, "stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert chunks[-1]["id"] == chunks[0]["id"]


def test_stream_options_without_stream_is_a_400(clients: dict[str, TestClient]) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "stream_options": {"include_usage": True}}
    response = clients["word"].post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_stream_options"


def test_openai_client_reads_the_usage_chunk(clients: dict[str, TestClient]) -> None:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=clients["word"])
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.total_tokens > 4
    completions = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    last = list(completions)[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 3


@pytest.mark.parametrize("k", [None, 0])
def test_token_infos_only_when_logprobs_are_asked_for(k: int | None) -> None:
    from service.generation import BatchRunner
    from service.jobs import Event, Job, SamplingParams, TokenEvent

    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_llama(len(tokenizer), seed=1, pad_token_id=tokenizer.pad_token_id)
    events: list[Event] = []
    job = Job(
        tokenizer(PROMPT)["input_ids"], SamplingParams(max_tokens=6, temperature=0, logprobs=k), None, events.append
    )
    BatchRunner(model, tokenizer, torch.device("cpu"), 64).run([job])
    infos = [info for e in events if isinstance(e, TokenEvent) for info in e.tokens]
    assert (infos == []) if k is None else (len(infos) >= 1 and all(i.logprob is not None for i in infos))
