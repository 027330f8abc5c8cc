"""lm-evaluation-harness scores a task the same through our server and through its own HF + PEFT backend.

`local-completions` sends token prompts with `echo: true, logprobs: 1, max_tokens: 1` and drops the last
logprob entry as the generated token; when that token is an EOS the server must still return it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from .conftest import Server, World, ensure_loaded

TASK_DIR = Path(__file__).parent / "lmeval"
TASK = "lokr_tiny_mc"


def _evaluate(model: str, model_args: dict[str, Any], include: Path) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(include)),
        log_samples=True,
        batch_size=1,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    assert results is not None
    return results


def _per_sample(results: dict[str, Any]) -> list[tuple[int, list[tuple[float, bool]]]]:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [(s["doc_id"], [(float(r[0][0]), bool(r[0][1])) for r in s["resps"]]) for s in samples]


@pytest.mark.slow
def test_lm_eval_scores_equal_through_server_and_hf_peft(
    world: World, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lm_eval")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    include = tmp_path / "tasks"
    include.mkdir()
    data = (TASK_DIR / "tiny_mc.jsonl").resolve()
    (include / "tiny_mc.yaml").write_text((TASK_DIR / "tiny_mc.yaml").read_text().replace("DATA_FILE", str(data)))

    import httpx

    with httpx.Client(base_url=server.url, timeout=60) as client:
        ensure_loaded(client, "alpha")
    ours = _evaluate(
        "local-completions",
        {
            "model": "alpha",
            "base_url": f"{server.url}/v1/completions",
            "tokenizer": str(world.model_dir),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "add_bos_token": True,  # as the HF backend's tokenizer does (its post-processor adds <s>)
            "num_concurrent": 1,
            "max_retries": 1,
        },
        include,
    )
    theirs = _evaluate(
        "hf",
        {"pretrained": str(world.model_dir), "peft": str(world.adapters["alpha"]), "dtype": "float32", "device": "cpu"},
        include,
    )
    got, want = _per_sample(ours), _per_sample(theirs)
    assert [d for d, _ in got] == [d for d, _ in want] and len(got) == 16
    for (_, a), (_, b) in zip(got, want):
        assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-4)
        assert [x[1] for x in a] == [x[1] for x in b]
    assert ours["results"][TASK]["acc,none"] == theirs["results"][TASK]["acc,none"]
    assert os.environ["HF_HUB_OFFLINE"] == "1"
