"""`jsd_onpolicy`: the TrOPD paper's "JSD (beta 0.5)" row, on student samples.

loss_t = beta (-r_t rho_t) + (1 - beta) sum_{v in K_t} q(v) (log q(v) - log pi_S(v)): a K1 reverse-KL term
(OPD, PPO-clipped) and the differentiable top-k forward KL, mixed by `objective.jsd_beta` as in GKD's
convention (beta 1 is reverse KL, i.e. `opd`; beta 0 is forward KL, i.e. `fkl_topk` in its grad form).
Unlike `gkd`, every step is on-policy and the forward part only sees the teacher's top-k.
"""

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
    topk_forward_kl,
)

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig


def jsd_onpolicy(stats: TokenStats, beta: float = 0.5, clip_epsilon: float | None = None) -> ObjectiveOutput:
    """beta * K1 reverse KL (OPD) + (1 - beta) * top-k forward KL on every student token."""
    mask = float_mask(stats)
    reverse, clipped = policy_gradient(k1_reward(stats), stats, mask, clip_epsilon)
    forward = torch.where(mask.bool(), topk_forward_kl(stats), torch.zeros_like(mask))
    output = ObjectiveOutput(beta * reverse + (1 - beta) * forward, float(mask.sum()),
                             {"clip_fraction": mean_pair(clipped, mask)})
    return telemetry(stats, output, mask)


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return jsd_onpolicy(stats, beta=options.jsd_beta, clip_epsilon=context.clip_epsilon)


SPEC = ObjectiveSpec(
    name="jsd_onpolicy", loss=_loss, options=("jsd_beta", "top_k"),
    summary="the paper's on-policy JSD row: beta * K1 reverse KL + (1 - beta) * top-k forward KL")
