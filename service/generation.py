"""Rows of a causal LM in one slot cache. On models whose attention runs on SDPA, each step is one packed
forward: every decoding row's next token and prompt chunks under a token budget (`PrefillBudget`) in one
sequence (`service.packed`). Otherwise decoding rows run as one batch and prompt chunks in right-padded
forwards of their own. Rows join and leave between steps without copying anyone else's KV."""

from __future__ import annotations

import inspect
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

import lokr
from lokr.batch import RowSpec, restrict_rows

from .jobs import Job, TokenEvent, fail_jobs
from .kvcache import SlotCache, SlotPlan, default_budget
from .packed import STEP_KWARG, PackedStep, disable_packed, enable_packed
from .prefill import PrefillBudget, attention_key_cost, take_chunks
from .rowstate import MaskKind, Row, emit_prompt_logprobs, plan_chunks, token_info
from .sampling import choose_tokens, make_generator
from .textstream import TextStream

__all__ = ["BatchRunner", "plan_chunks"]

log = logging.getLogger("lokr_serve.engine")

# A packed forward's masks are the packed attention's own: a 4D placeholder makes transformers build none.
_NO_MASK = torch.ones((1, 1, 1, 1), dtype=torch.bool)


class BatchRunner:
    """Runs jobs on `model` with per-row adapters in up to `max_rows` cache slots; emits events through each job.

    Decoding rows hold slots `0..n-1` (so a decode forward attends over a view of the cache, no gather);
    rows still prefilling wait in the highest free slots and move down when their prompt is in.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        context_length: int,
        max_rows: int = 16,
        max_prefill_tokens: int = 512,
        prefill_stall: float = 0.0,
        fold: int = 0,
    ) -> None:
        """`prefill_stall` > 0: while rows decode, prompt chunks are sized to cost at most that many decode steps'
        time (measured; packed steps only). `fold`: `lokr.adapter_batch`'s folded weights per layer."""
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.context_length, self.max_rows, self.max_prefill_tokens = context_length, max_rows, max_prefill_tokens
        key_cost = attention_key_cost(getattr(model, "config", None))
        self.budget = PrefillBudget(max_prefill_tokens, prefill_stall, key_cost=key_cost)
        self.fold = fold
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.can_trim_logits = "logits_to_keep" in params
        dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
        self.masks = MaskKind(getattr(model, "config", None), dtype)
        self.cache = self._new_cache()
        self.decoding: list[Row] = []  # decoding[i] holds slot i
        self.prefilling: list[Row] = []  # first come, first prefilled
        self.packed = enable_packed(model) and self._probe_packed()

    # ---------------------------------------------------------------------------------- scheduling
    @property
    def free_rows(self) -> int:
        return self.cache.free_slots

    def rows(self) -> list[Row]:
        return self.decoding + self.prefilling

    def add(self, job: Job) -> None:
        """Give `job` a slot; its prompt is prefilled by the next steps (caller checks `free_rows`)."""
        job.generator = make_generator(job.params, self.device)
        row = Row(job, TextStream(self.tokenizer, job.params.stop, job.prompt_ids), self.cache.take(top=True))
        self.prefilling.append(row)

    def run(self, jobs: list[Job]) -> None:
        """Generate every job to completion (for callers without a scheduler; at most `max_rows` jobs)."""
        for job in jobs:
            self.add(job)
        while self.decoding or self.prefilling:
            self.step()

    def step(self) -> None:
        """One decode forward for the decoding rows, then prompt chunks up to the token budget (a failing
        prefill fails only its rows); rows that finish leave and free their slots."""
        self._drop_cancelled()
        if self.packed:
            self._packed_step()
            return
        if self.decoding:
            self._decode()
        self._prefill()

    def reset(self) -> None:
        """Forget every row (after a failed step)."""
        self.cache = self._new_cache()
        self.decoding, self.prefilling = [], []

    def _new_cache(self) -> SlotCache:
        """Slots for `max_rows` rows, the whole context reserved up front where it fits (see `SlotCache`)."""
        layers = int(getattr(getattr(self.model, "config", None), "num_hidden_layers", 1) or 1)
        budget = default_budget(self.device)
        return SlotCache(self.max_rows, max_length=self.context_length, budget_bytes=budget, layers=layers)

    # ---------------------------------------------------------------------------------- packed steps
    def _packed_step(self) -> None:
        """One forward: each decoding row's next token and prompt chunks under the budget, packed in one sequence.
        A failing forward with chunks fails only the chunks' rows; the decoding rows then run alone."""
        started = time.perf_counter()
        decode_work = self.budget.decode_work([r.length for r in self.decoding])
        chunks = take_chunks(self.prefilling, self.budget.allowed(decode_work), self.budget)
        work = decode_work + sum(self.budget.work(width, row.length) for row, width in chunks)
        try:
            logits = self._packed_forward(self.decoding, chunks)
        except Exception as exc:
            if not chunks:
                raise
            rows = [row for row, _ in chunks]
            for row in rows:
                self._leave(row, self.prefilling)
            fail_jobs([r.job for r in rows], exc)
            chunks, work = [], decode_work
            if not self.decoding:
                return
            logits = self._packed_forward(self.decoding, chunks)
        n = len(self.decoding)
        for row in self.decoding:
            row.length += 1
        finished: list[tuple[Row, Tensor]] = []
        at = n
        for row, width in chunks:
            row.length += width
            if row.job.params.echo:
                emit_prompt_logprobs(
                    self.tokenizer, [row], torch.tensor([row.job.prompt_ids]), logits[None, at : at + width]
                )
                at += width
                finished.append((row, logits[at - 1]))
            elif row.length == len(row.job.prompt_ids):
                finished.append((row, logits[at]))
                at += 1
        if n:
            self._advance(self.decoding[:n], logits[:n])
        for row, _ in finished:
            self.prefilling.remove(row)
            self._place(row)
            self.decoding.append(row)
        if finished:
            self._advance([row for row, _ in finished], torch.stack([lg for _, lg in finished]))
        self.budget.observe(time.perf_counter() - started, work)

    def _packed_forward(self, rows: list[Row], chunks: list[tuple[Row, int]]) -> Tensor:
        """Float32 logits `(K, V)`: the decoding rows' next tokens, then per chunk the positions that pick a token
        (its last, once the prompt is in) or every position (an echo row)."""
        ids = [r.last for r in rows]
        specs: list[RowSpec] = [r.job.selection for r in rows]
        keep = list(range(len(rows)))
        for row, width in chunks:
            first = len(ids)
            ids += row.job.prompt_ids[row.length : row.length + width]
            specs += [row.job.selection] * width
            if row.job.params.echo:
                keep += range(first, first + width)
            elif row.length + width == len(row.job.prompt_ids):
                keep.append(first + width - 1)
        step = self.cache.bind_packed(
            [r.length for r in rows], [(r.slot, r.length, w) for r, w in chunks], self.masks.windows, self.device
        )
        return self._run_packed(torch.tensor([ids], device=self.device), step, specs, keep)

    def _run_packed(self, ids: Tensor, step: PackedStep, specs: list[RowSpec], keep: list[int]) -> Tensor:
        kwargs: dict[str, Any] = {self.cache_kwarg: self.cache, STEP_KWARG: step}
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        if self.can_trim_logits:
            kwargs["logits_to_keep"] = index
        with (
            torch.inference_mode(),
            lokr.adapter_batch(self.model, specs, tokens=True, fold=self.fold),
            self._head_scope([specs[i] for i in keep] if self.can_trim_logits else specs),
        ):
            out = self.model(
                input_ids=ids, attention_mask=_NO_MASK, position_ids=step.positions[None], use_cache=True, **kwargs
            )
        logits = out.logits[0] if self.can_trim_logits else out.logits[0, index]
        return logits.float()

    def _head_scope(self, specs: list[RowSpec]) -> AbstractContextManager[Any]:
        """An adapted output layer sees only the kept positions (`logits_to_keep` slices before it): its own
        selection, the kept positions' (the innermost scope covering a layer wins)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if not isinstance(head, lokr.LoKrLayer):
            return nullcontext()
        return lokr.adapter_batch(head, restrict_rows(specs, set(head.lokr_adapters)), tokens=True, fold=self.fold)

    def _probe_packed(self) -> bool:
        """Packed steps give the row path's logits on this model (else they stay off): a 5-token prompt packed
        alone, then its next token packed with another prompt's chunk, against plain forwards without a cache."""
        cache, self.cache = self.cache, SlotCache(2, capacity=16)
        try:
            first, second = [3, 5, 7, 11, 13], [17, 19, 23]
            vocab = getattr(getattr(self.model, "config", None), "vocab_size", 32) or 32
            first, second = [t % vocab for t in first], [t % vocab for t in second]
            a = self._run_packed(
                torch.tensor([first]),
                self.cache.bind_packed([], [(0, 0, 5)], self.masks.windows, self.device),
                [None] * 5,
                [4],
            )
            step = self.cache.bind_packed([5], [(1, 0, 3)], self.masks.windows, self.device)
            b = self._run_packed(torch.tensor([[first[0]] + second]), step, [None] * 4, [0, 3])
            with torch.inference_mode():
                ref_a = self.model(input_ids=torch.tensor([first + [first[0]]]), use_cache=False).logits[0].float()
                ref_b = self.model(input_ids=torch.tensor([second]), use_cache=False).logits[0, -1].float()
            got = torch.cat([a, b])
            want = torch.stack([ref_a[4], ref_a[5], ref_b])
            ok = bool((got - want).abs().max() <= 1e-2 * want.abs().max() + 1e-3)
        except Exception as exc:  # any failure means: use the row path
            log.info("packed steps off (%s: %s); rows are batched instead", type(exc).__name__, exc)
            ok = False
        finally:
            self.cache = cache
        if not ok:
            disable_packed(self.model)
        return ok

    # ---------------------------------------------------------------------------------- decode
    def _decode(self) -> None:
        rows = self.decoding
        ids = torch.tensor([[r.last] for r in rows], device=self.device)
        plan = self.cache.bind(list(range(len(rows))), [r.length for r in rows], 1, self.device)
        logits = self._forward(rows, ids, plan, keep=1)[:, -1]
        for r in rows:
            r.length += 1
        self._advance(rows, logits)

    # ---------------------------------------------------------------------------------- prefill
    def _prefill(self) -> None:
        """Prompt chunks under the budget, oldest row first; echo rows (prompt logprobs) go whole, alone."""
        budget = self.max_prefill_tokens
        chunks: list[tuple[Row, int]] = []
        for row in list(self.prefilling):
            if budget <= 0:
                break
            left = len(row.job.prompt_ids) - row.length
            if row.job.params.echo:
                if chunks:
                    break  # an echo row runs alone, in a later step
                self._run_group([(row, left)], all_positions=True)
                return
            take = min(left, budget)
            chunks.append((row, take))
            budget -= take
        for group in plan_chunks(chunks):
            self._run_group(group)

    def _run_group(self, group: list[tuple[Row, int]], all_positions: bool = False) -> None:
        """Feed each row its next `n` prompt tokens in one right-padded forward; rows whose prompt is in
        pick their first token and start decoding."""
        group = sorted(group, key=lambda item: item[0].slot)  # ascending slots: usually a view, not a gather
        rows = [row for row, _ in group]
        width = max(n for _, n in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        for i, (row, n) in enumerate(group):
            ids[i, :n] = torch.tensor(row.job.prompt_ids[row.length : row.length + n])
        ids = ids.to(self.device)
        done = [i for i, (row, n) in enumerate(group) if row.length + n == len(row.job.prompt_ids)]
        ends = sorted({group[i][1] - 1 for i in done})
        try:
            plan = self.cache.bind([r.slot for r in rows], [r.length for r in rows], width, self.device)
            keep: int | list[int] = list(range(width)) if all_positions else ends or 1
            logits = self._forward(rows, ids, plan, keep)
            if all_positions:
                emit_prompt_logprobs(self.tokenizer, rows, ids, logits)
        except Exception as exc:  # a prompt that cannot run fails only its own rows
            for row in rows:
                self._leave(row, self.prefilling)
            fail_jobs([r.job for r in rows], exc)
            return
        for row, n in group:
            row.length += n
        if not done:
            return
        finished = [rows[i] for i in done]
        column = [ends.index(group[i][1] - 1) if not all_positions else group[i][1] - 1 for i in done]
        for row in finished:
            self.prefilling.remove(row)
            self._place(row)
            self.decoding.append(row)
        self._advance(finished, logits[torch.tensor(done, device=logits.device), torch.tensor(column)])

    def _place(self, row: Row) -> None:
        """Move a row that finished its prompt into slot `len(decoding)` (swapping with a waiting row)."""
        target = len(self.decoding)
        if row.slot == target:
            return
        if not self.cache.owns(target):
            self.cache.move(row.slot, target, row.length)
        else:
            other = next(r for r in self.prefilling if r.slot == target)
            self.cache.swap(row.slot, target, row.length, other.length)
            other.slot = row.slot
        row.slot = target

    # ---------------------------------------------------------------------------------- forward
    def _forward(self, rows: list[Row], ids: Tensor, plan: SlotPlan, keep: int | list[int]) -> Tensor:
        """Float32 logits `(B, K, V)` at the positions `keep` (an int: the last `keep` positions)."""
        mask = self.masks.build(self.cache, plan)
        kwargs: dict[str, Any] = {self.cache_kwarg: self.cache}
        if self.can_trim_logits:
            kwargs["logits_to_keep"] = keep if isinstance(keep, int) else torch.tensor(keep, device=self.device)
        with torch.inference_mode(), lokr.adapter_batch(self.model, [r.job.selection for r in rows], fold=self.fold):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=self.cache.positions(plan), use_cache=True, **kwargs
            )
        logits = out.logits
        if not self.can_trim_logits:
            logits = logits[:, -keep:] if isinstance(keep, int) else logits[:, keep]
        return logits.float()

    # ---------------------------------------------------------------------------------- per step
    def _advance(self, rows: list[Row], logits: Tensor) -> None:
        """Pick one token per row `(logits (B, V))`, emit it; finished rows leave (freeing their slots)."""
        tokens = choose_tokens(logits, [r.job.params for r in rows], [r.job.generator for r in rows])
        wants = any(r.job.params.logprobs is not None for r in rows)
        logprobs = torch.log_softmax(logits, dim=-1) if wants else None
        leaving = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            row.last = token
            if row.job.cancelled.is_set():
                row.job.finish(row.finish("cancelled"))
            elif row.job.params.max_tokens == 0:
                row.job.finish(row.finish("length"))
            else:
                reason = self._step_row(row, token, None if logprobs is None else logprobs[i])
                if reason is None:
                    continue
                row.job.finish(row.finish(reason))
            leaving.append(row)
        for row in leaving:
            self._leave(row, self.decoding)

    def _drop_cancelled(self) -> None:
        """Rows whose client went away leave before the next forward."""
        for rows in (self.decoding, self.prefilling):
            for row in [r for r in rows if r.job.cancelled.is_set()]:
                row.job.finish(row.finish("cancelled"))
                self._leave(row, rows)

    def _leave(self, row: Row, rows: list[Row]) -> None:
        """Free `row`'s slot; a decoding row's hole is filled by the last decoding row (one row's KV copied)."""
        rows.remove(row)
        self.cache.release(row.slot)
        if rows is self.decoding and row.slot < len(self.decoding):
            last = self.decoding.pop()
            self.cache.move(last.slot, row.slot, last.length)
            last.slot = row.slot
            self.decoding.insert(row.slot, last)

    def _step_row(self, row: Row, token: int, logprobs: Tensor | None) -> str | None:
        k = row.job.params.logprobs
        info = None if k is None else token_info(row.stream.decoder, token, logprobs, k)
        if token in self.eos_ids:
            # With logprobs/echo the EOS is a generated token (empty text): scoring clients drop the last entry.
            if k is not None or row.job.params.echo:
                row.generated += 1
                row.hold(None if info is None else replace(info, text=""), "")
            return "stop"
        row.generated += 1
        row.hold(info, row.stream.push(token))
        row.job.sink(TokenEvent(row.stream.take(), row.release()))
        if row.stream.stopped:
            return "stop"
        if row.generated >= row.job.params.max_tokens:
            return "length"
        if len(row.job.prompt_ids) + row.generated >= self.context_length:
            return "length"
        return None
