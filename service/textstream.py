"""Incremental detokenisation with stop strings: each token's text piece, and the text no stop can still claim.

Each token's piece comes from decoding a short window of recent ids (O(1) amortised per token), the
algorithm of `tokenizers.decoders.DecodeStream`, TGI and vLLM: a token that ends inside a multi-byte UTF-8
character adds "" and the token that completes it adds the whole character, so the pieces always
concatenate to the text. It is written here rather than wrapping `DecodeStream` because it must work on any
tokenizer's `decode` (slow ones, and ones whose clean-up rewrites earlier text, which `DecodeStream`
refuses) and decode top-logprob alternatives without committing them. An incomplete character left at the
end of generation is dropped, as vLLM does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PieceDecoder", "TextStream", "prompt_pieces"]

_CONTEXT_TOKENS = 4
_INCOMPLETE = "\ufffd"


class PieceDecoder:
    """The text piece each next token adds after `context` ids (which are decoded but not returned)."""

    def __init__(self, tokenizer: Any, context: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self._window = list(context or [])  # ids from where the text of `_read` ids begins
        self._read = len(self._window)  # the window's ids already turned into text...
        self._read_text = self._decode(self._window)  # ...and that text

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """Add `token_id`; the text it adds ("" while a multi-byte character is incomplete, or for specials)."""
        self._window.append(token_id)
        piece = self._piece(self._window)
        if piece:
            del self._window[: self._read]  # the next window starts after the ids read before this piece
            self._read = len(self._window)
            self._read_text = self._decode(self._window)
        return piece

    def peek(self, token_id: int) -> str:
        """The piece `token_id` would add, without adding it (for top-logprob alternatives)."""
        return self._piece([*self._window, token_id])

    def _piece(self, window: list[int]) -> str:
        text = self._decode(window)
        if len(text) <= len(self._read_text) or text.endswith(_INCOMPLETE):
            return ""
        return text[len(self._read_text) :]


def prompt_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each prompt token's piece; they concatenate to `decode(ids, skip_special_tokens=True)` exactly."""
    decoder = PieceDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    full = str(tokenizer.decode(ids, skip_special_tokens=True))
    done = "".join(pieces)
    if pieces and full.startswith(done):
        pieces[-1] += full[len(done) :]  # an incomplete character at the very end still belongs to the prompt
    return pieces


class TextStream:
    """One row's generated text: pieces per token, stop strings, and how much of it is safe to send.

    The generated ids are decoded after the last few prompt ids, so the separator between prompt and
    completion (a leading space, for word-level and SentencePiece tokenizers alike) is kept, as OpenAI does.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], prompt_ids: list[int] | None = None) -> None:
        self.decoder = PieceDecoder(tokenizer, list(prompt_ids or [])[-_CONTEXT_TOKENS:])
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.ids: list[int] = []
        self._sent: list[str] = []  # text already handed out, in pieces
        self.sent = 0  # its length
        self._unsent = ""  # text not yet handed out: the last `hold` characters and less, bar a stop
        self.stopped = False

    @property
    def text(self) -> str:
        """All text so far (sent or not), cut before the first stop string."""
        return "".join(self._sent) + self._unsent

    def push(self, token_id: int) -> str:
        """Add a token; return the piece it adds to the text (before any stop string cuts it)."""
        self.ids.append(token_id)
        piece = self.decoder.push(token_id)
        if piece and not self.stopped:
            self._unsent += piece
            cuts = [at for at in (self._unsent.find(s) for s in self._stop) if at != -1]
            if cuts:
                self._unsent, self.stopped = self._unsent[: min(cuts)], True
        return piece

    def take(self) -> str:
        """The text now safe to send (may be empty): all of it once stopped, else all but the held tail."""
        end = len(self._unsent) if self.stopped else len(self._unsent) - self._hold
        if end <= 0:
            return ""
        out, self._unsent = self._unsent[:end], self._unsent[end:]
        self._sent.append(out)
        self.sent += len(out)
        return out

    def flush(self) -> str:
        """Everything not yet sent."""
        out, self._unsent = self._unsent, ""
        if out:
            self._sent.append(out)
            self.sent += len(out)
        return out
