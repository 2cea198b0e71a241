"""Distillation objectives as pure functions: gathered per-token tensors in, loss and metrics out.

Notation of DESIGN.md §1, for one sampled token x_t:
    s_t    = log pi_S(x_t | c_t), with gradient        (`student_logprobs`)
    sbar_t = s_t detached (recomputed by the training forward, not taken from the sampler)
    tau_t  = log pi_T(x_t | c_t), temperature 1         (`teacher_logprobs`)
    r_t    = tau_t - sbar_t                             (K1 reward)
    rho_t  = exp(s_t - sbar_t)                          (importance ratio: 1, gradient grad s_t)

Every tensor shares one shape (any leading dims, e.g. [batch, tokens] or a flat [tokens]) with `mask`,
which is 1 on tokens that carry loss; top-k tensors add a trailing k dimension. An objective returns the
per-token loss (zero where masked) and metrics as (numerator, denominator) pairs, so that micro-batches
aggregate exactly; the step loss is the token-mean: sum of per-token losses / number of loss tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LOG_PROB_FLOOR = math.log(1e-8)

Metrics = dict[str, tuple[float, float]]


@dataclass
class TokenStats:
    """Per-token quantities gathered by scoring; shapes: [...] or [..., k] for top-k."""

    student_logprobs: torch.Tensor  # s_t, with gradient
    teacher_logprobs: torch.Tensor  # tau_t
    mask: torch.Tensor  # 1 where the token carries loss
    teacher_topk_logprobs: torch.Tensor | None = None  # [..., k] log pi_T over the teacher's top-k ids
    student_topk_logprobs: torch.Tensor | None = None  # [..., k] log pi_S at the same ids


@dataclass
class ObjectiveOutput:
    per_token_loss: torch.Tensor
    metrics: Metrics = field(default_factory=dict)

    def mean_loss(self, mask: torch.Tensor) -> torch.Tensor:
        """Token-mean loss over the masked tokens (0 when there are none)."""
        return self.per_token_loss.sum() / mask.sum().clamp(min=1)


def k1_reward(stats: TokenStats) -> torch.Tensor:
    """r_t = tau_t - sbar_t (no gradient)."""
    return (stats.teacher_logprobs - stats.student_logprobs).detach()


def importance_ratio(stats: TokenStats) -> torch.Tensor:
    """rho_t = exp(s_t - sbar_t): equal to 1, with gradient grad s_t."""
    return torch.exp(stats.student_logprobs - stats.student_logprobs.detach())


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> tuple[float, float]:
    return float(numerator.sum()), float(denominator.sum())


def opd(stats: TokenStats) -> ObjectiveOutput:
    """On-policy distillation with the K1 reward: loss_t = -r_t * rho_t on every token."""
    mask = stats.mask.to(stats.student_logprobs.dtype)
    reward = k1_reward(stats)
    loss = -reward * importance_ratio(stats) * mask
    return ObjectiveOutput(loss, {
        "trust_fraction": _ratio(mask, mask),
        "reward_trusted": _ratio(reward * mask, mask),
        "kl_k1": _ratio(-reward * mask, mask),
    })


def trust_mask(stats: TokenStats, mode: str, generator: torch.Generator | None) -> torch.Tensor:
    """M_t: 1 for trusted tokens.

    bernoulli: M_t ~ Bernoulli(p_t), p_t = min(exp(tau_t - sbar_t), 1), drawn with `generator` (on the
    CPU, so a seed gives the same mask on every device). hard: M_t = [tau_t >= sbar_t].
    """
    reward = k1_reward(stats)
    if mode == "hard":
        return (reward >= 0).to(reward.dtype)
    if mode != "bernoulli":
        raise ValueError(f"unknown trust test {mode!r}")
    accept = torch.exp(reward.clamp(max=0.0))
    uniform = torch.rand(accept.shape, generator=generator, dtype=torch.float64).to(accept.device)
    return (uniform < accept.double()).to(reward.dtype)


def topk_forward_kl_advantage(stats: TokenStats) -> torch.Tensor:
    """A_t = sum_{v in K_t} q(v) (max(log pi_S(v), log 1e-8) - log q(v)), no gradient.

    q is the teacher's distribution renormalised over its top-k ids K_t; A_t = -KL(q || pi_S) on K_t
    (with the student's log-probs from its full softmax), so A_t <= 0 up to the clamp.
    """
    if stats.teacher_topk_logprobs is None or stats.student_topk_logprobs is None:
        raise ValueError("the fkl outlier advantage needs teacher and student top-k log-probs")
    teacher_topk = stats.teacher_topk_logprobs.detach()
    log_q = teacher_topk - torch.logsumexp(teacher_topk, dim=-1, keepdim=True)
    student_topk = stats.student_topk_logprobs.detach().clamp(min=LOG_PROB_FLOOR)
    return (log_q.exp() * (student_topk - log_q)).sum(dim=-1)


def tropd(stats: TokenStats, trust: str = "bernoulli", outlier: str = "fkl",
          generator: torch.Generator | None = None) -> ObjectiveOutput:
    """Trust Region OPD: loss_t = -r_t rho_t on trusted tokens, -A_t rho_t (fkl) on outliers."""
    if outlier != "fkl":
        raise ValueError(f"unknown outlier strategy {outlier!r}")
    mask = stats.mask.to(stats.student_logprobs.dtype)
    reward = k1_reward(stats)
    trusted = trust_mask(stats, trust, generator) * mask
    outliers = mask - trusted
    advantage = torch.where(outliers.bool(), topk_forward_kl_advantage(stats), reward)
    loss = -advantage * importance_ratio(stats) * mask
    return ObjectiveOutput(loss, {
        "trust_fraction": _ratio(trusted, mask),
        "reward_trusted": _ratio(reward * trusted, trusted),
        "reward_outlier": _ratio(reward * outliers, outliers),
        "fkl_advantage_outlier": _ratio(advantage * outliers, outliers),
        "kl_k1": _ratio(-reward * mask, mask),
    })
