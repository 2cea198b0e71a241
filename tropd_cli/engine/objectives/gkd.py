"""`gkd` (arXiv 2306.13649, TRL's GKDTrainer): generalized JSD over the full vocabulary, on- and off-policy.

`generalized_jsd` works on full-vocabulary logits of one chunk of positions at a time; scoring applies it
chunk by chunk (`ObjectiveSpec.divergence`) and the loss only sees its per-token values.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tropd_cli.engine.objectives.base import (
    DivergenceFn,
    ObjectiveOutput,
    ObjectiveSpec,
    StepContext,
    TokenStats,
    float_mask,
    mean_pair,
    telemetry,
)

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position generalized JSD of GKD (arXiv 2306.13649, eq. 1), as TRL's `generalized_jsd_loss`:

    m = beta pi_T + (1 - beta) pi_S, JSD(beta) = beta KL(pi_T || m) + (1 - beta) KL(pi_S || m), summed
    over the vocabulary; beta = 0 is KL(pi_T || pi_S) (forward) and beta = 1 is KL(pi_S || pi_T)
    (reverse), as in TRL. Logits are [..., vocab]; returns [...].
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(teacher, student, reduction="none", log_target=True).sum(-1)
    mixture = torch.logsumexp(torch.stack([student + math.log1p(-beta), teacher + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(mixture, student, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def gkd(stats: TokenStats, divergence: torch.Tensor | None = None) -> ObjectiveOutput:
    """GKD: loss_t = JSD(beta)_t, the per-token divergence that scoring computed chunk by chunk."""
    divergence = stats.divergence if divergence is None else divergence
    if divergence is None:
        raise ValueError("gkd needs the per-token divergence from scoring")
    mask = float_mask(stats)
    loss = torch.where(mask.bool(), divergence, torch.zeros_like(divergence))
    output = ObjectiveOutput(loss, float(mask.sum()), {"gkd_divergence": mean_pair(loss, mask)})
    return telemetry(stats, output, mask)


def _divergence(options: ObjectiveConfig) -> DivergenceFn:
    return lambda student_logits, teacher_logits: generalized_jsd(student_logits, teacher_logits, options.gkd_beta)


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return gkd(stats)


SPEC = ObjectiveSpec(
    name="gkd", loss=_loss, divergence=_divergence, on_policy_fraction=lambda options: options.gkd_lambda,
    summary="generalized JSD(beta) over the full vocabulary; a gkd_lambda share of steps on student rollouts",
    options=("gkd_beta", "gkd_lambda"))
