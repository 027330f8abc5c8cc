"""Packed steps (every decoding row's token and the prompt chunks of a step in one sequence) on attention
variants: sliding-window layers give `generate`'s tokens; a model on other attention (soft-capping, eager)
and a model whose packed step disagrees with its own forward (the start-up probe) are served by the row path,
still exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

import lokr
from service import kvcache
from service.demo import build_word_tokenizer
from service.generation import BatchRunner
from service.jobs import Event, Job, SamplingParams, TokenEvent
from service.packed import PackedStep, split_decode
from service.prefill import PrefillBudget

EOS = 3
WORDS = ["the", "sea", "is", "blue", "a", "cat", "sat", "on", "mat", "sun", "rose", "over", "hills", "and", "sky"]


def _model(kind: str, vocab: int) -> Any:
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    if kind == "mistral":  # every layer attends to the last 6 keys only
        config: Any = transformers.MistralConfig(sliding_window=6, **common)
    elif kind == "qwen2":  # layer 0 full, layer 1 sliding (mixed layer types)
        config = transformers.Qwen2Config(use_sliding_window=True, sliding_window=5, max_window_layers=1, **common)
    else:  # logit soft-capping: transformers runs it on eager attention only
        config = transformers.Gemma2Config(head_dim=8, attn_logit_softcapping=20.0, sliding_window=6, **common)
    config._attn_implementation = "eager" if kind == "gemma2" else "sdpa"
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(4)
    lokr.inject(model, lokr.LoKrConfig(target_modules=["q_proj", "v_proj", "lm_head"], init_weights=False, r=2), "a")
    return model


class _Tokens:
    def __init__(self) -> None:
        self.ids: list[int] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, TokenEvent):
            self.ids += [t.id for t in event.tokens]


def _reference(model: Any, prompt: list[int], selection: Any, n: int) -> list[int]:
    with torch.inference_mode(), lokr.adapter_batch(model, [selection]):
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    ("kind", "packed", "alone"),
    [("mistral", True, 0), ("mistral", True, 256), ("qwen2", True, 0), ("gemma2", False, 0)],
)
def test_packed_steps_on_attention_variants(
    kind: str, packed: bool, alone: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`alone` 0: every decoding row longer than the shortest attends alone (`split_decode`), windows included."""
    monkeypatch.setattr(kvcache, "split_decode", lambda lengths: split_decode(lengths, alone_cost=alone))
    tokenizer = build_word_tokenizer(WORDS)
    model = _model(kind, len(tokenizer))
    runner = BatchRunner(model, tokenizer, torch.device("cpu"), 256, max_rows=3, max_prefill_tokens=8)
    assert runner.packed is packed
    gen = torch.Generator().manual_seed(9)
    prompts = [[2] + torch.randint(4, len(tokenizer), (n,), generator=gen).tolist() for n in (20, 3, 13)]
    selections: list[Any] = ["a", None, [("a", 0.5)]]
    outs = []
    for i, (prompt, selection) in enumerate(zip(prompts, selections, strict=True)):
        out = _Tokens()
        params = SamplingParams(max_tokens=12, temperature=0, logprobs=0)
        runner.add(Job(prompt, params, selection, out))
        outs.append(out)
        for _ in range(i + 1):  # rows join while others decode and prefill in chunks
            runner.step()
    while runner.rows():
        runner.step()
    for prompt, selection, out in zip(prompts, selections, outs, strict=True):
        want = _reference(model, prompt, selection, 12)
        assert out.ids == (want[: want.index(EOS) + 1] if EOS in want else want)  # the EOS ends a row


def test_a_model_failing_the_probe_is_served_by_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A packed attention that disagrees with the model's own forward turns packed steps off and restores SDPA."""
    tokenizer = build_word_tokenizer(WORDS)
    model = _model("mistral", len(tokenizer))
    wrong = PackedStep.attend

    def attend(self: PackedStep, layer: int, query: torch.Tensor, groups: int, scaling: float | None) -> torch.Tensor:
        return wrong(self, layer, query, groups, scaling) * 0.5

    monkeypatch.setattr(PackedStep, "attend", attend)
    runner = BatchRunner(model, tokenizer, torch.device("cpu"), 256, max_rows=2, max_prefill_tokens=8)
    assert runner.packed is False
    assert model.config._attn_implementation == "sdpa"
    out = _Tokens()
    prompt = [2, 5, 9, 7, 11, 4, 8, 6]
    runner.run([Job(prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=0), "a", out)])
    want = _reference(model, prompt, "a", 6)
    assert out.ids == (want[: want.index(EOS) + 1] if EOS in want else want)


