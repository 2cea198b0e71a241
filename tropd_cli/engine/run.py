"""The run wired in one room: from the configuration's values, once, everything a Trainer needs.

`wire` looks the objective up and builds, in this order, the strategy, the pair (the student from a checkpoint
when resuming; the teacher as a torch module only with teacher.backend=hf: a served teacher's weights never load
here, an in-process vLLM teacher is held once, by its engine), the student's rollout backend, the teacher's
scorer and sampler (the server or the vLLM engine that scores also samples), the teacher-response source and the
prompt stream. The order fixes what the random streams see, so it is part of the pinned numbers. The Trainer
receives them ready and builds none itself; `distill.py` owns the folder, the loop's telemetry, checkpoints and
evaluation around it. Each factory here reads the few settings it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tropd_cli.checkpoints import restore_adapter
from tropd_cli.config import LoraConfig, RunConfig
from tropd_cli.data.sources import prompt_batches, teacher_response_source
from tropd_cli.engine import distributed
from tropd_cli.engine.guidance import InRunTeacherResponses
from tropd_cli.engine.objectives import get_objective
from tropd_cli.engine.objectives.base import ObjectiveSpec
from tropd_cli.engine.precision import autocast_dtype
from tropd_cli.engine.rollout import RolloutBackend, make_rollout_backend
from tropd_cli.engine.scoring import chunk_positions, vocab_rows
from tropd_cli.engine.strategy import (
    GatheredBackend,
    GatheredResponses,
    ShardedTeacherScorer,
    SingleDevice,
    make_strategy,
)
from tropd_cli.engine.teacher import TeacherScorer, make_teacher_scorer
from tropd_cli.engine.teacher.sampling import teacher_engine_options, teacher_sampler
from tropd_cli.engine.trainer import Models, Trainer
from tropd_cli.models import LoraSpec, load_causal_lm, resolve_model_path
from tropd_cli.runfolder import CheckpointFolder

if TYPE_CHECKING:
    from tropd_cli.engine.vllm_engine import EngineOptions
    from tropd_cli.preflight import Preflight


@dataclass
class WiredRun:
    """A run's parts, built once: the Trainer and what the loop around it uses besides."""

    trainer: Trainer
    strategy: SingleDevice
    backend: RolloutBackend  # the student's sampler, closed when the run ends
    teacher_gathered: Callable[[], contextlib.AbstractContextManager]  # the teacher whole (to generate)
    teacher_sampler: RolloutBackend  # the teacher's samples: its module here, its vLLM engine or its server


def wire(config: RunConfig, preflight: Preflight, device: torch.device, checkpoint: Path | None = None,
         start_step: int = 0) -> WiredRun:
    """The run of `config` on `device`, its student from `checkpoint` when given; prompts from `start_step`."""
    tokenizer, stop_ids = preflight.student_tokenizer, preflight.stop_ids
    spec = get_objective(config.objective.name)
    strategy = make_strategy(config.train.strategy, config.student.lora.enabled, config.rollout.prompts_per_step,
                             device)
    teacher, student = load_models(config, device, checkpoint)
    mixed = autocast_dtype(config.train.autocast, device)
    backend = make_rollout_backend(config.rollout.backend, student, tokenizer.pad_token_id, stop_ids,
                                   config.rollout.batch_size, autocast=mixed,
                                   model_path=resolve_model_path(config.student.model),
                                   options=student_engine_options(config), adapter=config.student.lora.enabled)
    scorer, teacher_gathered = teacher_scorer(config, spec, teacher, device, preflight.served_model)
    teacher_backend = teacher_sampler(config, config.teacher.backend, stop_ids, tokenizer.pad_token_id, device,
                                      teacher=teacher, scorer=scorer, top_k=spec.top_k(config.objective))
    teacher_responses = teacher_response_source(config, teacher_backend, preflight.prepared)
    if isinstance(teacher_responses, InRunTeacherResponses):  # samples the prompts it has not cached
        teacher_responses = GatheredResponses(teacher_responses, teacher_gathered)
    trainer = Trainer(config, Models(teacher, student, tokenizer.pad_token_id, device),
                      # a vLLM engine holds its own whole copy: the sharded student is not gathered to sample
                      GatheredBackend(backend, strategy.gathered if config.rollout.backend == "hf"
                                      else contextlib.nullcontext),
                      prompt_batches(config, tokenizer, start_step, preflight.prepared, strategy.rank,
                                     strategy.world_size),
                      objective=spec, teacher_scorer=scorer, strategy=strategy,
                      teacher_backend=GatheredBackend(teacher_backend, teacher_gathered),
                      teacher_responses=teacher_responses)
    return WiredRun(trainer, strategy, backend, teacher_gathered, trainer.teacher_backend)


