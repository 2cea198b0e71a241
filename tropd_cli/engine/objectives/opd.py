"""`opd`: on-policy distillation with the K1 reward on every token, the baseline TrOPD fixes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tropd_cli.engine.objectives.base import (
    ObjectiveOutput,
    ObjectiveSpec,
    StepContext,
    TokenStats,
    float_mask,
    k1_reward,
    mean_pair,
    policy_gradient,
    telemetry,
)

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig


def opd(stats: TokenStats, clip_epsilon: float | None = None) -> ObjectiveOutput:
    """On-policy distillation with the K1 reward: loss_t = -r_t rho_t on every token (PPO-clipped)."""
    mask = float_mask(stats)
    loss, clipped = policy_gradient(k1_reward(stats), stats, mask, clip_epsilon)
    reward = torch.where(mask.bool(), k1_reward(stats), torch.zeros_like(mask))
    output = ObjectiveOutput(loss, float(mask.sum()), {
        "trust_fraction": mean_pair(mask, mask),
        "outlier_fraction": mean_pair(torch.zeros_like(mask), mask),
        "reward_trusted": mean_pair(reward, mask),
        "clip_fraction": mean_pair(clipped, mask),
    })
    return telemetry(stats, output, mask)


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return opd(stats, clip_epsilon=context.clip_epsilon)


SPEC = ObjectiveSpec(
    name="opd", loss=_loss, summary="on-policy distillation, K1 reward on every token (the baseline)")
