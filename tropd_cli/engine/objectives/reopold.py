"""`reopold` (arXiv 2603.11137): a floored reward, tokens kept by that floor, later by student entropy.

Two forms (`objective.reopold_form`): `two_stage`, REOPOLD as its paper describes it (the TrOPD paper's main
table row, avg 36.89 over five benchmarks), and `static_floor`, the reward floor alone on every token, which
is the TrOPD paper's Table 1 "clip outliers" row (47.86, equal to its main table's "REOPOLD" numbers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tropd_cli.engine.objectives.base import (
    ObjectiveOutput,
    ObjectiveSpec,
    StepContext,
    TokenStats,
    float_mask,
    high_entropy,
    k1_reward,
    mean_pair,
    policy_gradient,
    reward_floor,
    telemetry,
)

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig


def reopold(stats: TokenStats, lam: float = 0.2, beta: float = 0.5, after_switch: bool = False,
            threshold: float | None = None, clip_epsilon: float | None = None,
            static_floor: bool = False) -> ObjectiveOutput:
    """REOPOLD (arXiv 2603.11137): rhat_t = max(r_t, c), c = log(lambda / (1 - lambda));
    M_t = [r_t >= c] before step T_switch, the top `beta` fraction by student entropy after it;
    loss = -sum_t M_t rhat_t rho_t / sum_t M_t (normalised by the kept tokens, not all tokens).
    `static_floor`: M_t = 1 on every response token (the floor alone; the "clip outliers" row).
    """
    mask = float_mask(stats)
    floor = reward_floor(lam)
    reward = k1_reward(stats)
    if static_floor:
        kept = mask
    elif after_switch:
        kept = high_entropy(stats, beta, threshold)
    else:
        kept = (reward >= floor).to(mask.dtype) * mask
    loss, clipped = policy_gradient(reward.clamp(min=floor), stats, kept, clip_epsilon)
    output = ObjectiveOutput(loss, float(kept.sum()), {"clip_fraction": mean_pair(clipped, kept)})
    return telemetry(stats, output, kept)


def _kept_by_entropy(options: ObjectiveConfig, step: int) -> float | None:
    """From T_switch on, the top reopold_beta fraction of the rollout batch's tokens by student entropy."""
    two_stage = options.reopold_form == "two_stage"
    return options.reopold_beta if two_stage and step >= options.reopold_switch_step else None


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return reopold(stats, lam=options.clip_lambda, beta=options.reopold_beta,
                   after_switch=context.step >= options.reopold_switch_step, threshold=context.entropy_threshold,
                   clip_epsilon=context.clip_epsilon, static_floor=options.reopold_form == "static_floor")


SPEC = ObjectiveSpec(
    name="reopold", loss=_loss, entropy_fraction=_kept_by_entropy,
    summary="reward floor and token mask, by reward then by student entropy (arXiv 2603.11137)",
    options=("reopold_form", "clip_lambda", "reopold_beta", "reopold_switch_step"))
