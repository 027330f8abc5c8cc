"""Adapter memory tiers: a tiny device budget evicts to host and disk, and answers stay exact."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.tiers import Budget, Slot, pick_victims

from .conftest import ADMIN_TOKEN, World, ensure_loaded, start_server, stop_server

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
NAMES = ["alpha", "beta", "gamma"]
PROMPTS = ["the sea is", "a cat sat on the", "bread and soup"]


def _body(model: str, prompt: str) -> dict[str, object]:
    return {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 0}


def _answer(response: httpx.Response) -> tuple[str, list[float]]:
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"], [round(v, 4) for v in choice["logprobs"]["token_logprobs"]]


def _metric(text: str, series: str) -> float:
    """The value of one exposition line (`series` includes its labels, if any)."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def reference(client: httpx.Client) -> dict[tuple[str, str], tuple[str, list[float]]]:
    """Answers from the shared server, which keeps every adapter resident."""
    for name in NAMES:
        ensure_loaded(client, name)
    return {(m, p): _answer(client.post("/v1/completions", json=_body(m, p))) for m in NAMES for p in PROMPTS}


@pytest.mark.e2e
def test_tiny_budget_evicts_and_brings_back_exactly(world: World, reference) -> None:  # type: ignore[no-untyped-def]
    server = start_server(world, "--max-resident-adapters", "1", "--max-host-adapters", "1")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for name in NAMES:
                assert c.post("/v1/adapters", json={"name": name, "source": name}, headers=AUTH).status_code == 201
            tiers = {a["name"]: a["tier"] for a in c.get("/v1/adapters", headers=AUTH).json()["data"]}
            assert sorted(tiers.values()) == ["device", "disk", "host"], tiers
            assert {m["id"] for m in c.get("/v1/models").json()["data"]} >= set(NAMES)
            for _ in range(2):
                for m in NAMES:
                    for p in PROMPTS:
                        text, logprobs = _answer(c.post("/v1/completions", json=_body(m, p)))
                        assert text == reference[(m, p)][0]
                        assert logprobs == pytest.approx(reference[(m, p)][1], abs=2e-4)
            # round-robin over 3 adapters with room for 1 + 1 thrashes LRU: every miss goes to disk ...
            metrics = c.get("/metrics").text
            assert _metric(metrics, 'lokr_adapter_cache_total{event="evict_device"}') >= 4
            assert _metric(metrics, 'lokr_adapter_cache_total{event="miss_disk"}') >= 4
            # ... while the adapter just evicted comes back from host memory
            on_host = [a["name"] for a in c.get("/v1/adapters", headers=AUTH).json()["data"] if a["tier"] == "host"]
            assert len(on_host) == 1
            _answer(c.post("/v1/completions", json=_body(on_host[0], PROMPTS[0])))
            metrics = c.get("/metrics").text
            assert _metric(metrics, 'lokr_adapter_cache_total{event="miss_host"}') == 1
            assert _metric(metrics, "lokr_adapters_resident") == 1
            stats = {a["name"]: a for a in c.get("/v1/adapters", headers=AUTH).json()["data"]}
            assert sum(a["misses"] for a in stats.values()) >= 4

            async def mixed() -> list[httpx.Response]:  # in-use adapters are never evicted under load
                async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
                    calls = [ac.post("/v1/completions", json=_body(m, p)) for m in NAMES for p in PROMPTS] * 2
                    return list(await asyncio.gather(*calls))

            answers = [_answer(r) for r in asyncio.run(mixed())]
            want = [reference[(m, p)] for m in NAMES for p in PROMPTS] * 2
            for got, expected in zip(answers, want, strict=True):
                assert got[0] == expected[0]
                assert got[1] == pytest.approx(expected[1], abs=2e-3)
            assert c.delete("/v1/adapters/gamma", headers=AUTH).status_code == 200
            assert c.post("/v1/completions", json=_body("gamma", PROMPTS[0])).status_code == 404
    finally:
        stop_server(server)


# ------------------------------------------------------------------------------------ the policy alone
def _slot(name: str, last_used: int, movable: bool = True, nbytes: int = 10) -> Slot:
    return Slot(name, nbytes, last_used, movable)


def test_victims_are_least_recently_used_first_until_the_count_fits() -> None:
    slots = [_slot("c", 3), _slot("a", 1), _slot("b", 2)]
    assert pick_victims(slots, Budget(3)) == []
    assert pick_victims(slots, Budget(2)) == ["a"]
    assert pick_victims(slots, Budget(0)) == ["a", "b", "c"]


def test_unmovable_slots_count_but_never_leave() -> None:
    """Leased, draining or mid-move adapters stay (a draining one is never picked, issue 12)."""
    slots = [_slot("draining", 1, movable=False), _slot("idle", 2), _slot("leased", 3, movable=False)]
    assert pick_victims(slots, Budget(2)) == ["idle"]
    assert pick_victims(slots, Budget(1)) == ["idle"]  # still over: only movable ones can go


def test_byte_budget_evicts_until_the_bytes_fit() -> None:
    slots = [_slot("big", 1, nbytes=70), _slot("small", 2, nbytes=20), _slot("new", 3, nbytes=30)]
    assert pick_victims(slots, Budget(10, nbytes=100)) == ["big"]
    assert pick_victims(slots, Budget(10, nbytes=0)) == []  # 0 bytes = no byte limit
    assert pick_victims(slots, Budget(10, nbytes=30)) == ["big", "small"]
