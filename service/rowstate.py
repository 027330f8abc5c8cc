"""A runner's per-row state (`Row`), which attention masks a model needs (`MaskKind`), how prompt chunks
group into right-padded forwards (`plan_chunks`, the row path), and token infos for logprobs (`token_info`,
`emit_prompt_logprobs`)."""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .backend import ModelLoadError
from .jobs import FinishEvent, Job, PromptEvent, TokenEvent, TokenInfo
from .kvcache import SlotCache, SlotPlan
from .sampling import top_logprobs
from .textstream import PieceDecoder, TextStream, prompt_pieces

__all__ = ["MaskKind", "Row", "emit_prompt_logprobs", "plan_chunks", "token_info"]


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


class MaskKind:
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
        layer_types = list(getattr(config, "layer_types", None) or [])
        self.windows: tuple[int | None, ...] = tuple(
            self.sliding if kind == "sliding_attention" else None for kind in layer_types
        ) or (self.window,) * int(getattr(config, "num_hidden_layers", 0) or 0)
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


class Row:
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


def token_info(decoder: PieceDecoder, token: int, logprobs: Tensor | None, k: int) -> TokenInfo:
    """`token` with the piece it adds after what `decoder` has seen, its logprob and the top-k alternatives.

    `logprobs`: `(V,)` for this position, or None (the piece alone).
    """
    piece = decoder.peek(token)
    if logprobs is None:
        return TokenInfo(token, piece)
    values, ids = top_logprobs(logprobs, k)
    top = [TokenInfo(t, decoder.peek(t), v) for t, v in zip(ids.tolist(), values.tolist())]
    return TokenInfo(token, piece, float(logprobs[token]), top)


def emit_prompt_logprobs(tokenizer: Any, rows: list[Row], ids: Tensor, logits: Tensor) -> None:
    """For `echo` rows: each prompt token's piece and logprob given its prefix (None for the first)."""
    wanted = [i for i, r in enumerate(rows) if r.job.params.echo]
    if not wanted:
        return
    logprobs = torch.log_softmax(logits[wanted, :-1], dim=-1)
    for j, i in enumerate(wanted):
        job, k = rows[i].job, rows[i].job.params.logprobs
        pieces = prompt_pieces(tokenizer, job.prompt_ids)
        infos = [TokenInfo(job.prompt_ids[0], pieces[0])]
        if k is None:
            infos += [TokenInfo(t, p) for t, p in zip(job.prompt_ids[1:], pieces[1:])]
        else:
            decoder = PieceDecoder(tokenizer, job.prompt_ids[:1])
            start = ids.shape[1] - len(job.prompt_ids)
            for token, piece, pos in zip(job.prompt_ids[1:], pieces[1:], range(start, ids.shape[1] - 1)):
                info = token_info(decoder, token, logprobs[j, pos], k)
                infos.append(replace(info, text=piece))
                decoder.push(token)
        job.sink(PromptEvent(infos))
