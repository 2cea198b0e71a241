"""`entropy_opd`: OPD on the tokens where the student's entropy is highest."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tropd_cli.engine.objectives.base import (
    ObjectiveOutput,
    ObjectiveSpec,
    StepContext,
    TokenStats,
    high_entropy,
    k1_reward,
    mean_pair,
    policy_gradient,
    telemetry,
)

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig


def entropy_opd(stats: TokenStats, top_fraction: float = 0.2, threshold: float | None = None,
                clip_epsilon: float | None = None) -> ObjectiveOutput:
    """OPD on the high-entropy tokens: M_t = [H(pi_S(. | c_t)) in the top `top_fraction`],
    loss = -sum_t M_t r_t rho_t / sum_t M_t (normalised by the selected tokens).
    """
    selected = high_entropy(stats, top_fraction, threshold)
    loss, clipped = policy_gradient(k1_reward(stats), stats, selected, clip_epsilon)
    output = ObjectiveOutput(loss, float(selected.sum()), {"clip_fraction": mean_pair(clipped, selected)})
    return telemetry(stats, output, selected)


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return entropy_opd(stats, top_fraction=options.entropy_top_fraction, threshold=context.entropy_threshold,
                       clip_epsilon=context.clip_epsilon)


SPEC = ObjectiveSpec(
    name="entropy_opd", loss=_loss, entropy_fraction=lambda options, step: options.entropy_top_fraction,
    summary="OPD on the top fraction of tokens by student entropy", options=("entropy_top_fraction",))
