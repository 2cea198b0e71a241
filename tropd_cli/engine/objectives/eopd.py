"""`eopd`: entropy-aware OPD (arXiv 2603.07079), a top-k forward KL where the teacher is uncertain."""

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


def eopd(stats: TokenStats, entropy_min: float = 0.8, clip_epsilon: float | None = None) -> ObjectiveOutput:
    """Entropy-aware OPD (arXiv 2603.07079): loss_t = -r_t rho_t (PPO-clipped)
    + [H(pi_T(. | c_t)) > entropy_min] * sum_{v in K_t} q(v) (log q(v) - log pi_S(v)),

    with K_t the teacher's top-k ids (k = 16 in the paper) and q renormalised over them.
    """
    if stats.teacher_entropy is None:
        raise ValueError("eopd needs the teacher's entropy")
    mask = float_mask(stats)
    loss, clipped = policy_gradient(k1_reward(stats), stats, mask, clip_epsilon)
    uncertain = (stats.teacher_entropy.detach() > entropy_min).to(mask.dtype) * mask
    fkl = topk_forward_kl(stats)
    loss = loss + torch.where(uncertain.bool(), fkl, torch.zeros_like(fkl))
    output = ObjectiveOutput(loss, float(mask.sum()), {
        "fkl_token_fraction": mean_pair(uncertain, mask),
        "clip_fraction": mean_pair(clipped, mask),
    })
    return telemetry(stats, output, mask)


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return eopd(stats, entropy_min=options.eopd_entropy_min, clip_epsilon=context.clip_epsilon)


SPEC = ObjectiveSpec(
    name="eopd", loss=_loss, top_k_option="eopd_top_k", teacher_entropy=True,
    summary="OPD plus a top-k forward KL on tokens where the teacher's entropy is high (arXiv 2603.07079)",
    options=("eopd_top_k", "eopd_entropy_min"))
