"""Continuous batching: rows join a running batch mid-flight and leave when done; answers stay exact."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

import lokr
from service.backend import LoadedModel
from service.demo import build_tiny_llama, build_word_tokenizer
from service.engine import Engine
from service.jobs import ErrorEvent, Event, FinishEvent, Job, SamplingParams, TokenEvent
from service.lm import CausalLMBackend
from service.metrics import Metrics

WORDS = ["the", "sea", "is", "blue", "a", "cat", "sat", "on", "mat", "sun", "rose", "over", "hills", "and", "sky"]
PROMPTS = ["the sea is", "a cat sat on the", "the sun rose over the hills and", "sky"]


@pytest.fixture(scope="module")
def engine():  # type: ignore[no-untyped-def]
    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_llama(len(tokenizer), seed=3, max_position_embeddings=256)
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        config = lokr.LoKrConfig(target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, r=2)
        lokr.inject(model, config, name)
    loaded = LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32, 256)
    metrics = Metrics()
    eng = Engine(CausalLMBackend(loaded, metrics, max_batch_size=8), metrics, max_queue=64)
    eng.start()
    yield eng
    eng.stop()


class Collector:
    def __init__(self) -> None:
        self.text, self.tokens, self.done = "", 0, threading.Event()
        self.reason: str | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.text += event.text
            self.tokens += 1
        elif isinstance(event, FinishEvent):
            self.text += event.text
            self.reason = event.reason
            self.done.set()
        elif isinstance(event, ErrorEvent):
            self.reason = repr(event.error)
            self.done.set()


def _tokenizer(engine: Engine) -> Any:
    backend = engine.backend
    assert isinstance(backend, CausalLMBackend)
    return backend.tokenizer


def _submit(engine: Engine, prompt: str, selection, max_tokens: int, stop=()) -> Collector:  # type: ignore[no-untyped-def]
    ids = _tokenizer(engine)(prompt)["input_ids"]
    out = Collector()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, stop=tuple(stop))
    engine.submit(Job(ids, params, selection, out))
    return out


def _alone(engine: Engine, prompt: str, selection, max_tokens: int, stop=()) -> Collector:  # type: ignore[no-untyped-def]
    out = _submit(engine, prompt, selection, max_tokens, stop)
    assert out.done.wait(60)
    return out


CASES = [
    (PROMPTS[0], "a", 40, ()),
    (PROMPTS[1], None, 12, ()),
    (PROMPTS[2], [("a", 1.0), ("b", 0.5)], 20, ()),
    (PROMPTS[3], "b", 30, ("mat",)),
    (PROMPTS[1], "b", 5, ()),
]


def test_rows_joining_mid_flight_equal_running_alone(engine: Engine) -> None:
    alone = [_alone(engine, *case) for case in CASES]
    first = _submit(engine, *CASES[0])
    while first.tokens < 5 and not first.done.is_set():  # the first row is decoding...
        time.sleep(0.001)
    joined = [first] + [_submit(engine, *case) for case in CASES[1:]]  # ...when the others join it
    for want, got, case in zip(alone, joined, CASES, strict=True):
        assert got.done.wait(60), case
        assert (got.text, got.reason) == (want.text, want.reason), case
    assert first.tokens >= 5


def test_joined_rows_share_steps(engine: Engine) -> None:
    """While a long row runs, later rows are decoded in the same forward (batch sizes > 1 observed)."""
    before = list(engine.metrics.batch_size.collect())[0].samples
    count_before = next(s.value for s in before if s.name.endswith("_count"))
    long = _submit(engine, PROMPTS[0], "a", 60)
    while long.tokens < 2:
        time.sleep(0.001)
    short = [_submit(engine, p, "b", 4) for p in PROMPTS]
    assert all(s.done.wait(60) for s in short)
    assert long.done.wait(60)
    samples = list(engine.metrics.batch_size.collect())[0].samples
    count_after = next(s.value for s in samples if s.name.endswith("_count"))
    sum_after = next(s.value for s in samples if s.name.endswith("_sum"))
    assert count_after > count_before
    assert sum_after > count_after  # some steps ran more than one row
    # the short rows finished long before the long one: they left the batch when done
    assert long.reason == "length" and long.tokens == 60


def test_cancelled_row_leaves_and_others_continue(engine: Engine) -> None:
    ids = _tokenizer(engine)(PROMPTS[0])["input_ids"]
    out = Collector()
    job = Job(ids, SamplingParams(max_tokens=200, temperature=0), "a", out)
    engine.submit(job)
    other = _submit(engine, PROMPTS[1], "b", 10)
    while out.tokens < 3:
        time.sleep(0.001)
    job.cancelled.set()
    assert out.done.wait(30) and out.reason == "cancelled" and out.tokens < 200
    assert other.done.wait(30) and other.reason == "length"
