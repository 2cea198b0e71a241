"""`sft`: cross-entropy on one fixed teacher response per prompt (an off-policy reference point)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tropd_cli.engine.objectives.base import (
    ObjectiveOutput,
    ObjectiveSpec,
    StepContext,
    TokenStats,
    float_mask,
    telemetry,
)

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig


def teacher_cross_entropy(stats: TokenStats) -> ObjectiveOutput:
    """`sft` and `seqkd`: loss_t = -s_t, the cross-entropy of the student on teacher-generated tokens.

    Off-policy reference points: the tokens come from the teacher, not the student, so r_t and rho_t play
    no part (the shared telemetry is still reported, on teacher tokens). The objectives differ only in
    their data, which the trainer chooses: `seqkd` (sequence-level KD, Kim & Rush 2016, as TRL's
    `GKDTrainer(seq_kd=True)`) samples fresh teacher responses every step, n per prompt at the rollout
    temperature; `sft` trains on one fixed teacher response per prompt, a distillation data set of
    teacher traces (as DeepSeek-R1-Distill's SFT), sampled once and cached (`guidance.TeacherResponses`).
    """
    mask = float_mask(stats)
    loss = torch.where(mask.bool(), -stats.student_logprobs, torch.zeros_like(stats.student_logprobs))
    return telemetry(stats, ObjectiveOutput(loss, float(mask.sum())), mask)


def _loss(stats: TokenStats, options: ObjectiveConfig, context: StepContext) -> ObjectiveOutput:
    return teacher_cross_entropy(stats)


SPEC = ObjectiveSpec(
    name="sft", loss=_loss, sequences="teacher_responses",
    summary="cross-entropy on one cached teacher response per prompt (off-policy)")
