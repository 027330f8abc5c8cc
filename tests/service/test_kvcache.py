"""The slot KV cache and chunked prefill, driven step by step (no threads, no timing): rows that join, leave,
are cancelled or are prefilled in chunks give the tokens that transformers' own `generate` gives for each row
alone; slots are reused without leaking and the cache's memory is not reallocated by joins and leaves."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lokr
from service.demo import build_tiny_llama, build_word_tokenizer
from service.generation import BatchRunner, plan_chunks
from service.jobs import Event, FinishEvent, Job, SamplingParams, TokenEvent
from service.kvcache import SlotCache

WORDS = ["the", "sea", "is", "blue", "a", "cat", "sat", "on", "mat", "sun", "rose", "over", "hills", "and", "sky"]
CONTEXT = 512


@pytest.fixture(scope="module", params=["packed", "rows"])
def setup(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """The same model twice: on SDPA (packed steps: one forward per step) and on eager attention (the
    fallback: decode rows batched, prompt chunks in their own forwards)."""
    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_llama(len(tokenizer), seed=5, kv_heads=2, max_position_embeddings=CONTEXT)
    if request.param == "rows":
        model.set_attn_implementation("eager")
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(20 + i)
        config = lokr.LoKrConfig(target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], init_weights=False, r=2)
        lokr.inject(model, config, name)
    return model, tokenizer


EOS = 3


class Out:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.logprobs: list[dict[int, float | None]] = []
        self.reason: str | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, TokenEvent):  # with logprobs, the EOS that ends a row is a token too: not counted here
            tokens = [t for t in event.tokens if t.id != EOS]
            self.ids += [t.id for t in tokens]
            self.logprobs += [{alt.id: alt.logprob for alt in t.top or []} for t in tokens]
        elif isinstance(event, FinishEvent):
            self.reason = event.reason


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(4, vocab, (n - 1,), generator=gen).tolist()


def _job(prompt: list[int], selection: Any, max_tokens: int, logprobs: int = 0) -> tuple[Job, Out]:
    """A greedy job; `logprobs` >= 0 so every token event names its token (token infos come only with logprobs)."""
    out = Out()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=logprobs)
    return Job(prompt, params, selection, out), out


def _reference(model: Any, prompt: list[int], selection: Any, max_tokens: int) -> list[int]:
    """Greedy tokens from transformers' `generate` (its own DynamicCache) for this row alone, up to EOS."""
    ids = torch.tensor([prompt])
    with torch.inference_mode(), lokr.adapter_batch(model, [selection]):
        out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=1)
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def _runner(setup: tuple[Any, Any], rows: int, budget: int) -> BatchRunner:
    model, tokenizer = setup
    runner = BatchRunner(model, tokenizer, torch.device("cpu"), CONTEXT, max_rows=rows, max_prefill_tokens=budget)
    assert runner.packed == (model.config._attn_implementation != "eager")
    return runner


def test_rows_joining_and_leaving_equal_running_alone(setup: tuple[Any, Any]) -> None:
    model, tokenizer = setup
    vocab = len(tokenizer)
    cases = [
        (_prompt(9, 1, vocab), "a", 24),
        (_prompt(40, 2, vocab), None, 6),  # leaves early: its hole is filled by the last decoding row
        (_prompt(3, 3, vocab), [("a", 1.0), ("b", 0.5)], 18),
        (_prompt(70, 4, vocab), "b", 12),
        (_prompt(5, 5, vocab), "b", 10),  # joins late, into a reused slot
    ]
    runner = _runner(setup, rows=4, budget=32)
    jobs = [_job(*case) for case in cases]
    runner.add(jobs[0][0])
    for _ in range(4):
        runner.step()
    for job, _ in jobs[1:4]:
        runner.add(job)
    assert runner.free_rows == 0
    storage = [t.data_ptr() for t in runner.cache.keys]
    while runner.free_rows == 0:
        runner.step()
    runner.add(jobs[4][0])
    while runner.rows():
        runner.step()
    for (_, out), case in zip(jobs, cases, strict=True):
        assert out.ids == _reference(model, *case), case[1:]
        assert out.reason in ("length", "stop")
    assert runner.free_rows == 4
    assert [t.data_ptr() for t in runner.cache.keys] == storage  # joins and leaves never reallocated


