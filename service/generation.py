"""Rows of a causal LM in one slot cache: prompts prefilled in chunks under a token budget, one decode forward
per step for every decoding row; rows join and leave between steps without copying anyone else's KV."""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

import lokr

from .backend import ModelLoadError
from .jobs import FinishEvent, Job, PromptEvent, TokenEvent, TokenInfo, fail_jobs
from .kvcache import SlotCache, SlotPlan
from .sampling import choose_tokens, make_generator, top_logprobs
from .textstream import PieceDecoder, TextStream, prompt_pieces

__all__ = ["BatchRunner", "plan_chunks"]


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
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.context_length, self.max_rows, self.max_prefill_tokens = context_length, max_rows, max_prefill_tokens
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.can_trim_logits = "logits_to_keep" in params
        dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
        self.masks = _MaskKind(getattr(model, "config", None), dtype)
        self.cache = SlotCache(max_rows, max_length=context_length)
        self.decoding: list[_Row] = []  # decoding[i] holds slot i
        self.prefilling: list[_Row] = []  # first come, first prefilled

    # ---------------------------------------------------------------------------------- scheduling
    @property
    def free_rows(self) -> int:
        return self.cache.free_slots

    def rows(self) -> list[_Row]:
        return self.decoding + self.prefilling

    def add(self, job: Job) -> None:
        """Give `job` a slot; its prompt is prefilled by the next steps (caller checks `free_rows`)."""
        job.generator = make_generator(job.params, self.device)
        row = _Row(job, TextStream(self.tokenizer, job.params.stop, job.prompt_ids), self.cache.take(top=True))
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
        if self.decoding:
            self._decode()
        self._prefill()

    def reset(self) -> None:
        """Forget every row (after a failed step)."""
        self.cache = SlotCache(self.max_rows, max_length=self.context_length)
        self.decoding, self.prefilling = [], []

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
        chunks: list[tuple[_Row, int]] = []
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

    def _run_group(self, group: list[tuple[_Row, int]], all_positions: bool = False) -> None:
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
                self._emit_prompt_logprobs(rows, ids, logits)
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

    def _place(self, row: _Row) -> None:
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
    def _forward(self, rows: list[_Row], ids: Tensor, plan: SlotPlan, keep: int | list[int]) -> Tensor:
        """Float32 logits `(B, K, V)` at the positions `keep` (an int: the last `keep` positions)."""
        mask = self.masks.build(self.cache, plan)
        kwargs: dict[str, Any] = {self.cache_kwarg: self.cache}
        if self.can_trim_logits:
            kwargs["logits_to_keep"] = keep if isinstance(keep, int) else torch.tensor(keep, device=self.device)
        with torch.inference_mode(), lokr.adapter_batch(self.model, [r.job.selection for r in rows]):
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=self.cache.positions(plan), use_cache=True, **kwargs
            )
        logits = out.logits
        if not self.can_trim_logits:
            logits = logits[:, -keep:] if isinstance(keep, int) else logits[:, keep]
        return logits.float()

    # ---------------------------------------------------------------------------------- per step
    def _advance(self, rows: list[_Row], logits: Tensor) -> None:
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

    def _leave(self, row: _Row, rows: list[_Row]) -> None:
        """Free `row`'s slot; a decoding row's hole is filled by the last decoding row (one row's KV copied)."""
        rows.remove(row)
        self.cache.release(row.slot)
        if rows is self.decoding and row.slot < len(self.decoding):
            last = self.decoding.pop()
            self.cache.move(last.slot, row.slot, last.length)
            last.slot = row.slot
            self.decoding.insert(row.slot, last)

    def _step_row(self, row: _Row, token: int, logprobs: Tensor | None) -> str | None:
        k = row.job.params.logprobs
        info = None if k is None else self._token_info(row.stream.decoder, token, logprobs, k)
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

    @staticmethod
    def _token_info(decoder: PieceDecoder, token: int, logprobs: Tensor | None, k: int) -> TokenInfo:
        """`token` with the piece it adds after what `decoder` has seen, its logprob and the top-k alternatives.

        `logprobs`: `(V,)` for this position, or None (the piece alone).
        """
        piece = decoder.peek(token)
        if logprobs is None:
            return TokenInfo(token, piece)
        values, ids = top_logprobs(logprobs, k)
        top = [TokenInfo(t, decoder.peek(t), v) for t, v in zip(ids.tolist(), values.tolist())]
        return TokenInfo(token, piece, float(logprobs[token]), top)

    def _emit_prompt_logprobs(self, rows: list[_Row], ids: Tensor, logits: Tensor) -> None:
        """For `echo` rows: each prompt token's piece and logprob given its prefix (None for the first)."""
        wanted = [i for i, r in enumerate(rows) if r.job.params.echo]
        if not wanted:
            return
        logprobs = torch.log_softmax(logits[wanted, :-1], dim=-1)
        for j, i in enumerate(wanted):
            job, k = rows[i].job, rows[i].job.params.logprobs
            pieces = prompt_pieces(self.tokenizer, job.prompt_ids)
            infos = [TokenInfo(job.prompt_ids[0], pieces[0])]
            if k is None:
                infos += [TokenInfo(t, p) for t, p in zip(job.prompt_ids[1:], pieces[1:])]
            else:
                decoder = PieceDecoder(self.tokenizer, job.prompt_ids[:1])
                start = ids.shape[1] - len(job.prompt_ids)
                for token, piece, pos in zip(job.prompt_ids[1:], pieces[1:], range(start, ids.shape[1] - 1)):
                    info = self._token_info(decoder, token, logprobs[j, pos], k)
                    infos.append(replace(info, text=piece))
                    decoder.push(token)
            job.sink(PromptEvent(infos))


