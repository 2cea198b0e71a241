"""Text generation for measurement: prompts in, sampled responses and their decoded texts out.

`tropd evaluate` and the toy lab's accuracy both generate through this one function (HF generate,
from `make_rollout_backend`), so that an evaluation reproduces the toy lab's numbers exactly.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from tropd_cli.engine.rollout import Rollouts, SamplingParams, make_rollout_backend


def generate_texts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                   n: int, params: SamplingParams, seed: int, batch_size: int = 256,
                   stop_ids: list[int] | None = None) -> tuple[Rollouts, list[str]]:
    """`n` responses per prompt through HF generate on `model`, and their decoded texts (special tokens
    dropped). Responses end at any of `stop_ids` (default: the tokenizer's EOS)."""
    stop_ids = [tokenizer.eos_token_id] if stop_ids is None else stop_ids
    sampler = make_rollout_backend("hf", model, tokenizer.pad_token_id, stop_ids, batch_size)
    rollouts = sampler.generate(prompt_ids, n, params, seed)
    return rollouts, tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
