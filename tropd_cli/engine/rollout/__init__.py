"""Rollout backends (`rollout.backend`), made by one factory; the seam itself is in `base.py`."""

from __future__ import annotations

import torch

from tropd_cli.engine.rollout.base import RolloutBackend, Rollouts, SamplingParams, cut_at_eos
from tropd_cli.engine.rollout.hf import HFGenerateBackend

__all__ = ["HFGenerateBackend", "RolloutBackend", "Rollouts", "SamplingParams", "cut_at_eos",
           "make_rollout_backend"]


def make_rollout_backend(kind: str, model: torch.nn.Module, pad_token_id: int, eos_token_ids: list[int],
                         batch_size: int = 256, autocast: torch.dtype | None = None) -> RolloutBackend:
    """The rollout backend `kind` (`rollout.backend`) sampling from `model`, stopping at `eos_token_ids`,
    at most `batch_size` sequences per call, forward passes in `autocast` (None: the model's dtype)."""
    if kind == "hf":
        return HFGenerateBackend(model, pad_token_id, eos_token_ids, batch_size, autocast=autocast)
    raise ValueError(f"unknown rollout backend {kind!r}")
