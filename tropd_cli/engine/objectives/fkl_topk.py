"""`fkl_topk`: the top-k forward KL alone (an ablation of the paper), in two forms (`objective.fkl_form`).

`grad`: the differentiable top-k forward KL on every student token, on-policy cross-entropy to the
teacher's renormalised top-k. `advantage`: -A_t rho_t on every token with A_t the detached top-k
forward-KL advantage of TrOPD's `fkl` outliers, used as the only signal; the form the paper's "top-k FKL
alone" row (avg 1.40, a collapse) fits.
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
    mean_pair,
    policy_gradient,
    telemetry,
    topk_forward_kl,
    topk_forward_kl_advantage,
)

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig


def fkl_topk(stats: TokenStats, form: str = "grad", clip_epsilon: float | None = None) -> ObjectiveOutput:
    """Top-k forward KL alone (ablation). grad: loss_t = sum_{v in K_t} q(v) (log q(v) - log pi_S(v));
    advantage: loss_t = -A_t rho_t (PPO-clipped with `clip_epsilon`), A_t detached."""
    mask = float_mask(stats)
    if form == "advantage":
        loss, clipped = policy_gradient(topk_forward_kl_advantage(stats), stats, mask, clip_epsilon)
        output = ObjectiveOutput(loss, float(mask.sum()), {"clip_fraction": mean_pair(clipped, mask)})
        return telemetry(stats, output, mask)
    if form != "grad":
        raise ValueError(f"unknown top-k forward KL form {form!r}")
    fkl = topk_forward_kl(stats)
    loss = torch.where(mask.bool(), fkl, torch.zeros_like(fkl))
    return telemetry(stats, ObjectiveOutput(loss, float(mask.sum())), mask)


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return fkl_topk(stats, form=options.fkl_form, clip_epsilon=context.clip_epsilon)


SPEC = ObjectiveSpec(
    name="fkl_topk", loss=_loss, summary="top-k forward KL alone on student samples (ablation)",
    options=("top_k", "fkl_form"))
