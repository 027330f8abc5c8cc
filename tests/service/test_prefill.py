"""Chunked prefill's budget counts each prompt token's attention to the keys before it, so the chunks of a long
prompt shrink as it goes in and every step stays within the stall the budget allows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import LlamaConfig

from service.prefill import PrefillBudget, attention_key_cost, take_chunks

KEY_COST = 1 / 3136  # the serving benchmark's Llama (hidden 512, 8 heads, intermediate 1408)


def _row(prompt: int, length: int, echo: bool = False) -> SimpleNamespace:
    job = SimpleNamespace(prompt_ids=list(range(prompt)), params=SimpleNamespace(echo=echo))
    return SimpleNamespace(job=job, length=length)


def _measured(key_cost: float, stall: float = 1.0) -> PrefillBudget:
    """A budget that has seen steps costing exactly 10 ms + 1 ms per unit of work."""
    budget = PrefillBudget(4096, stall=stall, key_cost=key_cost)
    for work in (16.0, 48.0, 80.0, 16.0, 48.0):
        budget.observe(0.010 + 0.001 * work, work)
    return budget


def test_key_cost_from_the_config() -> None:
    config = LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=8, intermediate_size=1408)
    assert attention_key_cost(config) == pytest.approx(KEY_COST)
    grouped = LlamaConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, intermediate_size=1408)
    assert attention_key_cost(grouped) > attention_key_cost(config)  # fewer k/v projections per token
    assert attention_key_cost(SimpleNamespace(hidden_size=512)) == 0.0  # sizes unknown: keys not counted
    assert attention_key_cost(None) == 0.0


@pytest.mark.parametrize("prefix", [0, 1, 500, 2000, 32000])
def test_fit_tokens_is_the_most_that_fits(prefix: int) -> None:
    budget = PrefillBudget(4096, key_cost=KEY_COST)
    for work in (0.5, 1.0, 16.0, 39.5, 400.0, 5000.0):
        tokens = budget.fit_tokens(work, prefix)
        assert budget.work(tokens, prefix) <= work < budget.work(tokens + 1, prefix)
    assert PrefillBudget(4096).fit_tokens(39.7, prefix) == 39  # key_cost 0: one unit per token


def _long_prompt(key_cost: float) -> tuple[float, int]:
    """16 rows decode (64 keys each) while a 2,000-token prompt goes in under a budget with `key_cost`: the worst
    step's extra time over the decode-only step, in decode steps, and the steps the prompt took."""
    decoding = [64] * 16
    budget, truth = _measured(key_cost), PrefillBudget(4096, key_cost=KEY_COST)  # truth: what a step costs
    decode_step = 0.010 + 0.001 * truth.decode_work(decoding)
    row, worst, steps = _row(2000, 0), 0.0, 0
    while row.length < 2000:
        ((_, tokens),) = take_chunks([row], budget.allowed(budget.decode_work(decoding)), budget)
        step = 0.010 + 0.001 * (truth.decode_work(decoding) + truth.work(tokens, row.length))
        worst, steps, row.length = max(worst, step / decode_step - 1), steps + 1, row.length + tokens
    return worst, steps


def test_a_long_prompts_steps_stay_within_the_stall() -> None:
    """With stall 1, no step costs the running rows more than one extra decode step's time; counting tokens
    alone, the last chunks cost 1.6 extra. The prompt takes more, smaller steps (105 against 77 here)."""
    worst, steps = _long_prompt(KEY_COST)
    worst_tokens_only, steps_tokens_only = _long_prompt(0.0)
    assert worst <= 1.0 + 1e-9 < 1.5 < worst_tokens_only
    assert steps_tokens_only < steps < 1.5 * steps_tokens_only


def test_chunks_take_what_fits_oldest_first() -> None:
    budget = PrefillBudget(4096, key_cost=KEY_COST)
    first, second = _row(40, 30), _row(5000, 2000)
    chunks = take_chunks([second, first], 100.0, budget)  # the long one is the oldest
    assert chunks[0] == (first, 10)  # its last 10 tokens (newer prompts take up to half first)
    left = 100.0 - budget.work(10, 30)
    assert chunks[1] == (second, budget.fit_tokens(left, 2000)) and chunks[1][1] < 89
    (only,) = take_chunks([_row(9000, 8000)], 0.5, budget)
    assert only[1] == 1  # the oldest row always moves
    unbounded = PrefillBudget(512, stall=0.0, key_cost=KEY_COST)  # fixed chunks: `limit` tokens at any prefix
    assert unbounded.allowed(20.0) is None and PrefillBudget(512, stall=1.0).allowed(0.0) is None
    deep, short = _row(9000, 8000), _row(100, 0)
    assert take_chunks([deep, short], None, unbounded) == [(deep, 512)]
    assert take_chunks([short, deep], None, unbounded) == [(short, 100), (deep, 412)]
    echo = _row(300, 0, echo=True)
    assert take_chunks([echo, first], 10.0, budget) == [(echo, 300)]  # an echo prompt goes whole, alone


