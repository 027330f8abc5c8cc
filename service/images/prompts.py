"""AUTOMATIC1111's prompt syntax, as its API reads prompts: emphasis, `BREAK` and prompts longer than CLIP's window.

- Emphasis: `(text)` weighs `text` 1.1x, `[text]` 1/1.1x, `(text:1.5)` 1.5x; brackets nest and multiply, an
  unclosed one runs to the end, `\\(` `\\)` `\\[` `\\]` `\\\\` are the characters themselves.
- `BREAK` (a word of its own) ends the current chunk: what follows starts a new one.
- Chunks: the prompt's tokens go into chunks of the tokenizer's window less its start and end tokens (75 for CLIP);
  a chunk that fills up within 20 tokens after a comma moves the words after that comma to the next chunk. Each
  chunk is encoded on its own and the encodings are joined, so nothing is cut at 77 tokens.

The text encoders then scale each token's output by its weight and restore the chunk's mean (A1111's "Original"
emphasis; `clip_text`). A prompt without brackets or `BREAK` that fits one chunk is exactly diffusers' encoding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequestError

__all__ = ["BREAK", "Chunk", "Piece", "check_prompt", "chunk_prompt", "parse_emphasis", "plain_chunk"]

ROUND = 1.1  # `(text)`
SQUARE = 1 / 1.1  # `[text]`
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`

# One lexical unit of the syntax, tried in order: an escaped bracket or backslash, a lone backslash (dropped),
# an opening bracket, `:weight)` closing a round bracket, a closing bracket, plain text, a stray colon.
_UNIT = re.compile(
    r"""
      \\ (?P<escaped>[()\[\]\\])
    | (?P<lone>\\)
    | (?P<open>[(\[])
    | :\s* (?P<weight>[+-]?[.\d]+) \s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+ | :)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
# A1111's prompt editing (`[from:to:when]`, `[to:when]`: a number after the last colon) and alternation (`[a|b]`),
# read before emphasis, at the top level of a square bracket (not escaped); this server does not serve them
_ROUND_GROUP = re.compile(r"(?<!\\)\((?:[^()\\]|\\.)*(?<!\\)\)")
_SCHEDULED = re.compile(r"(?<!\\)\[(?:[^\[\]\\]|\\.)*(?::\s*[+-]?[\d.]+\s*|\|(?:[^\[\]\\]|\\.)*)(?<!\\)\]")


@dataclass(frozen=True)
class Piece:
    """A run of prompt text with one weight."""

    text: str
    weight: float


BREAK = Piece("BREAK", float("nan"))  # the chunk break marker (compared by identity)


def parse_emphasis(prompt: str) -> list[Piece]:
    """`prompt` as runs of text with their weights and `BREAK` markers; neighbouring runs of equal weight are one.

    `"a (red:1.3) cat"` -> `[Piece("a ", 1.0), Piece("red", 1.3), Piece(" cat", 1.0)]`; `""` -> `[Piece("", 1.0)]`.
    """
    texts: list[str | None] = []  # None: a BREAK
    weights: list[float] = []
    opened: list[tuple[str, int]] = []  # ("(" or "[", the index of the first run inside it)

    def scale(since: int, factor: float) -> None:
        for i in range(since, len(weights)):
            weights[i] *= factor

    def close(kind: str, factor: float) -> bool:
        """Apply the innermost open bracket of `kind` (A1111 pairs each closer with the last opener of its kind)."""
        for i in range(len(opened) - 1, -1, -1):
            if opened[i][0] == kind:
                scale(opened.pop(i)[1], factor)
                return True
        return False

    for unit in _UNIT.finditer(prompt):
        if unit["escaped"] is not None:
            texts.append(unit["escaped"])
            weights.append(1.0)
        elif unit["lone"] is not None:
            continue
        elif unit["open"] is not None:
            opened.append((unit["open"], len(texts)))
        elif unit["weight"] is not None:
            if any(kind == "(" for kind, _ in opened):
                close("(", _weight(unit["weight"], unit.group(0)))
            else:  # no bracket to close: text
                _add_text(texts, weights, unit.group(0))
        elif unit["close"] is not None:
            kind = "(" if unit["close"] == ")" else "["
            if not close(kind, ROUND if kind == "(" else SQUARE):
                _add_text(texts, weights, unit["close"])
        else:
            _add_text(texts, weights, unit["text"])
    for kind, since in reversed(opened):  # unclosed brackets weigh the rest of the prompt
        scale(since, ROUND if kind == "(" else SQUARE)
    return _merged(texts, weights)


def check_prompt(prompt: str) -> None:
    """A 400 for what this server does not read as A1111 does: prompt editing, alternation, weights that are not
    numbers."""
    flat, before = prompt, ""
    while flat != before:  # round groups out of the way: a colon in `(text:1.2)` is a weight
        before, flat = flat, _ROUND_GROUP.sub("(...)", flat)
    scheduled = _SCHEDULED.search(flat)
    if scheduled:
        raise BadRequestError(
            f"prompt {scheduled.group(0)!r}: A1111's prompt editing ([from:to:when]) and alternation ([a|b]) are not "
            "served; escape the brackets (\\[ \\]) to mean them as text",
            code="invalid_prompt",
        )
    parse_emphasis(prompt)


def _weight(text: str, unit: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadRequestError(
            f"prompt emphasis {unit!r}: the weight must be a number, as in (text:1.2)", code="invalid_prompt"
        ) from None


def _add_text(texts: list[str | None], weights: list[float], text: str) -> None:
    """Plain text, split at `BREAK` words into runs and markers."""
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            texts.append(None)
            weights.append(1.0)
        texts.append(part)
        weights.append(1.0)


def _merged(texts: list[str | None], weights: list[float]) -> list[Piece]:
    pieces: list[Piece] = []
    for text, weight in zip(texts, weights):
        if text is None:
            pieces.append(BREAK)
        elif pieces and pieces[-1] is not BREAK and pieces[-1].weight == weight:
            pieces[-1] = Piece(pieces[-1].text + text, weight)
        else:
            pieces.append(Piece(text, weight))
    return pieces or [Piece("", 1.0)]


@dataclass
class Chunk:
    """Up to a window's worth of prompt tokens (start and end tokens not included) and their weights."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for w in self.weights)


def chunk_prompt(tokenizer: Any, prompt: str) -> list[Chunk]:
    """A1111's chunks of `prompt` (see the module docstring): at least one, each of at most `window(tokenizer)`
    tokens."""
    size = window(tokenizer)
    comma = tokenizer.get_vocab().get(",</w>")
    pieces = parse_emphasis(prompt)
    ids = _token_ids(tokenizer, [p.text for p in pieces if p is not BREAK])
    chunks: list[Chunk] = []
    current, last_comma = Chunk(), -1
    for piece in pieces:
        if piece is BREAK:
            chunks.append(current)
            current, last_comma = Chunk(), -1
            continue
        for token in ids.pop(0):
            if token == comma:
                last_comma = len(current.ids)
            elif len(current.ids) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1  # the words after the comma move to the next chunk
                chunks.append(Chunk(current.ids[:cut], current.weights[:cut]))
                current, last_comma = Chunk(current.ids[cut:], current.weights[cut:]), -1
            if len(current.ids) == size:
                chunks.append(current)
                current, last_comma = Chunk(), -1
            current.ids.append(token)
            current.weights.append(piece.weight)
    if current.ids or not chunks:
        chunks.append(current)
    return chunks


def plain_chunk(tokenizer: Any, prompt: str) -> Chunk:
    """`prompt` as diffusers reads it: its tokens cut to the window, all of weight 1."""
    ids = _token_ids(tokenizer, [prompt])[0][: window(tokenizer)]
    return Chunk(ids, [1.0] * len(ids))


def window(tokenizer: Any) -> int:
    """Prompt tokens one encoder pass takes: the tokenizer's length less the start and end tokens (75 for CLIP)."""
    return int(tokenizer.model_max_length) - 2


def _token_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    out: list[list[int]] = tokenizer(list(texts), truncation=False, add_special_tokens=False, verbose=False)[
        "input_ids"
    ]
    return out
