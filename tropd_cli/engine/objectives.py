"""Distillation objectives as pure functions: gathered per-token tensors in, loss and metrics out.

Notation of DESIGN.md §1, for one sampled token x_t:
    s_t    = log pi_S(x_t | c_t), with gradient        (`student_logprobs`)
    sbar_t = log-prob under the policy that sampled, no gradient (`old_logprobs`; s_t detached when None,
             i.e. on the first update of a rollout batch)
    tau_t  = log pi_T(x_t | c_t), temperature 1         (`teacher_logprobs`)
    r_t    = tau_t - sbar_t                             (K1 reward)
    rho_t  = exp(s_t - sbar_t)                          (importance ratio: 1 on the first update)

Every tensor shares one shape (any leading dims, e.g. [batch, tokens] or a flat [tokens]) with `mask`,
which is 1 on response tokens and 0 on padding; top-k tensors add a trailing k dimension. An objective
returns the per-token loss (zero where masked), the number of tokens its loss is averaged over
(`normaliser`: the response tokens unless the objective says otherwise) and metrics: means as
(numerator, denominator) pairs and minimums, so that micro-batches aggregate exactly. The step loss is
sum of per-token losses / sum of normalisers over the whole rollout batch.

This module holds the shared pieces, OPD and TrOPD; `baselines.py` holds the other objectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LOG_PROB_FLOOR = math.log(1e-8)

Metrics = dict[str, tuple[float, float]]

TRUST_TESTS = ("bernoulli", "hard")
OUTLIER_STRATEGIES = ("fkl", "fkl_grad", "mask", "clip")


@dataclass
class TokenStats:
    """Per-token quantities gathered by scoring; shapes: [...] or [..., k] for top-k."""

    student_logprobs: torch.Tensor  # s_t, with gradient
    teacher_logprobs: torch.Tensor  # tau_t
    mask: torch.Tensor  # 1 on response tokens, 0 on padding
    teacher_topk_logprobs: torch.Tensor | None = None  # [..., k] log pi_T over the teacher's top-k ids
    student_topk_logprobs: torch.Tensor | None = None  # [..., k] log pi_S at the same ids, with gradient
    old_logprobs: torch.Tensor | None = None  # sbar_t from the sampling policy; None: s_t detached
    teacher_entropy: torch.Tensor | None = None  # H(pi_T(. | c_t)), full vocabulary
    student_entropy: torch.Tensor | None = None  # H(pi_S(. | c_t)), full vocabulary, no gradient


@dataclass
class ObjectiveOutput:
    per_token_loss: torch.Tensor
    normaliser: float
    metrics: Metrics = field(default_factory=dict)
    minimums: dict[str, float] = field(default_factory=dict)

    def mean_loss(self) -> torch.Tensor:
        """The loss averaged over `normaliser` tokens (0 when there are none)."""
        return self.per_token_loss.sum() / max(self.normaliser, 1.0)


def float_mask(stats: TokenStats) -> torch.Tensor:
    """The response-token mask in the dtype of the log-probs."""
    return stats.mask.to(stats.student_logprobs.dtype)


def sampled_logprobs(stats: TokenStats) -> torch.Tensor:
    """sbar_t: the sampling policy's log-prob of x_t, no gradient."""
    old = stats.old_logprobs if stats.old_logprobs is not None else stats.student_logprobs
    return old.detach()


def k1_reward(stats: TokenStats) -> torch.Tensor:
    """r_t = tau_t - sbar_t (no gradient)."""
    return stats.teacher_logprobs.detach() - sampled_logprobs(stats)


def importance_ratio(stats: TokenStats) -> torch.Tensor:
    """rho_t = exp(s_t - sbar_t): 1 on the first update, with gradient grad s_t."""
    return torch.exp(stats.student_logprobs - sampled_logprobs(stats))


def reward_floor(lam: float) -> float:
    """c = log(lambda / (1 - lambda)), the reward floor of `clip` outliers and of REOPOLD."""
    return math.log(lam / (1.0 - lam))


