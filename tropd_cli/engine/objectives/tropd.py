"""`tropd`: Trust Region On-Policy Distillation (DESIGN.md §1), with optional off-policy guidance."""

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
    reward_floor,
    telemetry,
    topk_forward_kl,
    topk_forward_kl_advantage,
    trust_probability,
)

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig

TRUST_TESTS = ("bernoulli", "hard")
OUTLIER_STRATEGIES = ("fkl", "fkl_grad", "mask", "clip")


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
    accept = trust_probability(stats)
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
    `outlier_weight` is the realised outlier mask, 1 - M_t on response tokens.
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
    }, outlier_weight=outliers)
    if outlier == "fkl":
        output.metrics["fkl_advantage_outlier"] = mean_pair(
            torch.where(is_outlier, advantage, torch.zeros_like(advantage)), outliers)
    return telemetry(stats, output, loss_tokens)


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return tropd(stats, trust=options.trust, outlier=options.outlier, clip_lambda=options.clip_lambda,
                 generator=context.generator, clip_epsilon=context.clip_epsilon)


SPEC = ObjectiveSpec(
    name="tropd", loss=_loss, guidance=True,
    summary="trust test on every token; K1 OPD inside the trust region, outliers by `outlier`",
    options=("trust", "outlier", "top_k", "clip_lambda", "guidance", "guidance_beta"))
