"""Rollouts with transformers' `generate` on the training model itself (`rollout.backend: hf`).

`HFGenerateBackend` batches the prompts with left padding, uses the KV cache and stops each sequence at
any EOS id. It samples from the very module that trains, so `sync` has nothing to do.
"""

from __future__ import annotations

import torch

from tropd_cli.engine.rollout.base import Rollouts, SamplingParams, cut_at_eos


class HFGenerateBackend:
    """Rollouts with `model.generate`, in batches of at most `batch_size` sequences."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_ids: list[int],
                 batch_size: int = 256, autocast: torch.dtype | None = None) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.batch_size = batch_size
        self.autocast = autocast  # compute (and KV cache) dtype of a float32 model on a GPU

    def sync(self, model: torch.nn.Module) -> None:
        """Nothing to do: `generate` runs the training model itself."""

    def close(self) -> None:
        """Nothing to release."""

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
                        pad_token_id=self.pad_token_id, use_cache=True,
                        # a sharded model generates whole (strategy.gathered): no rank waits for another's
                        # tokens, and a rank may generate when the others do not (cached teacher responses)
                        synced_gpus=False, **kwargs,
                    )
                for row in output[:, width:].tolist():
                    response, done = cut_at_eos(row, self.eos_token_ids)
                    responses.append(response)
                    finished.append(done)
        finally:
            self.model.train(was_training)
        return Rollouts(prompt_ids=list(prompt_ids), prompt_index=[i for i, _ in expanded],
                        response_ids=responses, finished=finished)

