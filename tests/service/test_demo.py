"""The offline demo: tokenizer/model builders, the cached build, and what the adapters do to generation."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

import lokr
from service import demo

PROMPTS = ("the sea", "the garden", "in the kitchen")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run much faster on one intra-op thread (OpenMP sync dominates on 2 busy cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def greedy(model: torch.nn.Module, tokenizer: transformers.PreTrainedTokenizerBase, prompt: str, n: int = 16) -> str:
    """Greedy continuation of `prompt` (stops at eos), decoded without special tokens."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
    return str(tokenizer.decode(ids, skip_special_tokens=True))


# ------------------------------------------------------------------------------------------ tokenizer
def test_word_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = demo.build_word_tokenizer(["hello", "world", "the sea is calm ."], out_dir=tmp_path)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<pad>", "<s>", "</s>"]
    assert (tok.unk_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = tok("hello world. the sea is calm.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "hello world. the sea is calm."
    assert tok("hello mars")["input_ids"][-1] == tok.unk_token_id

    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("hello world.")["input_ids"] == tok("hello world.")["input_ids"]
    assert reloaded.chat_template == tok.chat_template
    assert len(reloaded) == len(tok)


def test_word_tokenizer_lowercase_and_any_words() -> None:
    tok = demo.build_word_tokenizer(["The", "Sea", "don't", "x"], lowercase=True)
    assert tok.unk_token_id not in tok("THE sea don't")["input_ids"]
    decoded = str(tok.decode(tok("the sea don't")["input_ids"], skip_special_tokens=True))
    assert decoded.split() == ["the", "sea", "don", "'", "t"]  # punctuation is its own word
    assert len(demo.build_word_tokenizer([])) > 4  # specials + the chat template's words


def test_chat_template_uses_only_vocabulary_words() -> None:
    tok = demo.build_word_tokenizer(["hello", "world", "hi"])
    messages = [
        {"role": "system", "content": "hi"},
        {"role": "user", "content": "hello world"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>system : hi </s> user : hello world </s> assistant :"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert ids.count(tok.eos_token_id) == 2


# ------------------------------------------------------------------------------------------ model
def test_build_tiny_llama_is_seeded_float32_eval() -> None:
    a = demo.build_tiny_llama(50, seed=1)
    b = demo.build_tiny_llama(50, seed=1)
    c = demo.build_tiny_llama(50, seed=2)
    assert not a.training
    assert a.config.vocab_size == 50 and a.config.eos_token_id == 3
    assert all(p.dtype == torch.float32 for p in a.parameters())
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a(torch.tensor([[2, 5, 7]])).logits.shape == (1, 3, 50)


# ------------------------------------------------------------------------------------------ cache logic
def _fake_build(out: Path, seed: int = 0) -> None:
    """Writes the files ensure_demo checks for, without training anything."""
    for rel in ("m/config.json", "m/model.safetensors", "m/tokenizer.json"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("{}")
    for name in ("a", "b"):
        (out / "adapters" / name).mkdir(parents=True)
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (out / "adapters" / name / f).write_text("{}")
    time.sleep(0.2)  # long enough for a second caller to arrive while we build
    (out / demo.MARKER).write_text(json.dumps({"version": demo.DEMO_VERSION, "base_name": "m", "adapters": ["a", "b"]}))


def test_cache_replaces_half_built_dir_and_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def counting_build(out: Path, seed: int = 0) -> None:
        calls.append(out)
        _fake_build(out, seed)

    monkeypatch.setattr(demo, "_build", counting_build)
    target = tmp_path / "cache"
    (target / "m").mkdir(parents=True)  # a crashed, marker-less build
    (target / "m" / "config.json").write_text("partial")

    results: list[demo.DemoAssets] = []
    threads = [threading.Thread(target=lambda: results.append(demo.ensure_demo(target))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 3 and all(r == results[0] for r in results)
    assert results[0].model_dir == target.resolve() / "m"
    assert (target / "m" / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["cache"]


def test_default_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKR_SERVE_CACHE", str(tmp_path))
    assert demo._default_cache_dir() == tmp_path / demo.DEMO_VERSION
    monkeypatch.delenv("LOKR_SERVE_CACHE")
    assert demo._default_cache_dir() == Path.home() / ".cache" / "lokr-serve" / demo.DEMO_VERSION


# ------------------------------------------------------------------------------------------ the real build
@pytest.fixture(scope="module")
def built(demo_assets: demo.DemoAssets) -> demo.DemoAssets:
    """The session's demo build (tests/conftest.py)."""
    return demo_assets


def test_build_writes_model_tokenizer_and_adapters(built: demo.DemoAssets) -> None:
    assets = built
    assert assets.base_name == demo.BASE_NAME
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (assets.model_dir / name).is_file()
    assert set(assets.adapters) == set(demo.STYLE_RULES)
    for path in assets.adapters.values():
        assert (path / "adapter_config.json").is_file()
        assert (path / "adapter_model.safetensors").is_file()
        assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LOKR"


def test_second_call_reuses_cache(built: demo.DemoAssets, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = built
    monkeypatch.setattr(demo, "_build", lambda *a, **k: pytest.fail("rebuilt a complete cache"))
    again = demo.ensure_demo(assets.model_dir.parent)
    assert again == assets


@pytest.fixture(scope="module")
def loaded(
    built: demo.DemoAssets,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase, demo.DemoAssets]:
    assets = built
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(assets.model_dir).eval()
    for name, path in assets.adapters.items():
        lokr.load_adapter(model, path, name)
    return model, tokenizer, assets


def test_base_model_continues_with_corpus_text(loaded: tuple) -> None:
    model, tokenizer, _ = loaded
    lokr.set_adapter(model, None)
    corpus_words = {w for s in demo.BASE_CORPUS for w in s.split()}
    outputs = [greedy(model, tokenizer, p) for p in PROMPTS]
    for text in outputs:
        words = re.findall(r"\w+|[^\w\s]", text)
        assert len(words) > 4 and set(words) <= corpus_words, text
    normalised = {re.sub(r" ([.,!])", r"\1", s) for s in demo.BASE_CORPUS}
    assert any(text in normalised for text in outputs), outputs


def test_each_adapter_changes_the_continuation(loaded: tuple) -> None:
    model, tokenizer, assets = loaded
    by_adapter: dict[str | None, list[str]] = {}
    for name in [None, *assets.adapters]:
        lokr.set_adapter(model, name)
        by_adapter[name] = [greedy(model, tokenizer, p) for p in PROMPTS]
    lokr.set_adapter(model, None)
    assert by_adapter["pirate"] != by_adapter[None]
    assert by_adapter["formal"] != by_adapter[None]
    assert by_adapter["pirate"] != by_adapter["formal"]
    assert all(a != b for a, b in zip(by_adapter["pirate"], by_adapter["formal"]))
    assert any("arr" in t or " be " in t for t in by_adapter["pirate"]), by_adapter["pirate"]
    assert any("sir" in t or "remaineth" in t for t in by_adapter["formal"]), by_adapter["formal"]


# ------------------------------------------------------------------------------------------ examples
def test_demo_examples_are_pasteable() -> None:
    text = demo.demo_examples("http://127.0.0.1:8000/", "tiny-llama", ["pirate", "formal"])
    assert "curl -s http://127.0.0.1:8000/v1/models" in text
    assert 'base_url="http://127.0.0.1:8000/v1"' in text
    bodies = [json.loads(body) for body in re.findall(r"-d '(.*?)'", text)]
    assert {b["model"] for b in bodies} == {"pirate", "tiny-llama"}
    mixed = next(b for b in bodies if "adapters" in b)
    assert mixed["adapters"] == [{"name": "pirate", "scale": 1.0}, {"name": "formal", "scale": 0.5}]
    assert any("messages" in b for b in bodies)
    assert "from openai import OpenAI" in text and "extra_body" in text
    assert demo.demo_examples("http://h:1/v1", "base", []).count("http://h:1/v1/v1") == 0


# ------------------------------------------------------------------------------------------ banner
def test_banner_states_vocabulary_unk_and_adapter_root(built: demo.DemoAssets) -> None:
    from service.demo_text import PROMPTS_THAT_WORK, demo_vocabulary

    text = demo.demo_banner(built)
    words = demo_vocabulary(built.model_dir)
    assert 100 < len(words) < 200
    assert f"{len(words)} lower-case words" in text and "<unk>" in text
    assert str(built.adapters["pirate"].parent) in text
    tokenizer = transformers.AutoTokenizer.from_pretrained(built.model_dir)
    examples = demo.demo_examples("http://h:1", built.base_name, list(built.adapters))
    prompts = re.findall(r'"(?:prompt|content)": "([^"]+)"', examples) + re.findall(r'prompt="([^"]+)"', examples)
    prompts += re.findall(r'"([a-z ]+)"', text.split("Prompts that work:")[1].splitlines()[0])
    assert len(prompts) >= 6
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    listed = readme.split("Prompts that work:")[1].split(". It is built")[0]
    assert re.findall(r"`([a-z ]+)`", listed) == list(PROMPTS_THAT_WORK)  # the README's list is the banner's
    for prompt in prompts:  # every suggested prompt is made of words the demo knows
        assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"], prompt
