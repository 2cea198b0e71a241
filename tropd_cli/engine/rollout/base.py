"""The rollout backend seam: what samples responses, and the lifecycle a backend with its own weights needs.

The trainer and the evaluators only see `RolloutBackend`: token-id prompts in, token-id responses out
(`generate`), and `sync(model)` after every optimizer step, so that a backend holding its own copy of the
student's weights (a vLLM engine) samples from the policy being trained. A backend that generates with the
training model itself (`HFGenerateBackend`) has nothing to sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SamplingParams:
    """How to sample: `temperature` 0 means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class Rollouts:
    """Sampled responses, one per (prompt, sample) pair, prompt-major.

    `prompt_index[i]` is the prompt that response i continues; `finished[i]` is False when the response
    hit `max_new_tokens` before an EOS token. Responses include their EOS token when finished and no
    padding. A backend whose sampler computes its own log-probs (vLLM) may fill `logprobs[i][j]`, the
    sampler's log p of response token j (NaN where the sampler did not choose the token, e.g. a guidance
    prefix); the trainer compares them with its own (`sampler_logprob_gap`) and may correct for the
    difference, but never trains on them.
    """

    prompt_ids: list[list[int]]
    prompt_index: list[int]
    response_ids: list[list[int]]
    finished: list[bool]
    logprobs: list[list[float]] | None = None


class RolloutBackend(Protocol):
    """Samples responses from a model.

    `generate(prompt_ids, n, params, generator_seed)` returns `n` responses per prompt, prompt-major, each
    cut after its first stop token (EOS ids given when the backend was made); with temperature 0 one
    greedy response is repeated n times. The same seed gives the same responses.
    `sync(model)` makes the backend sample from `model`'s current weights; the trainer calls it after every
    optimizer step (a no-op for a backend that generates with `model` itself). `close()` releases what the
backend keeps outside the process's memory (temporary files) when the run ends.
    """

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                 generator_seed: int) -> Rollouts: ...

    def sync(self, model: torch.nn.Module) -> None: ...

    def close(self) -> None: ...


def cut_at_eos(tokens: list[int], eos_token_ids: list[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; report whether one was found."""
    for position, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[:position + 1], True
    return tokens, False
