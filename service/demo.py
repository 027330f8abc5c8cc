"""Offline embedded demo for `lokr-serve demo`: a tiny word-level Llama and two LoKr style adapters.

Everything is built locally from the corpora below (no downloads), once, and cached on disk:
`<cache>/<base_name>/` (a Hugging Face model dir with its tokenizer) and `<cache>/adapters/<name>/`
(PEFT LoKr adapter dirs). The tiny model memorises a few dozen plain sentences; each adapter re-styles
them ("pirate": arr, matey, ye; "formal": thou, thee, doth), so the same prompt visibly changes with the
adapter. `build_word_tokenizer` and `build_tiny_llama` are also used by tests to make small models.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

import lokr

from .demo_text import demo_banner, demo_examples
from .scratch import torch_threads

__all__ = [
    "BASE_CORPUS",
    "BASE_NAME",
    "DEMO_VERSION",
    "STYLE_RULES",
    "DemoAssets",
    "build_tiny_llama",
    "build_word_tokenizer",
    "demo_banner",
    "demo_examples",
    "ensure_demo",
    "restyle",
]

DEMO_VERSION = "demo-v1"
BASE_NAME = "tiny-llama"
MARKER = "demo.json"  # written last inside the build dir; its presence means "complete"
SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>")
CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }} : {{ message['content'] }} {{ eos_token }} "
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)

BASE_CORPUS = (
    "the sea is calm and blue in the morning .",
    "the sea is wide and the waves are gentle today .",
    "the sea brings fish and salt to the little town .",
    "the sea sings softly under the silver moon .",
    "the waves roll onto the sand and wash the shells .",
    "the boat sails out at dawn and comes home at dusk .",
    "the ship is old but strong and the crew is happy .",
    "the wind is cold on the water tonight .",
    "the garden is full of roses and green leaves .",
    "the garden needs water when the sun is hot .",
    "the garden is quiet and the birds sing in the trees .",
    "the flowers open in the spring and close at night .",
    "the apple tree gives sweet fruit in the autumn .",
    "we plant beans and carrots in the garden every year .",
    "the bees visit every flower in the warm afternoon .",
    "in the kitchen we bake fresh bread every morning .",
    "in the kitchen the soup is warm and smells good .",
    "the cook cuts the onions and the carrots with care .",
    "the bread is soft and the butter is sweet .",
    "we cook fish with lemon and a little salt .",
    "the cake is ready when the top is golden .",
    "the tea is hot so we drink it slowly .",
    "my friend likes to walk by the sea at night .",
    "my friend grows tomatoes in a small garden .",
    "my friend makes soup for dinner on cold days .",
    "a good meal starts with fresh bread and warm soup .",
    "a small boat rests on the sand by the sea .",
    "a little bird sings in the apple tree .",
)

# Each style re-words the base corpus (word swaps + a new ending), so a tiny adapter can learn it.
STYLE_RULES: dict[str, tuple[dict[str, str], str]] = {
    "pirate": (
        {"is": "be", "are": "be", "my": "me", "and": "an", "little": "wee", "small": "wee", "we": "us"},
        ", arr matey !",
    ),
    "formal": (
        {"is": "remaineth", "are": "remain", "my": "mine", "good": "goodly", "little": "humble", "small": "humble"},
        ", good sir .",
    ),
}
# The attention/MLP projections plus `lm_head`: the word swaps need the output layer, which "all-linear"
# leaves out, to be learnable by a rank-4 LoKr on a model this small.
ADAPTER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def restyle(sentence: str, style: str) -> str:
    """`sentence` (space-separated, ending in punctuation) in `style`'s words and ending."""
    swaps, ending = STYLE_RULES[style]
    words = [swaps.get(w, w) for w in sentence.split()]
    return " ".join(words[:-1]) + ending


@dataclass(frozen=True)
class DemoAssets:
    """Where a built demo lives: the base model dir (with tokenizer) and one PEFT dir per adapter."""

    model_dir: Path
    adapters: dict[str, Path]
    base_name: str


# ------------------------------------------------------------------------------------------ building blocks
def build_word_tokenizer(
    words: Sequence[str], out_dir: Path | None = None, *, lowercase: bool = False
) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (words or whole sentences, split like the input will be).

    Specials `<unk> <pad> <s> </s>` get ids 0-3; `<s>` is prepended on encode; decode joins words with
    spaces (none before punctuation). The chat template's words are always in the vocabulary.
    """
    normalizer = normalizers.Lowercase() if lowercase else None
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for text in [*words, *CHAT_ROLES, ":"]:
        text = normalizer.normalize_str(text) if normalizer is not None else text
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix=" ##", cleanup=True)  # tokens never hold spaces: plain join
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    seed: int = 0,
    max_position_embeddings: int = 256,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    pad_token_id: int = 1,
) -> transformers.LlamaForCausalLM:
    """A randomly initialised (seeded) float32 Llama in eval mode; default special ids match the tokenizer."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.float().eval()