def test_a_step_grows_only_as_far_as_steps_measured_so_far() -> None:
    """Small steps that cost 25 ms + 0.1 ms per unit (a CPU reading its weights) fit a line that would let stall 1
    take 266 units at once; chunks instead grow to at most twice the largest step measured lately (then the next
    measurement decides)."""
    budget = PrefillBudget(4096, stall=1.0)
    for work in (16.0, 48.0, 16.0, 48.0, 16.0):
        budget.observe(0.025 + 0.0001 * work, work)
    largest = 48 * budget.memory  # the 48-unit step, one step ago
    first = budget.allowed(16.0)
    assert first is not None and 2 * 16 < first + 16 <= 2 * largest
    budget.observe(0.025 + 0.0001 * 96, 96.0)
    second = budget.allowed(16.0)
    assert second is not None and first < second <= 2 * 96 - 16
    assert budget.allowed(300.0) == 300  # decode work past anything measured: as much prompt again at most
    for _ in range(200):  # many decode-only steps: the large one fades, a new long prompt ramps up again
        budget.observe(0.0266, 16.0)
    assert budget.allowed(16.0) < 2 * 48  # type: ignore[operator]


def _turning_compute_bound(work: float) -> float:
    """A step's seconds on a device that reads its weights in 25 ms up to 55 units of work, then computes at 0.45 ms
    per unit, plus 0.1 ms per unit of per-token work: its time per unit never grows with the work."""
    return max(0.025, 0.00045 * work) + 0.0001 * work


def test_a_long_prompt_stays_within_the_stall_where_steps_turn_compute_bound() -> None:
    """Fitted to decode-sized steps (memory-bound, nearly flat) the line prices big chunks too low, and chunks
    bounded only by twice the largest step measured overshoot while the fit catches up (here the second chunk's
    step took 2.09 decode steps). Priced at the largest measured step's time per unit, no step of a 2,000-token
    prompt costs the 16 decoding rows more than one extra decode step, and the prompt still goes in in a few dozen
    steps (28 here, as before)."""
    budget = PrefillBudget(4096, stall=1.0)
    for work in (16.0, 48.0, 16.0, 48.0, 16.0):
        budget.observe(_turning_compute_bound(work), work)
    decode_step = _turning_compute_bound(16.0)
    row, worst, steps = _row(2000, 0), 0.0, 0
    while row.length < 2000:
        ((_, tokens),) = take_chunks([row], budget.allowed(16.0), budget)
        seconds = _turning_compute_bound(16.0 + tokens)
        budget.observe(seconds, 16.0 + tokens)
        worst, steps, row.length = max(worst, seconds / decode_step), steps + 1, row.length + tokens
    assert worst <= 2.0 + 1e-9
    assert steps <= 40


def test_short_prompts_go_ahead_of_a_long_one_that_keeps_half_of_each_step() -> None:
    """Behind a long prompt's chunks, newer prompts take up to half of the step, shortest first; the long (oldest)
    one takes the rest, at least half of the step and one token."""
    budget = PrefillBudget(4096, key_cost=KEY_COST)
    long, short, shorter = _row(2000, 500), _row(32, 0), _row(40, 10)
    chunks = take_chunks([long, short, shorter], 100.0, budget)
    assert chunks[0] == (shorter, 30)  # 30 tokens left: the shortest goes first
    assert chunks[1] == (short, budget.fit_tokens(50.0 - budget.work(30, 10), 0))  # the rest of the half
    ahead = budget.work(30, 10) + budget.work(chunks[1][1], 0)
    assert chunks[2] == (long, budget.fit_tokens(100.0 - ahead, 500)) and 100.0 - ahead >= 50.0
    assert len(chunks) == 3
    small = 2 * budget.work(32, 0)  # newer prompts' half: one 32-token prompt whole
    assert take_chunks([long, _row(32, 0), _row(32, 0)], small, budget)[0][1] == 32
    assert take_chunks([long, _row(32, 0)], 1.0, budget)[-1] == (long, 1)  # the oldest still moves
    assert take_chunks([long, short], None, budget) == [(long, 1500), (short, 32)]  # no budget: oldest first
    echo = _row(300, 0, echo=True)
    assert take_chunks([long, echo], 100.0, budget) == [(long, budget.fit_tokens(100.0, 500))]  # echo waits its turn


def test_behind_a_long_prompt_short_ones_start_decoding_within_a_few_steps() -> None:
    """A model of the engine's queue: 16 rows decode; a 2,000-token prompt arrives, then a 32-token prompt every 4
    steps. Each short prompt is in within 3 steps (oldest first, each queued for the rest of the long prompt: up
    to ~100 steps), and the long one takes at most twice the steps it takes alone."""
    budget = _measured(KEY_COST)
    allowed = budget.allowed(budget.decode_work([64] * 16))

    def run(arrivals: int) -> tuple[int, int]:
        waiting, steps, worst_wait, arrived = [_row(2000, 0)], 0, 0, {}
        long = waiting[0]
        while long.length < 2000:
            if steps < arrivals and steps % 4 == 0:
                waiting.append(_row(32, 0))
                arrived[id(waiting[-1])] = steps
            for row, tokens in take_chunks(waiting, allowed, budget):
                row.length += tokens
                if row.length == len(row.job.prompt_ids):
                    waiting.remove(row)
                    if row is not long:
                        worst_wait = max(worst_wait, steps + 1 - arrived[id(row)])
            steps += 1
        return steps, worst_wait

    alone, _ = run(0)
    steps, worst_wait = run(1000)
    assert worst_wait <= 3
    assert steps <= 2 * alone + 1
