"""Trainers on the shipped toy pair, wired as `tropd distill` wires them, built in one place.

The engine's constructors and module paths move as it is refactored; tests build a Trainer only through
`make_trainer`, so that such a move is adapted here once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tropd_cli.config import RunConfig, load_config
from tropd_cli.data.sources import prompt_batches, teacher_response_source
from tropd_cli.engine.rollout import HFGenerateBackend
from tropd_cli.engine.run import load_models, trainer_for
from tropd_cli.engine.trainer import Models, Trainer
from tropd_cli.models import load_tokenizer, stop_token_ids

# A rollout batch of 2 prompts x 2 rollouts of up to 12 tokens; a learning rate large enough for a second
# update to see the first.
TINY = ["teacher.model=toylab:teacher", "student.model=toylab:student", "train.steps=2",
        "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=12", "eval.problems=0",
        "train.lr=1e-2", "train.warmup_steps=0", "train.device=cpu"]


def toy_config(*settings: str) -> RunConfig:
    """The toylab preset, tiny, with `settings` (`section.key=value`) on top."""
    return load_config("toylab", [*TINY, *settings])


def make_trainer(config: RunConfig,
                 prepare: Callable[[torch.nn.Module, torch.nn.Module], None] | None = None) -> Trainer:
    """A Trainer for `config` with fresh toy models; `prepare(teacher, student)` may alter them first."""
    torch.manual_seed(config.train.seed)
    tokenizer = load_tokenizer(config.student.model)
    device = torch.device("cpu")
    teacher, student = load_models(config, device, None)
    if prepare is not None:
        prepare(teacher, student)
    stop_ids = stop_token_ids(config.student.model, tokenizer)
    backend = HFGenerateBackend(student, tokenizer.pad_token_id, stop_ids, config.rollout.batch_size)
    teacher_backend = HFGenerateBackend(teacher, tokenizer.pad_token_id, stop_ids, config.rollout.batch_size)
    return trainer_for(config, Models(teacher, student, tokenizer.pad_token_id, device), backend,
                       prompt_batches(config, tokenizer), teacher_backend=teacher_backend,
                       teacher_responses=teacher_response_source(config, teacher_backend))


def student_of(trainer: Trainer) -> torch.nn.Module:
    """The student a Trainer updates."""
    return trainer.models.student