def test_chunked_prefill_equals_one_shot(setup: tuple[Any, Any]) -> None:
    """A 160-token prompt in 16-token chunks: the same logprobs and greedy tokens as one forward over it."""
    model, tokenizer = setup
    prompt = _prompt(160, 7, len(tokenizer))
    results = []
    for budget in (16, 1000):
        runner = _runner(setup, rows=2, budget=budget)
        job, out = _job(prompt, "a", 8, logprobs=5)
        runner.run([job])
        results.append(out)
    chunked, whole = results
    assert chunked.ids == whole.ids == _reference(model, prompt, "a", 8)
    for got, want in zip(chunked.logprobs, whole.logprobs, strict=True):
        assert got.keys() == want.keys()
        assert torch.allclose(torch.tensor(list(got.values())), torch.tensor(list(want.values())), atol=1e-4)
    with torch.inference_mode(), lokr.adapter_batch(model, ["a"]):
        first = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    top = first.topk(5)
    assert torch.allclose(torch.tensor(list(chunked.logprobs[0].values())), top.values, atol=1e-4)


def test_long_prompt_is_chunked_between_decode_steps(setup: tuple[Any, Any]) -> None:
    """While a long prompt goes in, every step still gives the decoding row a token, and no forward feeds
    more prompt tokens than the budget."""
    model, tokenizer = setup
    vocab = len(tokenizer)
    runner = _runner(setup, rows=3, budget=32)
    short, short_out = _job(_prompt(6, 11, vocab), "b", 30)
    long, long_out = _job(_prompt(200, 12, vocab), "a", 4)
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kw: widths.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        runner.add(short)
        runner.step()
        runner.add(long)
        counts = []
        while long_out.ids == [] and short_out.reason is None:
            before = len(short_out.ids)
            runner.step()
            counts.append(len(short_out.ids) - before)
        while runner.rows():
            runner.step()
    finally:
        hook.remove()
    assert len(counts) >= 200 // 32 and set(counts) == {1}  # one token per step for the running row
    assert max(widths) <= 32 + 1  # prompt tokens within the budget (packed: plus the decoding row's token)
    assert short_out.ids == _reference(model, short.prompt_ids, "b", 30)
    assert long_out.ids == _reference(model, long.prompt_ids, "a", 4)


def test_cancelled_rows_free_their_slot(setup: tuple[Any, Any]) -> None:
    model, tokenizer = setup
    vocab = len(tokenizer)
    runner = _runner(setup, rows=3, budget=16)
    keep, keep_out = _job(_prompt(8, 21, vocab), "a", 20)
    decoding, decoding_out = _job(_prompt(4, 22, vocab), None, 200)
    prefilling, prefilling_out = _job(_prompt(120, 23, vocab), "b", 5)
    for job in (decoding, keep):
        runner.add(job)
    for _ in range(3):
        runner.step()
    runner.add(prefilling)
    runner.step()
    assert runner.free_rows == 0 and len(runner.prefilling) == 1
    decoding.cancelled.set()
    prefilling.cancelled.set()
    runner.step()
    assert runner.free_rows == 2
    assert decoding_out.reason == prefilling_out.reason == "cancelled"
    while runner.rows():
        runner.step()
    assert keep_out.ids == _reference(model, keep.prompt_ids, "a", 20)
    assert runner.free_rows == 3


def test_slots_are_reused_without_leaking(setup: tuple[Any, Any]) -> None:
    model, tokenizer = setup
    vocab = len(tokenizer)
    runner = _runner(setup, rows=2, budget=64)
    cases = [(_prompt(3 + 5 * i, 30 + i, vocab), ("a", "b", None)[i % 3], 3 + i % 4) for i in range(6)]
    outs = []
    pending = list(cases)
    while pending or runner.rows():
        while pending and runner.free_rows:
            job, out = _job(*pending.pop(0))
            runner.add(job)
            outs.append(out)
        runner.step()
        used = {r.slot for r in runner.rows()}
        assert len(used) == len(runner.rows()) == 2 - runner.free_rows
        assert [r.slot for r in runner.decoding] == list(range(len(runner.decoding)))
    assert runner.free_rows == 2 and runner.cache.keys[0].shape[0] == 2
    for out, case in zip(outs, cases, strict=True):
        assert out.ids == _reference(model, *case)