def test_an_adapter_without_the_output_layer_runs_beside_one_with_it() -> None:
    """The output layer gets its own scope (it sees only the kept positions); rows whose adapters do not adapt it
    run its base op there, also composed with one that does, and every row still equals `generate`'s tokens."""
    tokenizer = build_word_tokenizer(WORDS)
    model = _model("mistral", len(tokenizer))  # "a" adapts the output layer
    torch.manual_seed(5)
    lokr.inject(model, lokr.LoKrConfig(target_modules=["k_proj", "o_proj"], init_weights=False, r=2), "b")
    runner = BatchRunner(model, tokenizer, torch.device("cpu"), 256, max_rows=3, max_prefill_tokens=8)
    prompts = [[2, 5, 9, 7, 11, 4], [2, 14, 6, 9], [2, 8, 12, 13, 6]]
    selections: list[Any] = ["b", [("a", 0.5), ("b", 1.0)], "a"]
    outs = [_Tokens() for _ in prompts]
    jobs = [
        Job(p, SamplingParams(max_tokens=8, temperature=0, logprobs=0), s, o)
        for p, s, o in zip(prompts, selections, outs, strict=True)
    ]
    runner.run(jobs)
    for prompt, selection, out in zip(prompts, selections, outs, strict=True):
        want = _reference(model, prompt, selection, 8)
        assert out.ids == (want[: want.index(EOS) + 1] if EOS in want else want)


def test_one_adapter_steps_use_the_folded_weights_and_stay_exact() -> None:
    tokenizer = build_word_tokenizer(WORDS)
    model = _model("qwen2", len(tokenizer))
    runner = BatchRunner(model, tokenizer, torch.device("cpu"), 256, max_rows=2, max_prefill_tokens=8, fold=1)
    prompts = [[2, 5, 9, 7, 11, 4, 8, 6, 12, 13], [2, 14, 6, 9]]
    outs = [_Tokens(), _Tokens()]
    runner.run([Job(p, SamplingParams(max_tokens=8, temperature=0, logprobs=0), "a", o) for p, o in zip(prompts, outs)])
    assert all(layer._folds.nbytes > 0 for layer in lokr.lokr_layers(model))
    for prompt, out in zip(prompts, outs, strict=True):
        want = _reference(model, prompt, "a", 8)
        assert out.ids == (want[: want.index(EOS) + 1] if EOS in want else want)


def test_prefill_budget_sizes_chunks_to_the_measured_stall() -> None:
    budget = PrefillBudget(512, stall=1.5, floor=16)
    assert budget.tokens(0) == 512  # no row decodes: whole chunks
    assert budget.tokens(8) == 16  # nothing measured yet: the floor
    for tokens in (16, 48, 80, 16, 48):  # steps cost 10 ms + 1 ms per token
        budget.observe(0.010 + 0.001 * tokens, tokens)
    fixed, per_token = budget.fit()  # type: ignore[misc]
    assert abs(fixed - 0.010) < 1e-9 and abs(per_token - 0.001) < 1e-9
    assert budget.tokens(16) == 39  # 1.5 x (10 ms + 16 x 1 ms) of tokens at 1 ms
    assert budget.tokens(1000) == 512  # never above the limit
    steady = PrefillBudget(512, stall=2.0)
    for _ in range(5):
        steady.observe(0.032, 32)  # one size only: no fixed cost can be told apart, all per token
    assert steady.tokens(32) == 64
    assert PrefillBudget(512, stall=0.0).tokens(8) == 512  # fixed chunks
    assert PrefillBudget(32, stall=100.0).tokens(8) == 16  # within [floor, limit] before any measurement


def test_split_decode_reads_each_long_row_alone() -> None:
    assert split_decode([40, 41, 39, 2000]) == (41, ((3, 2000),))
    assert split_decode([40, 41, 39, 60]) == (60, ())  # close lengths: one call over the longest
    assert split_decode([7]) == (7, ())
    span, long = split_decode([30] * 16 + [900, 1500])
    assert span == 30 and long == ((16, 900), (17, 1500))
