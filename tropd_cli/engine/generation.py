"""Text generation for measurement: prompts in, sampled responses and their decoded texts out.

`tropd evaluate` and the toy lab's accuracy both generate through this one function (HF generate on a torch
module, from `make_rollout_backend`, or a sampler given whole: a vLLM engine, a served teacher), so that an
evaluation reproduces the toy lab's numbers exactly.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from tropd_cli.engine.rollout import RolloutBackend, Rollouts, SamplingParams, make_rollout_backend

Generator = torch.nn.Module | RolloutBackend  # a model to generate with, or a sampler that holds its own


def generate_texts(model: Generator, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                   n: int, params: SamplingParams, seed: int, batch_size: int = 256,
                   stop_ids: list[int] | None = None) -> tuple[Rollouts, list[str]]:
    """`n` responses per prompt through HF generate on `model` (or from `model` itself when it is a sampler),
    and their decoded texts (special tokens dropped). Responses end at any of `stop_ids` (default: the tokenizer's
    EOS); a sampler ends them at the stop ids it was made with."""
    if isinstance(model, torch.nn.Module):
        stop_ids = [tokenizer.eos_token_id] if stop_ids is None else stop_ids
        sampler = make_rollout_backend("hf", model, tokenizer.pad_token_id, stop_ids, batch_size)
    else:
        sampler = model
    rollouts = sampler.generate(prompt_ids, n, params, seed)
    return rollouts, tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
