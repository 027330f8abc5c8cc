"""Each token's own UTF-8 bytes, for chat logprobs' `bytes` (OpenAI: "useful when characters are represented by
multiple tokens": a client joins them to rebuild characters that tokens split).

A token's text piece is "" while a multi-byte character is incomplete and the whole character once it is
(`textstream`), so pieces cannot give a split character's bytes. Tokenizers that work on bytes say which they
hold: byte-level BPE (GPT-2, Llama 3, Qwen) maps each byte to one printable character, and SentencePiece's byte
fallback (Llama 2, Mistral) spells a byte `<0xE4>` and a space `▁`. Other tokenizers (word-level, WordPiece) never
split a character, so a token's bytes are its piece's.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

__all__ = ["TokenBytes"]

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenBytes:
    """`of(token_id, piece)`: the token's bytes, as a list of ints (OpenAI's shape)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._kind = _byte_kind(tokenizer)
        self._special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self.of_id = functools.lru_cache(maxsize=65536)(self._of_id)

    def of(self, token_id: int, piece: str) -> list[int]:
        if self._kind is None or token_id in self._special:
            return list(piece.encode())
        raw = self.of_id(token_id)
        return list(piece.encode()) if raw is None else list(raw)

    def _of_id(self, token_id: int) -> bytes | None:
        """The token's bytes from its vocabulary entry; None when the entry is not in the byte form expected."""
        token = self._tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(token, str):
            return None
        if self._kind == "byte_level":
            table = _unicode_to_byte()
            if not all(c in table for c in token):
                return None
            return bytes(table[c] for c in token)
        match = _BYTE_TOKEN.match(token)
        return bytes([int(match.group(1), 16)]) if match else token.replace("\u2581", " ").encode()


def _byte_kind(tokenizer: Any) -> str | None:
    """ "byte_level", "byte_fallback" or None, from a fast tokenizer's decoder (any step of a sequence of them)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, TypeError, AttributeError):
        return None
    steps = (decoder.get("decoders") or []) if decoder.get("type") == "Sequence" else [decoder]
    types = {step.get("type") for step in steps if isinstance(step, dict)}
    if "ByteLevel" in types:
        return "byte_level"
    if "ByteFallback" in types:
        return "byte_fallback"
    return None


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}