def student_lora(lora: LoraConfig) -> LoraSpec | None:
    """The student's LoRA adapter settings (`student.lora`), or None when every weight trains."""
    if not lora.enabled:
        return None
    return LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)


def teacher_loaded_here(config: RunConfig) -> bool:
    """Whether the teacher's weights are on this machine: not when a server scores and samples for it."""
    return config.teacher.backend != "server"


def teacher_module_here(config: RunConfig) -> bool:
    """Whether the teacher loads as a torch module: only with teacher.backend=hf (a vLLM engine holds the one copy
    of an in-process vLLM teacher; a server holds a served one)."""
    return config.teacher.backend == "hf"


def load_models(config: RunConfig, device: torch.device, checkpoint: Path | None
                ) -> tuple[torch.nn.Module | None, torch.nn.Module]:
    """The frozen teacher (None unless teacher.backend=hf) and the trainable student, the student's weights from
    `checkpoint` if given."""
    teacher = None
    if teacher_module_here(config):
        teacher = load_causal_lm(config.teacher.model, config.teacher.dtype, device,
                                 quantization=config.teacher.quantization, trainable=False,
                                 trust_remote_code=config.teacher.trust_remote_code)
    lora = student_lora(config.student.lora)
    saved_full_model = checkpoint is not None and lora is None
    student = load_causal_lm(str(CheckpointFolder(checkpoint).student) if saved_full_model else config.student.model,
                             config.student.dtype, device, quantization=config.student.quantization, lora=lora,
                             trainable=True, trust_remote_code=config.student.trust_remote_code)
    if checkpoint is not None and lora is not None:
        restore_adapter(student, CheckpointFolder(checkpoint).student)
    return teacher, student


def teacher_scorer(config: RunConfig, spec: ObjectiveSpec, teacher: torch.nn.Module | None, device: torch.device,
                   served_model: str | None = None
                   ) -> tuple[TeacherScorer, Callable[[], contextlib.AbstractContextManager]]:
    """The teacher's scorer and the context in which the teacher runs whole (to generate). With teacher.shard
    under torchrun, its weights are split over the ranks; else the scorer of `teacher.backend` (hf: its forward
    pass here; vllm: an engine; server: the server preflight checked, serving `served_model`; `teacher` None for
    both)."""
    chunk = chunk_positions(config.train.logit_chunk_size, vocab_rows(teacher)) if teacher is not None else 0
    mixed = autocast_dtype(config.train.autocast, device)
    if config.teacher.shard and distributed.launched():
        scorer = ShardedTeacherScorer(teacher, chunk, mixed, device)
        return scorer, scorer.gathered
    engine = teacher_engine_options(config, spec.top_k(config.objective)) if config.teacher.backend == "vllm" else None
    return make_teacher_scorer(config.teacher.backend, teacher, chunk, mixed, device, teacher=config.teacher,
                               engine=engine, served_model=served_model), contextlib.nullcontext


def student_engine_options(config: RunConfig) -> EngineOptions:
    """The vLLM engine settings of the student's rollouts (`rollout.vllm_*`, the run's seed, the LoRA rank).

    The engine computes in the dtype the trainer's forward passes use: the autocast dtype when there is one
    (float32 master weights in bfloat16 on a GPU sample in bfloat16), else the student's.
    """
    from tropd_cli.engine.vllm_engine import engine_options
    from tropd_cli.models import pick_device

    student = config.student
    mixed = autocast_dtype(config.train.autocast, pick_device(config.train.device))
    return engine_options(config.rollout, str(mixed).removeprefix("torch.") if mixed is not None else student.dtype,
                          config.train.seed, sleep=config.rollout.vllm_sleep,
                          lora_rank=student.lora.r if student.lora.enabled else None,
                          trust_remote_code=student.trust_remote_code)


def trainer_for(config: RunConfig, models: Models, backend: RolloutBackend, prompts: Iterator[list[list[int]]],
                **given: object) -> Trainer:
    """A Trainer on models already loaded, on one process, with the parts not `given` (objective, teacher_scorer,
    strategy) built as `wire` builds them: what benchmarks and tests that bring their own models use."""
    spec = given.pop("objective", None) or get_objective(config.objective.name)
    scorer = given.pop("teacher_scorer", None) or teacher_scorer(config, spec, models.teacher, models.device)[0]
    strategy = given.pop("strategy", None) or SingleDevice()
    return Trainer(config, models, backend, prompts, objective=spec, teacher_scorer=scorer, strategy=strategy,
                   **given)