def plan_chunks(chunks: list[tuple[Any, int]]) -> list[list[tuple[Any, int]]]:
    """Split `(row, tokens)` chunks into right-padded forwards, widest first; a chunk joins a group when it is
    at least half the group's width (so padding at most doubles a forward; a 512-token chunk does not pad 30
    short prompts to 512)."""
    groups: list[list[tuple[Any, int]]] = []
    for item in sorted(chunks, key=lambda c: -c[1]):
        group = groups[-1] if groups else None
        if group is not None and 2 * item[1] >= group[0][1]:
            group.append(item)
        else:
            groups.append([item])
    return groups


class _MaskKind:
    """Which 4D masks a model's layers need (full, sliding window, or both by layer type) and their form."""

    def __init__(self, config: Any, dtype: torch.dtype) -> None:
        self.dtype = dtype
        impl = getattr(config, "_attn_implementation", "sdpa") or "sdpa"
        self.additive = impl == "eager"
        types = set(getattr(config, "layer_types", None) or ())
        window = getattr(config, "sliding_window", None)
        self.mixed = "sliding_attention" in types and window is not None
        everywhere = not types and window is not None and getattr(config, "use_sliding_window", True)
        self.window = window if everywhere else None
        self.sliding = window if self.mixed else None
        unknown = types - {"full_attention", "sliding_attention"}
        if unknown:
            raise ModelLoadError(
                f"this model has {sorted(unknown)} layers; the server's KV cache supports full and sliding-window "
                "attention layers only"
            )

    def build(self, cache: SlotCache, plan: SlotPlan) -> Tensor | dict[str, Tensor]:
        full = cache.attention_mask(plan, self.dtype, self.additive, self.window)
        if not self.mixed:
            return full
        sliding = cache.attention_mask(plan, self.dtype, self.additive, self.sliding)
        return {"full_attention": full, "sliding_attention": sliding}


class _Row:
    """A job's state in the runner: its slot, the positions cached there, the token to feed next; token infos wait
    until their text is sent."""

    def __init__(self, job: Job, stream: TextStream, slot: int) -> None:
        self.job, self.stream, self.slot = job, stream, slot
        self.generated = 0
        self.length = 0  # positions cached in the slot
        self.last = -1  # the token chosen last, fed by the next decode forward
        self._pending: deque[tuple[int, TokenInfo]] = deque()  # (where its piece starts in the text, info)
        self._end = 0  # where the next piece starts (before a stop string cuts the text)

    def hold(self, info: TokenInfo | None, piece: str) -> None:
        if info is not None:
            self._pending.append((self._end, info))
        self._end += len(piece)

    def release(self, final: bool = False) -> list[TokenInfo]:
        """Infos whose piece is sent (every one when `final`), each cut to the sent text (a stop cuts the tail)."""
        sent, out = self.stream.sent, []
        while self._pending and (final or self._pending[0][0] + len(self._pending[0][1].text) <= sent):
            start, info = self._pending.popleft()
            keep = max(0, min(len(info.text), sent - start))
            out.append(info if keep == len(info.text) else replace(info, text=info.text[:keep]))
        return out

    def finish(self, reason: str) -> FinishEvent:
        text, infos = self.stream.flush(), self.release(final=True)
        if infos:  # the last infos go out with the last text, so tokens and text stay in step
            self.job.sink(TokenEvent(text, infos))
            text = ""
        return FinishEvent(reason, len(self.job.prompt_ids), self.generated, text)
