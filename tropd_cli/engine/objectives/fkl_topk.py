"""`fkl_topk`: the top-k forward KL alone (an ablation of the paper)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tropd_cli.engine.objectives.base import (
    ObjectiveOutput,
    ObjectiveSpec,
    StepContext,
    TokenStats,
    float_mask,
    telemetry,
    topk_forward_kl,
)

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig


def fkl_topk(stats: TokenStats) -> ObjectiveOutput:
    """Top-k forward KL alone (ablation): loss_t = sum_{v in K_t} q(v) (log q(v) - log pi_S(v))."""
    mask = float_mask(stats)
    fkl = topk_forward_kl(stats)
    loss = torch.where(mask.bool(), fkl, torch.zeros_like(fkl))
    return telemetry(stats, ObjectiveOutput(loss, float(mask.sum())), mask)


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return fkl_topk(stats)


SPEC = ObjectiveSpec(
    name="fkl_topk", loss=_loss, summary="top-k forward KL alone on student samples (ablation)",
    options=("top_k",))
