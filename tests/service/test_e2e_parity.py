"""The real server (uvicorn subprocess) against the real `peft` package on the same weights."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from .conftest import World, ensure_loaded

pytestmark = pytest.mark.e2e
PROMPTS = ["the sea is", "a cat sat on the", "the sun rose over the hills and"]


@pytest.fixture(scope="module")
def reference(world: World):  # type: ignore[no-untyped-def]
    """PEFT model with every test adapter, plus the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
    base = AutoModelForCausalLM.from_pretrained(world.model_dir, dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, world.adapters["alpha"], adapter_name="alpha").eval()
    for name in ("beta", "gamma"):
        model.load_adapter(world.adapters[name], adapter_name=name)
    return model, tokenizer


def _peft_logprobs(reference, prompt: str, adapters: list[str] | None, scales: dict[str, float] | None = None):  # type: ignore[no-untyped-def]
    model, tokenizer = reference
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if adapters is None:
            with model.disable_adapter():
                logits = model(input_ids=ids).logits
        else:
            model.base_model.set_adapter(adapters)
            saved = _scale_layers(model, scales or {})
            try:
                logits = model(input_ids=ids).logits
            finally:
                _restore_layers(saved)
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return logprobs.gather(1, ids[0, 1:, None])[:, 0].tolist()


def _scale_layers(model, scales: dict[str, float]):  # type: ignore[no-untyped-def]
    from peft.tuners.lokr.layer import LoKrLayer

    saved = []
    for module in model.modules():
        if isinstance(module, LoKrLayer):
            for name, factor in scales.items():
                if name in module.scaling:
                    saved.append((module, name, module.scaling[name]))
                    module.scaling[name] *= factor
    return saved


def _restore_layers(saved) -> None:  # type: ignore[no-untyped-def]
    for module, name, value in saved:
        module.scaling[name] = value


def _peft_greedy(reference, prompt: str, adapter: str | None, steps: int) -> list[int]:  # type: ignore[no-untyped-def]
    model, tokenizer = reference
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            if adapter is None:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits
            else:
                model.base_model.set_adapter([adapter])
                logits = model(input_ids=ids).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def _completion_text(tokenizer, prompt: str, generated: list[int]) -> str:  # type: ignore[no-untyped-def]
    """What follows the prompt in the decoded prompt + completion (keeps the separating space, as OpenAI)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full = tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
    return str(full[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)) :])


def _server_scores(client: httpx.Client, model: str, prompt: str, **extra: object) -> list[float]:
    body = {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0, **extra}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["token_logprobs"][1:]


@pytest.mark.parametrize("adapter", ["alpha", "beta", "gamma", None])
def test_scores_match_peft(client: httpx.Client, reference, adapter: str | None) -> None:  # type: ignore[no-untyped-def]
    for name in ("alpha", "beta", "gamma"):
        ensure_loaded(client, name)
    for prompt in PROMPTS:
        got = _server_scores(client, adapter or "tiny", prompt)
        want = _peft_logprobs(reference, prompt, None if adapter is None else [adapter])
        assert got == pytest.approx(want, abs=2e-4)


def test_adapters_change_scores(client: httpx.Client) -> None:
    ensure_loaded(client, "alpha")
    assert _server_scores(client, "alpha", PROMPTS[0]) != pytest.approx(_server_scores(client, "tiny", PROMPTS[0]))


def test_greedy_text_matches_peft(client: httpx.Client, reference) -> None:  # type: ignore[no-untyped-def]
    ensure_loaded(client, "alpha")
    _, tokenizer = reference
    for adapter in ("alpha", None):
        for prompt in PROMPTS:
            want_ids = _peft_greedy(reference, prompt, adapter, steps=8)
            body = {"model": adapter or "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
            got = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            assert got == _completion_text(tokenizer, prompt, want_ids)


def test_composition_matches_peft_with_scaled_second_adapter(client: httpx.Client, reference) -> None:  # type: ignore[no-untyped-def]
    for name in ("alpha", "gamma"):
        ensure_loaded(client, name)
    adapters = [{"name": "alpha", "scale": 1.0}, {"name": "gamma", "scale": 0.5}]
    for prompt in PROMPTS:
        got = _server_scores(client, "tiny", prompt, adapters=adapters)
        want = _peft_logprobs(reference, prompt, ["alpha", "gamma"], scales={"gamma": 0.5})
        assert got == pytest.approx(want, abs=2e-4)


def test_openai_client_completions_chat_and_streaming(server, client: httpx.Client, reference) -> None:  # type: ignore[no-untyped-def]
    from openai import OpenAI

    ensure_loaded(client, "alpha")
    oai = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    models = {m.id: m for m in oai.models.list().data}
    assert {"tiny", "alpha"} <= set(models)
    assert oai.models.retrieve("alpha") == models["alpha"] and oai.models.retrieve("tiny") == models["tiny"]
    assert oai.models.list().data[0].created == models["tiny"].created  # the base's: when the server started

    completion = oai.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    _, tokenizer = reference
    want = _completion_text(tokenizer, PROMPTS[1], _peft_greedy(reference, PROMPTS[1], "alpha", 6))
    assert completion.choices[0].text == want
    assert completion.usage is not None and completion.usage.completion_tokens <= 6

    stream = oai.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == want

    chat = oai.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "the sea"}], max_tokens=5, temperature=0
    )
    text = chat.choices[0].message.content
    assert isinstance(text, str) and chat.choices[0].finish_reason in ("stop", "length")
    chunks = oai.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "the sea"}], max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text

    composed = oai.completions.create(
        model="tiny",
        prompt=PROMPTS[0],
        max_tokens=0,
        echo=True,
        logprobs=0,
        extra_body={"adapters": [{"name": "alpha", "scale": 1.0}]},
    )
    assert composed.choices[0].logprobs is not None
    got = composed.choices[0].logprobs.token_logprobs[1:]
    assert got == pytest.approx(_server_scores(client, "alpha", PROMPTS[0]), abs=1e-6)


def test_stop_strings_and_max_tokens(client: httpx.Client) -> None:
    ensure_loaded(client, "alpha")
    full = client.post(
        "/v1/completions", json={"model": "alpha", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0}
    ).json()["choices"][0]
    assert full["finish_reason"] in ("length", "stop")
    words = full["text"].split()
    if len(words) >= 3:
        stop = words[2]
        cut = client.post(
            "/v1/completions",
            json={"model": "alpha", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 0, "stop": [stop]},
        ).json()["choices"][0]
        assert cut["finish_reason"] == "stop"
        assert cut["text"] == full["text"][: full["text"].find(stop)]


def test_seeded_sampling_is_reproducible(client: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    second = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert first == second
    body["n"] = 3
    choices = client.post("/v1/completions", json=body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]


def test_sse_stream_format(client: httpx.Client) -> None:
    ensure_loaded(client, "alpha")
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 3, "stream": True, "temperature": 0}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_echo_text_is_prompt_plus_completion(client: httpx.Client, reference) -> None:  # type: ignore[no-untyped-def]
    ensure_loaded(client, "alpha")
    _, tokenizer = reference
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]["text"]
    assert plain.startswith(" ")  # the separator between prompt and completion is part of the completion
    assert echoed == PROMPTS[0] + plain
    want = _completion_text(tokenizer, PROMPTS[0], _peft_greedy(reference, PROMPTS[0], "alpha", 5))
    assert plain == want
