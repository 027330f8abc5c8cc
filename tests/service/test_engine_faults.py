"""A forward that raises fails only its own batch with a 500 that says so; the engine keeps serving."""

from __future__ import annotations

from typing import Any

import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.backend import LoadedModel
from service.demo import build_tiny_llama, build_word_tokenizer
from service.settings import Settings


class _Exploding(torch.nn.Module):
    """Delegates to a model but raises when the input contains `poison`."""

    def __init__(self, model: Any, poison: int) -> None:
        super().__init__()
        self.inner, self.poison = model, poison
        self.generation_config = model.generation_config

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        if bool((input_ids == self.poison).any()):
            raise RuntimeError("boom")
        return self.inner(input_ids=input_ids, **kwargs)


def test_forward_error_fails_only_that_request() -> None:
    tokenizer = build_word_tokenizer(["the", "sea", "is", "calm", "poison"])
    model = build_tiny_llama(len(tokenizer), seed=0)
    poison = tokenizer.convert_tokens_to_ids("poison")
    loaded = LoadedModel(_Exploding(model, poison), tokenizer, torch.device("cpu"), torch.float32, 64)
    app = create_app(Settings(model="unused", served_model_name="tiny"), loaded=loaded)
    with TestClient(app) as client:
        bad = client.post("/v1/completions", json={"model": "tiny", "prompt": "the poison", "max_tokens": 2})
        assert bad.status_code == 500
        assert bad.json()["error"]["code"] == "engine_error"
        assert "forward pass failed" in bad.json()["error"]["message"]
        # max_tokens=1: one forward on the prompt, so a sampled "poison" token is never fed back in
        good = client.post("/v1/completions", json={"model": "tiny", "prompt": "the sea", "max_tokens": 1})
        assert good.status_code == 200
        assert client.get("/ready").status_code == 200