def test_attention_mask_hides_keys_past_each_row() -> None:
    cache = SlotCache(max_rows=3, capacity=8)
    plan = cache.bind([1, 2], [2, 0], 2, torch.device("cpu"))
    mask = cache.attention_mask(plan, torch.float32, additive=False, window=None)
    assert mask.shape == (2, 1, 2, 4)
    assert mask[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert mask[1, 0].tolist() == [[True, False, False, False], [True, True, False, False]]
    sliding = cache.attention_mask(plan, torch.float32, additive=False, window=2)
    assert sliding[0, 0].tolist() == [[False, True, True, False], [False, False, True, True]]
    additive = cache.attention_mask(plan, torch.float32, additive=True, window=None)
    assert additive[1, 0, 0].tolist() == [0.0] + [torch.finfo(torch.float32).min] * 3
    assert cache.positions(plan).tolist() == [[2, 3], [0, 1]]


def test_plan_chunks_does_not_pad_short_prompts_to_a_long_chunk() -> None:
    groups = plan_chunks([("long", 512), ("s1", 30), ("s2", 20), ("s3", 32)])
    assert groups == [[("long", 512)], [("s3", 32), ("s1", 30), ("s2", 20)]]
    assert plan_chunks([]) == []


def test_a_long_prompt_mid_run_never_reallocates_the_store(setup: tuple[Any, Any]) -> None:
    """The whole context is reserved with the first forward (it fits the budget), so a prompt longer than any
    before it only zeroes the positions it reaches; a cache without a budget doubles instead, copying only the
    positions in use, and both give `generate`'s tokens."""
    model, tokenizer = setup
    vocab = len(tokenizer)
    for budget in (None, 1):  # 1 byte: nothing fits, the store starts at 16 positions and doubles
        runner = _runner(setup, rows=2, budget=64)
        if budget is not None:
            runner.cache = SlotCache(2, capacity=16, max_length=CONTEXT, budget_bytes=budget, layers=2)
        short, short_out = _job(_prompt(5, 41, vocab), "a", 40)
        long, long_out = _job(_prompt(400, 42, vocab), "b", 4)  # then decodes alone (split_decode)
        runner.add(short)
        runner.step()
        storage = [t.data_ptr() for t in (*runner.cache.keys, *runner.cache.values)]
        assert runner.cache.capacity == (CONTEXT if budget is None else 16)
        runner.add(long)
        while runner.rows():
            runner.step()
        moved = [t.data_ptr() for t in (*runner.cache.keys, *runner.cache.values)] != storage
        assert moved == (budget is not None)
        assert short_out.ids == _reference(model, short.prompt_ids, "a", 40)
        assert long_out.ids == _reference(model, long.prompt_ids, "b", 4)


def _poison(cache: SlotCache) -> None:
    """NaN (the garbage a reused allocation may hold) wherever the cache does not know its store finite: past
    `_clean`, except what rows wrote there (`_ahead`)."""
    with torch.inference_mode():
        for store in (*cache.keys, *cache.values):
            for slot in range(cache.max_rows):
                store[slot, :, max(cache._clean, cache._ahead.get(slot, 0)) :] = float("nan")


def test_positions_no_forward_reached_are_zeroed_before_use(setup: tuple[Any, Any]) -> None:
    """The reserved store is not zeroed up front: garbage (here NaN) past the furthest position any forward
    reached is zeroed as forwards reach it, so masked keys never meet NaN values."""
    model, tokenizer = setup
    vocab = len(tokenizer)
    runner = _runner(setup, rows=3, budget=16)
    first, first_out = _job(_prompt(4, 51, vocab), None, 30)
    runner.add(first)
    runner.step()
    _poison(runner.cache)
    second, second_out = _job(_prompt(90, 52, vocab), "a", 6)
    runner.add(second)
    while runner.rows():
        runner.step()
    assert first_out.ids == _reference(model, first.prompt_ids, None, 30)
    assert second_out.ids == _reference(model, second.prompt_ids, "a", 6)


def test_a_long_prompt_zeroes_no_other_slot_and_keeps_its_keys_when_others_catch_up(setup: tuple[Any, Any]) -> None:
    """Chunks of a long prompt read only their own slot, so they zero nothing: the slots of the rows decoding
    meanwhile stay untouched past what those rows attend (no time, and on CPU no memory, spent on them). When the
    decoding rows later attend as far as the long row's keys, the zeroing that reaches them leaves those keys be.
    Both paths: packed steps, and the row path (prompt chunks in forwards of their own)."""
    model, tokenizer = setup
    vocab = len(tokenizer)
    runner = _runner(setup, rows=3, budget=16)
    short, short_out = _job(_prompt(4, 61, vocab), "b", 120)
    runner.add(short)
    runner.step()
    _poison(runner.cache)
    long, long_out = _job(_prompt(100, 62, vocab), "a", 30)
    runner.add(long)
    while any(row.job is long for row in runner.prefilling):
        runner.step()
    cache = runner.cache
    assert cache._clean < 40  # the decoding row reads about 15 positions
    (slot,) = [row.slot for row in runner.decoding if row.job is short]
    for store in (*cache.keys, *cache.values):
        assert torch.isnan(store[slot, :, 50:]).all()  # nothing zeroed the decoding row's slot past what it read
    while runner.rows():
        runner.step()
    assert short_out.ids == _reference(model, short.prompt_ids, "b", 120)  # its slot read 100+ positions
    assert long_out.ids == _reference(model, long.prompt_ids, "a", 30)
