"""Batched sampling: seeded rows reproduce, greedy rows are the argmax, top-p keeps the nucleus only."""

from __future__ import annotations

import torch

from service.jobs import SamplingParams
from service.sampling import choose_tokens, make_generator

CPU = torch.device("cpu")


def test_greedy_and_seeded_rows() -> None:
    logits = torch.randn(4, 50)
    logits[2] = logits[1]
    params = [SamplingParams(4, temperature=0), SamplingParams(4, seed=7), SamplingParams(4, seed=7), SamplingParams(4)]
    first = choose_tokens(logits, params, [make_generator(p, CPU) for p in params])
    again = choose_tokens(logits, params, [make_generator(p, CPU) for p in params])
    assert first[0] == logits[0].argmax()
    assert first[1] == first[2] == again[1]  # same seed, same logits: same draw, whatever the batch


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([[10.0, 9.9, -5.0, -5.0, -5.0]]).repeat(200, 1)
    params = [SamplingParams(1, temperature=1.0, top_p=0.5, seed=i) for i in range(200)]
    tokens = choose_tokens(logits, params, [make_generator(p, CPU) for p in params])
    assert set(tokens.tolist()) <= {0, 1}
    assert tokens.tolist().count(0) > 0
    params = [SamplingParams(1, temperature=1.0, top_p=0.01, seed=i) for i in range(50)]
    assert set(choose_tokens(logits[:50], params, [make_generator(p, CPU) for p in params]).tolist()) == {0}


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    params = [SamplingParams(1, temperature=1.0, seed=i) for i in range(4000)]
    tokens = choose_tokens(logits, params, [make_generator(p, CPU) for p in params])
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
