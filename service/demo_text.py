"""What `lokr-serve demo` prints: its banner (vocabulary, adapter root) and ready-to-paste requests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .demo import DemoAssets

__all__ = ["CHAT_PROMPT", "PROMPTS_THAT_WORK", "demo_banner", "demo_examples", "demo_vocabulary"]

CHAT_PROMPT = "the sea is"  # every word of every example prompt is in the demo's vocabulary
SPECIALS = ("<unk>", "<pad>", "<s>", "</s>")


def demo_vocabulary(model_dir: Path) -> list[str]:
    """The words the demo's word-level tokenizer knows (specials left out), from its `tokenizer.json`."""
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    return sorted(w for w in data["model"]["vocab"] if w not in SPECIALS)


PROMPTS_THAT_WORK = ("the sea", "the garden", "in the kitchen", "my friend", "the boat")  # README lists them too


def demo_banner(assets: DemoAssets) -> str:
    """What the demo serves, where its adapters live, and what its tiny vocabulary means for prompts."""
    words = demo_vocabulary(assets.model_dir)
    adapter_root = next(iter(assets.adapters.values())).parent
    sample = ", ".join(w for w in words if w.isalpha())
    return f"""lokr-serve demo: base model {assets.base_name!r} with adapters {", ".join(assets.adapters)}
  model dir:    {assets.model_dir}
  adapter root: {adapter_root} (admin loads by path read from here)
  vocabulary:   {len(words)} lower-case words; any other word becomes <unk> (a word the model never saw).
                Prompts that work: {", ".join(f'"{p}"' for p in PROMPTS_THAT_WORK)}.
                Words: {sample}"""


def demo_examples(base_url: str, base_name: str, adapters: Sequence[str]) -> str:
    """Ready-to-paste curl and openai-python requests against a running `lokr-serve demo`."""
    root = base_url.rstrip("/").removesuffix("/v1")
    first = adapters[0] if adapters else base_name
    second = adapters[1] if len(adapters) > 1 else first
    mix = json.dumps([{"name": first, "scale": 1.0}, {"name": second, "scale": 0.5}])
    chat = f'[{{"role": "user", "content": "{CHAT_PROMPT}"}}]'
    return f"""\
# list the base model and the adapters
curl -s {root}/v1/models

# completion with one adapter: set "model" to the adapter name ({", ".join(adapters) or "none loaded"})
curl -s {root}/v1/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{first}", "prompt": "the sea", "max_tokens": 16, "temperature": 0}}'

# the base model alone, as a chat
curl -s {root}/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{base_name}", "messages": {chat}, "max_tokens": 16, "temperature": 0}}'

# compose adapters on the base with the "adapters" extension field
curl -s {root}/v1/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{base_name}", "adapters": {mix}, "prompt": "the garden", "max_tokens": 16}}'

# the same from Python (pip install openai)
from openai import OpenAI
client = OpenAI(base_url="{root}/v1", api_key="unused")
print([m.id for m in client.models.list()])
out = client.completions.create(model="{first}", prompt="the sea", max_tokens=16, temperature=0)
print(out.choices[0].text)
chat = client.chat.completions.create(model="{base_name}", messages={chat}, max_tokens=16)
print(chat.choices[0].message.content)
mixed = client.completions.create(
    model="{base_name}", prompt="the garden", max_tokens=16,
    extra_body={{"adapters": {mix}}},
)
print(mixed.choices[0].text)
"""
