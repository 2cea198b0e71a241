"""What samples the teacher, chosen by its backend in one place: the run's teacher samples, guidance responses and
held-out accuracy (through `engine/run.py`'s wiring) and `tropd prepare --teacher-drafts` all take their sampler
from `teacher_sampler`, so that a served teacher is asked, and a vLLM teacher held once, wherever it generates."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tropd_cli.config import RunConfig
from tropd_cli.engine.precision import autocast_dtype
from tropd_cli.engine.rollout import RolloutBackend, make_rollout_backend
from tropd_cli.engine.teacher import TeacherScorer, make_teacher_scorer
from tropd_cli.engine.teacher.server import ServerSampler, served_model, teacher_names
from tropd_cli.models import resolve_model_path

if TYPE_CHECKING:
    from tropd_cli.engine.vllm_engine import EngineOptions


def teacher_sampler(config: RunConfig, kind: str, stop_ids: list[int], pad_token_id: int, device: torch.device, *,
                    teacher: torch.nn.Module | None = None, scorer: TeacherScorer | None = None, top_k: int = 20,
                    in_run: bool = True) -> RolloutBackend:
    """What samples the teacher (its samples, drafts and guidance responses, its held-out accuracy), by `kind`
    (teacher.backend, or prepare's --backend): hf generates with its module `teacher` here (under the run's
    autocast when `in_run`; prepare's drafts in teacher.dtype); vllm with the engine of its `scorer` when one holds
    it (the one copy), else a new engine; server asks the server its `scorer` talks to, else the one at teacher.url
    (checked to serve teacher.model)."""
    if kind == "server":
        if scorer is None:
            scorer = make_teacher_scorer("server", None, 0, None, device, teacher=config.teacher)
            scorer.model = served_model(scorer.client, teacher_names(config.teacher.model, config.teacher.served_model))
        return ServerSampler(scorer.client, scorer.model, stop_ids, config.teacher.max_concurrency)
    if kind == "vllm":
        return make_rollout_backend("vllm", None, pad_token_id, stop_ids,
                                    model_path=resolve_model_path(config.teacher.model),
                                    options=teacher_engine_options(config, top_k), llm=getattr(scorer, "llm", None),
                                    setting="teacher.backend=vllm" if in_run else "--backend vllm")
    return make_rollout_backend("hf", teacher, pad_token_id, stop_ids, config.rollout.batch_size,
                                autocast=autocast_dtype(config.train.autocast, device) if in_run else None)


def teacher_engine_options(config: RunConfig, top_k: int) -> EngineOptions:
    """The vLLM engine settings of a `teacher.backend: vllm` scorer: the teacher's dtype, no sleep (it scores
    every step), and `max_logprobs` the objective's top-k."""
    from tropd_cli.engine.vllm_engine import engine_options

    return engine_options(config.rollout, config.teacher.dtype, config.train.seed, sleep=False, max_logprobs=top_k,
                          trust_remote_code=config.teacher.trust_remote_code)