def policy_gradient(advantage: torch.Tensor, stats: TokenStats, weight: torch.Tensor,
                    clip_epsilon: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_t = -A_t rho_t on tokens with weight 1, PPO-clipped; returns (loss, clipped tokens).

    With epsilon: loss_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t); a clipped token
    (A_t > 0 and rho_t > 1 + eps, or A_t < 0 and rho_t < 1 - eps) carries its value and no gradient.
    `advantage` is zeroed where `weight` is 0 first, so that a non-finite value there cannot leak NaN
    into the gradient.
    """
    keep = weight.bool()
    advantage = torch.where(keep, advantage.detach(), torch.zeros_like(advantage))
    rho = importance_ratio(stats)
    clipped = torch.zeros_like(keep)
    if clip_epsilon is not None:
        ratio = rho.detach()
        clipped = keep & (((advantage > 0) & (ratio > 1 + clip_epsilon))
                          | ((advantage < 0) & (ratio < 1 - clip_epsilon)))
        rho = torch.where(clipped, ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon), rho)
    return torch.where(keep, -advantage * rho, torch.zeros_like(rho)), clipped.to(weight.dtype)


def _topk_logq(stats: TokenStats) -> tuple[torch.Tensor, torch.Tensor]:
    if stats.teacher_topk_logprobs is None or stats.student_topk_logprobs is None:
        raise ValueError("this objective needs teacher and student top-k log-probs")
    teacher_topk = stats.teacher_topk_logprobs.detach()
    return teacher_topk - torch.logsumexp(teacher_topk, dim=-1, keepdim=True), stats.student_topk_logprobs


def topk_forward_kl_advantage(stats: TokenStats) -> torch.Tensor:
    """A_t = sum_{v in K_t} q(v) (max(log pi_S(v), log 1e-8) - log q(v)), no gradient.

    q is the teacher's distribution renormalised over its top-k ids K_t; A_t = -KL(q || pi_S) on K_t
    (with the student's log-probs from its full softmax), so A_t <= 0 up to the clamp.
    """
    log_q, student_topk = _topk_logq(stats)
    student_topk = student_topk.detach().clamp(min=LOG_PROB_FLOOR)
    return (log_q.exp() * (student_topk - log_q)).sum(dim=-1)


def topk_forward_kl(stats: TokenStats) -> torch.Tensor:
    """sum_{v in K_t} q(v) (log q(v) - log pi_S(v)): top-k forward KL, differentiable through log pi_S."""
    log_q, student_topk = _topk_logq(stats)
    return (log_q.exp() * (log_q - student_topk)).sum(dim=-1)


def mean_pair(numerator: torch.Tensor, denominator: torch.Tensor) -> tuple[float, float]:
    """A mean as (sum of numerator, sum of denominator), so that micro-batches add up exactly."""
    return float(numerator.detach().sum()), float(denominator.detach().sum())


def telemetry(stats: TokenStats, output: ObjectiveOutput, loss_tokens: torch.Tensor) -> ObjectiveOutput:
    """Add the metrics every objective reports to `output` (names are stable; see the README).

    reward_mean / reward_min: r_t over response tokens; kl_k1: mean of sbar_t - tau_t (the K1 estimate of
    KL(pi_S || pi_T)); fkl_topk: mean KL(q || pi_S) on K_t (clamped as in A_t) when top-k is gathered;
    teacher_entropy / student_entropy: mean full-vocabulary entropies; loss_token_fraction: tokens that
    carry loss over response tokens.
    """
    mask = float_mask(stats)
    reward = torch.where(mask.bool(), k1_reward(stats), torch.zeros_like(mask))
    metrics = output.metrics
    metrics["reward_mean"] = mean_pair(reward, mask)
    metrics["kl_k1"] = mean_pair(-reward, mask)
    metrics["loss_token_fraction"] = mean_pair(loss_tokens * mask, mask)
    if stats.teacher_topk_logprobs is not None and stats.student_topk_logprobs is not None:
        fkl = torch.where(mask.bool(), -topk_forward_kl_advantage(stats), torch.zeros_like(mask))
        metrics["fkl_topk"] = mean_pair(fkl, mask)
    for name, entropy in (("teacher_entropy", stats.teacher_entropy),
                          ("student_entropy", stats.student_entropy)):
        if entropy is not None:
            metrics[name] = mean_pair(torch.where(mask.bool(), entropy.detach(), torch.zeros_like(mask)), mask)
    if mask.sum() > 0:
        output.minimums["reward_min"] = float(k1_reward(stats)[mask.bool()].min())
    return output


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


def tropd(stats: TokenStats, trust: str = "bernoulli", outlier: str = "fkl", clip_lambda: float = 0.2,
          generator: torch.Generator | None = None, clip_epsilon: float | None = None) -> ObjectiveOutput:
    """Trust Region OPD (DESIGN.md §1): loss_t = -r_t rho_t on trusted tokens (M_t = 1); on outliers:

    fkl:      -A_t rho_t (A_t the detached top-k forward-KL advantage);
    fkl_grad: sum_{v in K_t} q(v) (log q(v) - log pi_S(v)), differentiable;
    mask:     0 (the token still counts in the mean);
    clip:     -max(r_t, c) rho_t, c = log(lambda / (1 - lambda)).
    The policy-gradient terms are PPO-clipped with `clip_epsilon` (inactive on the first update).
    """
    if outlier not in OUTLIER_STRATEGIES:
        raise ValueError(f"unknown outlier strategy {outlier!r}")
    mask = float_mask(stats)
    reward = k1_reward(stats)
    trusted = trust_mask(stats, trust, generator) * mask
    outliers = mask - trusted
    is_outlier = outliers.bool()
    if outlier == "fkl":
        advantage = torch.where(is_outlier, topk_forward_kl_advantage(stats), reward)
    elif outlier == "clip":
        advantage = torch.where(is_outlier, reward.clamp(min=reward_floor(clip_lambda)), reward)
    else:
        advantage = reward
    pg_weight = mask if outlier in ("fkl", "clip") else trusted
    loss, clipped = policy_gradient(advantage, stats, pg_weight, clip_epsilon)
    if outlier == "fkl_grad":
        fkl = topk_forward_kl(stats)
        loss = loss + torch.where(is_outlier, fkl, torch.zeros_like(fkl))
    loss_tokens = trusted if outlier == "mask" else mask
    safe = torch.where(mask.bool(), reward, torch.zeros_like(reward))
    output = ObjectiveOutput(loss, float(mask.sum()), {
        "trust_fraction": mean_pair(trusted, mask),
        "outlier_fraction": mean_pair(outliers, mask),
        "reward_trusted": mean_pair(safe * trusted, trusted),
        "reward_outlier": mean_pair(safe * outliers, outliers),
        "clip_fraction": mean_pair(clipped, mask),
    })
    if outlier == "fkl":
        output.metrics["fkl_advantage_outlier"] = mean_pair(
            torch.where(is_outlier, advantage, torch.zeros_like(advantage)), outliers)
    return telemetry(stats, output, loss_tokens)
