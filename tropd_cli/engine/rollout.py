"""Student sampling: the rollout backend seam and its Hugging Face `generate` implementation.

The trainer and the evaluators only see `RolloutBackend.generate`: token-id prompts in, token-id
responses out. `HFGenerateBackend` batches the prompts with left padding, uses the KV cache and stops
each sequence at any EOS id; another backend (vLLM, a server) only has to honour the same contract.
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
    padding.
    """

    prompt_ids: list[list[int]]
    prompt_index: list[int]
    response_ids: list[list[int]]
    finished: list[bool]


class RolloutBackend(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                 generator_seed: int) -> Rollouts: ...


class HFGenerateBackend:
    """Rollouts with `model.generate`, in batches of at most `batch_size` sequences."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_ids: list[int],
                 batch_size: int = 256, autocast: torch.dtype | None = None) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.batch_size = batch_size
        self.autocast = autocast  # compute (and KV cache) dtype of a float32 model on a GPU

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                 generator_seed: int) -> Rollouts:
        """Sample `n` responses for each prompt (temperature 0: one greedy response repeated n times)."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        torch.manual_seed(generator_seed)
        expanded = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
        responses: list[list[int]] = []
        finished: list[bool] = []
        try:
            for start in range(0, len(expanded), self.batch_size):
                chunk = [ids for _, ids in expanded[start:start + self.batch_size]]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, ids in enumerate(chunk):
                    input_ids[row, width - len(ids):] = torch.tensor(ids)
                    attention[row, width - len(ids):] = 1
                sampling = params.temperature > 0
                kwargs = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                              top_k=0) if sampling else dict(do_sample=False)
                with torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    output = self.model.generate(
                        input_ids=input_ids.to(device), attention_mask=attention.to(device),
                        max_new_tokens=params.max_new_tokens, eos_token_id=self.eos_token_ids,
                        pad_token_id=self.pad_token_id, use_cache=True, **kwargs,
                    )
                for row in output[:, width:].tolist():
                    response, done = _cut_at_eos(row, self.eos_token_ids)
                    responses.append(response)
                    finished.append(done)
        finally:
            self.model.train(was_training)
        return Rollouts(prompt_ids=list(prompt_ids), prompt_index=[i for i, _ in expanded],
                        response_ids=responses, finished=finished)


def _cut_at_eos(tokens: list[int], eos_token_ids: list[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; report whether one was found."""
    for position, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[:position + 1], True
    return tokens, False
