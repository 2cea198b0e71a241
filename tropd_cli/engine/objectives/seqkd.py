"""`seqkd`: sequence-level KD, cross-entropy on fresh teacher samples every step (Kim & Rush 2016)."""

from tropd_cli.engine.objectives.base import ObjectiveSpec
from tropd_cli.engine.objectives.sft import _loss

SPEC = ObjectiveSpec(
    name="seqkd", loss=_loss, sequences="teacher_samples",
    summary="cross-entropy on n fresh teacher samples per prompt every step (off-policy)")
