"""The causal-LM backend: rows hold KV-cache slots; prompts are prefilled in chunks under a per-step token
budget while the running rows keep decoding."""

from __future__ import annotations

from typing import Any

import torch

from .backend import LoadedModel
from .errors import BadRequestError, ContextLengthError
from .generation import BatchRunner
from .jobs import Job, SamplingParams
from .metrics import Metrics

__all__ = ["CausalLMBackend"]


class CausalLMBackend:
    """Up to `max_batch_size` rows (decoding or prefilling); offered jobs take a free slot at once and their
    prompts go in `max_prefill_tokens` tokens per step, interleaved with the decode steps of running rows."""

    kind = "causal-lm"

    def __init__(
        self,
        loaded: LoadedModel,
        metrics: Metrics,
        max_batch_size: int = 16,
        max_prefill_tokens: int = 512,
        prefill_stall: float = 0.0,
        fold_cache: int = 0,
    ) -> None:
        self.loaded, self.metrics = loaded, metrics
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.runner = BatchRunner(
            loaded.model,
            loaded.tokenizer,
            loaded.device,
            loaded.context_length,
            max_batch_size,
            max_prefill_tokens,
            prefill_stall=prefill_stall,
            fold=fold_cache,
        )

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    # ---------------------------------------------------------------------------------- Backend
    def check(self, job: Job) -> None:
        self.check_fits(len(job.prompt_ids), job.params)

    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        ctx = self.context_length
        if prompt_len == 0:
            raise BadRequestError(
                "the prompt is empty after tokenisation; send at least one token", code="invalid_prompt"
            )
        if prompt_len + params.max_tokens > ctx:
            raise ContextLengthError(
                f"This model's maximum context length is {ctx} tokens, but the prompt has {prompt_len} tokens "
                f"and max_tokens is {params.max_tokens}; shorten the prompt or lower max_tokens"
            )

    def offer(self, job: Job) -> bool:
        """Room: a free KV-cache slot. The prompt itself is prefilled by the next steps, under the budget."""
        if self.runner.free_rows == 0:
            return False
        self.runner.add(job)
        return True

    def step(self) -> None:
        """One decode forward over the decoding rows, then prompt chunks up to the token budget."""
        if self.runner.decoding:
            self.metrics.batch_size.observe(len(self.runner.decoding))
        self.runner.step()

    def jobs(self) -> list[Job]:
        return [row.job for row in self.runner.rows()]

    def clear(self) -> None:
        self.runner.reset()
