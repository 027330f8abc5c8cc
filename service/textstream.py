"""Incremental detokenisation with stop strings: emit only text that no stop string can still claim."""

from __future__ import annotations

from typing import Any

__all__ = ["TextStream"]

_CONTEXT_TOKENS = 4


class TextStream:
    """Tracks one row's generated ids, the text sent so far, and whether a stop string was hit."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], prompt_ids: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        # Decoding the generated ids after a few prompt ids keeps the separator between prompt and completion
        # (a leading space, for word-level and sentencepiece tokenizers alike), as OpenAI's APIs return it.
        self._context = list(prompt_ids or [])[-_CONTEXT_TOKENS:]
        self._context_text = tokenizer.decode(self._context, skip_special_tokens=True) if self._context else ""
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text now safe to send (may be empty)."""
        self.ids.append(token_id)
        self.text = self._decode()
        for stop in self._stop:
            at = self.text.find(stop)
            if at != -1:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self.flush()
        safe = len(self.text) - self._hold
        if self.text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            safe = min(safe, len(self.text) - 1)
        return self._take(safe)

    def _decode(self) -> str:
        full = self._tokenizer.decode(self._context + self.ids, skip_special_tokens=True)
        if self._context and full.startswith(self._context_text):
            return str(full[len(self._context_text) :])
        return str(self._tokenizer.decode(self.ids, skip_special_tokens=True))

    def flush(self) -> str:
        """Everything not yet sent."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out
