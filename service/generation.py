"""One batch of rows on a causal LM: left-padded prefill, then decode steps; rows leave when done."""

from __future__ import annotations

import inspect
from collections import deque
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

import lokr

from .jobs import FinishEvent, Job, PromptEvent, TokenEvent, TokenInfo
from .kvcache import can_merge, merge_caches, trim_left
from .sampling import choose_tokens, make_generator, top_logprobs
from .textstream import PieceDecoder, TextStream, prompt_pieces

__all__ = ["BatchRunner", "RunningBatch"]


class BatchRunner:
    """Runs `jobs` to completion on `model` with per-row adapters; emits events through each job."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, context_length: int) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.context_length = context_length
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
        self.can_trim_logits = "logits_to_keep" in params

    def run(self, jobs: list[Job]) -> None:
        """Generate every job to completion as one batch (no joining); for callers without a scheduler."""
        batch = self.admit(jobs)
        while batch is not None:
            batch = self.step(batch)

    def admit(self, jobs: list[Job]) -> RunningBatch | None:
        """Prefill `jobs` together and pick each row's first token; None when every row already finished."""
        rows = [_Row(job, TextStream(self.tokenizer, job.params.stop, job.prompt_ids)) for job in jobs]
        for row in rows:
            row.job.generator = make_generator(row.job.params, self.device)
        logits, cache, mask = self._prefill(rows)
        return self._advance(RunningBatch(rows, cache, mask), logits[:, -1])

    def step(self, batch: RunningBatch) -> RunningBatch | None:
        """Feed every row's last token, pick the next one; finished rows leave and free their KV rows."""
        last = torch.tensor([[r.stream.ids[-1]] for r in batch.rows], device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        logits = self._forward(batch.rows, last, batch.mask, batch.cache)
        return self._advance(batch, logits[:, -1])

    def merge(self, running: RunningBatch | None, fresh: RunningBatch | None) -> RunningBatch | None:
        """Rows of `fresh` join `running` (both between steps: each row's last token not yet fed)."""
        if running is None:
            return fresh
        if fresh is None:
            return running
        cache, mask = merge_caches(running.cache, running.mask, fresh.cache, fresh.mask)
        return RunningBatch(running.rows + fresh.rows, cache, mask)

    @staticmethod
    def can_join(batch: RunningBatch | None) -> bool:
        """New rows can join mid-flight only when the model's KV cache layers can be padded and merged."""
        return batch is None or can_merge(batch.cache)

    # ----------------------------------------------------------------------------------- forward
    def _prefill(self, rows: list[_Row]) -> tuple[Tensor, Any, Tensor]:
        from transformers import DynamicCache

        width = max(len(r.job.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.job.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.job.prompt_ids)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        echo = any(r.job.params.echo for r in rows)
        logits = self._forward(rows, ids, mask, cache, all_positions=echo)
        self._emit_prompt_logprobs(rows, ids, logits)
        return logits, cache, mask

    def _forward(self, rows: list[_Row], ids: Tensor, mask: Tensor, cache: Any, all_positions: bool = False) -> Tensor:
        """Float32 logits `(B, T, V)`: every input position when `all_positions` (echo scoring), else the last."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        with torch.inference_mode(), lokr.adapter_batch(self.model, [r.job.selection for r in rows]):
            kwargs: dict[str, Any] = {self.cache_kwarg: cache}
            if self.can_trim_logits and not all_positions:
                kwargs["logits_to_keep"] = 1
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits.float()

    # ----------------------------------------------------------------------------------- per step
    def _advance(self, batch: RunningBatch, logits: Tensor) -> RunningBatch | None:
        """Pick one token per row, emit it, drop finished rows (and their KV rows); None when all finished."""
        rows = batch.rows
        tokens = choose_tokens(logits, [r.job.params for r in rows], [r.job.generator for r in rows])
        wants = any(r.job.params.logprobs is not None for r in rows)
        logprobs = torch.log_softmax(logits, dim=-1) if wants else None
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if row.job.cancelled.is_set():
                row.job.finish(row.finish("cancelled"))
            elif row.job.params.max_tokens == 0:
                row.job.finish(row.finish("length"))
            else:
                reason = self._step_row(row, token, None if logprobs is None else logprobs[i])
                if reason is None:
                    keep.append(i)
                else:
                    row.job.finish(row.finish(reason))
        return batch.select(keep, self.device)

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


class RunningBatch:
    """Rows decoding together, their shared KV cache and their left-padded attention mask `(B, T)`."""

    def __init__(self, rows: list[_Row], cache: Any, mask: Tensor) -> None:
        self.rows, self.cache, self.mask = rows, cache, mask

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, keep: list[int], device: torch.device) -> RunningBatch | None:
        """Keep rows `keep` (indices into `rows`); None when no row is left."""
        if not keep:
            return None
        if len(keep) != len(self.rows):
            index = torch.tensor(keep, device=device)
            self.cache.batch_select_indices(index)
            self.mask = trim_left(self.cache, self.mask.index_select(0, index))
            self.rows = [self.rows[i] for i in keep]
        return self


class _Row:
    """A job's decoding state inside one batch; token infos wait until their text is sent."""

    def __init__(self, job: Job, stream: TextStream) -> None:
        self.job, self.stream, self.generated = job, stream, 0
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