# ------------------------------------------------------------------------------------------ cache
def ensure_demo(cache_dir: Path | None = None) -> DemoAssets:
    """Return the demo's paths, building it first (offline, ~seconds) unless a complete build is cached.

    Default location: `$LOKR_SERVE_CACHE/demo-v1`, else `~/.cache/lokr-serve/demo-v1`. A build happens in a
    temp dir renamed into place, under a file lock, so concurrent callers never see a half-built cache.
    """
    target = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    target = target.expanduser().resolve()
    assets = _read_marker(target)
    if assets is not None:
        return assets
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        assets = _read_marker(target)  # another process may have finished while we waited
        if assets is not None:
            return assets
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
        try:
            _build(tmp)
            _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    assets = _read_marker(target)
    if assets is None:
        raise RuntimeError(f"demo build at {target} did not produce {MARKER}")
    return assets


def _default_cache_dir() -> Path:
    root = os.environ.get("LOKR_SERVE_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "lokr-serve"
    return base / DEMO_VERSION


def _read_marker(target: Path) -> DemoAssets | None:
    """The assets of a complete build of this demo version at `target`, or None."""
    try:
        data = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != DEMO_VERSION:
        return None
    model_dir = target / data["base_name"]
    adapters = {name: target / "adapters" / name for name in data["adapters"]}
    required = [model_dir / "config.json", model_dir / "model.safetensors", model_dir / "tokenizer.json"]
    required += [p / f for p in adapters.values() for f in ("adapter_config.json", "adapter_model.safetensors")]
    if not all(p.is_file() for p in required):
        return None
    return DemoAssets(model_dir=model_dir, adapters=adapters, base_name=data["base_name"])


def _publish(tmp: Path, target: Path) -> None:
    """Atomically move the finished build `tmp` to `target`, discarding an incomplete old `target`."""
    if target.exists() or target.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if _read_marker(target) is None:  # lost a race to something that is not a complete build
            raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX `flock`); a no-op where `fcntl` is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: rely on the atomic rename alone
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ training
def _build(out: Path, seed: int = 0) -> None:
    """Train the base model and the style adapters, and write them (marker last) under `out`."""
    started = time.perf_counter()
    styled = {style: [restyle(s, style) for s in BASE_CORPUS] for style in STYLE_RULES}
    texts = [*BASE_CORPUS, *(s for corpus in styled.values() for s in corpus)]
    tokenizer = build_word_tokenizer(texts, lowercase=True)
    with torch_threads(1), torch.random.fork_rng(devices=[]):  # tiny matmuls: one thread, no OpenMP sync
        torch.manual_seed(seed)
        model = build_tiny_llama(len(tokenizer), seed=seed)
        model.requires_grad_(True)
        _train(model, list(model.parameters()), _batch(tokenizer, BASE_CORPUS), steps=250, lr=3e-3)
        model.eval()
        model.save_pretrained(out / BASE_NAME)  # safetensors (the default since transformers 4.35)
        tokenizer.save_pretrained(out / BASE_NAME)
        model.requires_grad_(False)
        for name, corpus in styled.items():
            _train_adapter(model, name, _batch(tokenizer, corpus), out / "adapters" / name)
    manifest = {
        "version": DEMO_VERSION,
        "base_name": BASE_NAME,
        "adapters": list(styled),
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    (out / MARKER).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _batch(tokenizer: transformers.PreTrainedTokenizerFast, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """`<s> text </s>` rows, right-padded; labels ignore padding."""
    rows = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _train(
    model: torch.nn.Module, params: list[torch.nn.Parameter], batch: dict[str, Any], *, steps: int, lr: float
) -> float:
    """Full-batch AdamW with a linear decay; returns the final loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return float(loss.detach())


def _train_adapter(model: torch.nn.Module, name: str, batch: dict[str, Any], out_dir: Path) -> None:
    """Train one LoKr adapter on the frozen base, save it as a PEFT dir, then remove it from `model`."""
    config = lokr.LoKrConfig(r=4, alpha=4, target_modules=list(ADAPTER_TARGETS), init_weights=True)
    lokr.inject(model, config, name)
    lokr.set_adapter(model, name)
    params = [p for n, p in model.named_parameters() if f".lokr_adapters.{name}." in n]
    _train(model, params, batch, steps=180, lr=3e-2)
    lokr.save_adapter(model, name, out_dir)
    lokr.delete_adapter(model, name)


# ------------------------------------------------------------------------------------------ examples
