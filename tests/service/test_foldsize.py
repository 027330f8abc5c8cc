"""`--fold-cache auto`: folded weight copies sized from the served modules' weights and the memory left."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from service import foldsize
from service.foldsize import FoldBudget, adapted_weight_bytes, fold_copies, free_bytes
from service.settings import Settings

MIB = 2**20


def _served() -> nn.Module:
    """Linear 64x32 + bias, Conv2d 8->4 3x3, Conv1d 4->4 k1, and layers no LoKr adapts (norm, embedding)."""
    return nn.ModuleDict(
        {
            "lin": nn.Linear(32, 64),
            "conv": nn.Conv2d(8, 4, 3),
            "conv1d": nn.Conv1d(4, 4, 1),
            "norm": nn.LayerNorm(64),
            "embed": nn.Embedding(100, 16),
        }
    )


def test_one_copy_is_every_linear_and_conv_weight_and_nothing_else() -> None:
    assert adapted_weight_bytes(_served()) == 4 * (64 * 32 + 4 * 8 * 9 + 4 * 4)
    assert adapted_weight_bytes(_served().to(torch.bfloat16)) == 2 * (64 * 32 + 4 * 8 * 9 + 4 * 4)


@pytest.mark.parametrize(
    ("copy_mib", "free_mib", "share", "most", "copies"),
    [
        (10, 1000, 0.25, 8, 8),  # plenty of memory: one per image of a full batch
        (10, 200, 0.25, 8, 5),  # 50 MiB to spend: 5 copies
        (10, 30, 0.25, 8, 0),  # not even one fits: keep none (folds are then built per call)
        (10, 1000, 0.125, 1, 1),  # a causal LM keeps one at most
        (0, 0, 0.25, 4, 4),  # nothing to fold costs nothing
    ],
)
def test_the_budget_keeps_what_fits_its_share_up_to_what_a_step_can_use(
    copy_mib: int, free_mib: int, share: float, most: int, copies: int
) -> None:
    budget = FoldBudget.choose(copy_mib * MIB, free_mib * MIB, share=share, most=most)
    assert budget.copies == copies
    assert f"{copies} folded weight {'copy' if copies == 1 else 'copies'} per adapted layer" in budget.describe()


def test_auto_gives_an_image_pipeline_one_copy_per_batch_image_and_a_causal_lm_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    served, cpu = _served(), torch.device("cpu")
    monkeypatch.setattr(foldsize, "free_bytes", lambda device: 1 << 30)
    with caplog.at_level(logging.INFO, logger="lokr_serve"):
        assert fold_copies("auto", served, cpu, images=True, max_batch_size=12) == 12
        assert fold_copies("auto", served, cpu, images=False, max_batch_size=12) == 1
    assert "fold cache: 12 folded weight copies" in caplog.text
    one_copy = adapted_weight_bytes(served)
    monkeypatch.setattr(foldsize, "free_bytes", lambda device: 4 * 3 * one_copy)  # a quarter holds 3 copies
    assert fold_copies("auto", served, cpu, images=True, max_batch_size=12) == 3
    assert fold_copies("auto", served, cpu, images=False, max_batch_size=12) == 1  # an eighth holds 1.5
    monkeypatch.setattr(foldsize, "free_bytes", lambda device: one_copy)
    assert fold_copies("auto", served, cpu, images=False, max_batch_size=12) == 0


def test_a_number_is_taken_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(foldsize, "free_bytes", lambda device: 0)  # not consulted
    assert fold_copies(5, _served(), torch.device("cpu"), images=False, max_batch_size=2) == 5
    assert fold_copies(0, _served(), torch.device("cpu"), images=True, max_batch_size=2) == 0


def test_host_memory_is_what_the_machine_reports_as_available() -> None:
    available = free_bytes(torch.device("cpu"))
    assert 0 < available <= torch.iinfo(torch.int64).max
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    assert available <= total


@pytest.mark.parametrize(("given", "parsed"), [("auto", "auto"), ("Auto", "auto"), ("3", 3), (0, 0), ("0", 0)])
def test_the_setting_takes_a_count_or_auto(given: object, parsed: object) -> None:
    assert Settings(fold_cache=given).fold_cache == parsed


@pytest.mark.parametrize("given", ["-1", "x", 2.5, True, ""])
def test_the_setting_refuses_anything_else_naming_what_it_expects(given: object) -> None:
    with pytest.raises(ValueError, match="number of weight copies .* or 'auto'"):
        Settings(fold_cache=given)


def test_auto_is_the_default() -> None:
    assert Settings().fold_cache == "auto"
