"""The causal-LM backend: a continuous decode batch that waiting jobs join (prefilled under a token budget)."""

from __future__ import annotations

from typing import Any

import torch

from .backend import LoadedModel
from .errors import ContextLengthError
from .generation import BatchRunner, RunningBatch
from .jobs import Job, SamplingParams, fail_jobs
from .metrics import Metrics

__all__ = ["CausalLMBackend"]


class CausalLMBackend:
    """Up to `max_batch_size` rows decode together; new jobs are prefilled and join between steps."""

    kind = "causal-lm"

    def __init__(
        self, loaded: LoadedModel, metrics: Metrics, max_batch_size: int = 16, max_prefill_tokens: int = 512
    ) -> None:
        self.loaded, self.metrics = loaded, metrics
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.runner = BatchRunner(loaded.model, loaded.tokenizer, loaded.device, loaded.context_length)
        self._batch: RunningBatch | None = None
        self._new: list[Job] = []  # offered since the last step
        self._new_tokens = 0

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
            raise ContextLengthError("the prompt is empty after tokenisation; send at least one token")
        if prompt_len + params.max_tokens > ctx:
            raise ContextLengthError(
                f"This model's maximum context length is {ctx} tokens, but the prompt has {prompt_len} tokens "
                f"and max_tokens is {params.max_tokens}; shorten the prompt or lower max_tokens"
            )

    def offer(self, job: Job) -> bool:
        """Room: a free row, the cache can take joiners, and this step's prefill budget is not spent."""
        running = len(self._batch) if self._batch is not None else 0
        if running + len(self._new) >= self.max_batch_size or not self.runner.can_join(self._batch):
            return False
        if self._new and self._new_tokens >= self.max_prefill_tokens:
            return False
        self._new.append(job)
        self._new_tokens += len(job.prompt_ids)
        return True

    def step(self) -> None:
        """Prefill the offered jobs (a failure fails only them), merge them in, then one decode step."""
        new, self._new, self._new_tokens = self._new, [], 0
        if new:
            try:
                fresh = self.runner.admit(new)
            except Exception as exc:
                fail_jobs(new, exc)
                fresh = None
            self._batch = self.runner.merge(self._batch, fresh)
        if self._batch is not None:
            self.metrics.batch_size.observe(len(self._batch))
            self._batch = self.runner.step(self._batch)

    def jobs(self) -> list[Job]:
        running = [row.job for row in self._batch.rows] if self._batch is not None else []
        return running + self._new

    def clear(self) -> None:
        self._batch, self._new, self._new_tokens = None, [], 0
