"""The teacher-scoring seam: what the frozen teacher returns for each response token, and who computes it.

A `TeacherScorer` scores prompt+response sequences and declares in `provides` which of these it can
return: `logprobs` (tau_t of the sampled token), `topk` (the teacher's top-k ids and log-probs), `entropy`
(its full-vocabulary entropy) and `full_logits` (its final hidden states and head, from which a
full-vocabulary divergence recomputes the logits chunk by chunk). An objective declares what it needs
(`ObjectiveSpec.teacher_needs`); preflight compares it with `BACKEND_CAPABILITIES[teacher.backend]` before
any model loads, and the trainer with the scorer's `provides` before the first step.

`teacher.backend`: `hf` is the teacher's own forward pass (`hf.py`, every capability); `vllm` an in-process
vLLM engine (`vllm.py`) and `server` a vLLM server (`server.py`) return log-probs and top-k only, through
`prompt_logprobs` (`base.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tropd_cli.engine.teacher.base import (
    BACKEND_CAPABILITIES,
    CAPABILITIES,
    SERVED,
    TeacherScorer,
    stats_from_prompt_logprobs,
)
from tropd_cli.engine.teacher.hf import HFTeacherScorer

if TYPE_CHECKING:
    from tropd_cli.config import TeacherConfig
    from tropd_cli.engine.vllm_engine import EngineOptions

__all__ = ["BACKEND_CAPABILITIES", "CAPABILITIES", "SERVED", "HFTeacherScorer", "TeacherScorer",
           "backend_missing", "make_teacher_scorer", "stats_from_prompt_logprobs"]


def make_teacher_scorer(kind: str, model: torch.nn.Module | None, chunk_size: int,
                        autocast_dtype: torch.dtype | None = None, device: torch.device | None = None, *,
                        teacher: TeacherConfig | None = None, engine: EngineOptions | None = None,
                        served_model: str | None = None) -> TeacherScorer:
    """The teacher scorer `kind` (`teacher.backend`): hf scores with the loaded `model` in chunks of
    `chunk_size` positions; vllm starts an engine with `engine` options on `teacher.model`; server talks to
    `teacher.url`, serving `served_model` (the id preflight found; None: asked of the server).
    """
    if kind == "hf":
        return HFTeacherScorer(model, chunk_size, autocast_dtype, device)
    if kind in ("vllm", "server") and teacher is None:
        raise ValueError(f"the {kind} teacher scorer needs the teacher's settings")
    if kind == "vllm":
        from tropd_cli.engine.teacher.vllm import VLLMTeacherScorer
        from tropd_cli.models import resolve_model_path

        return VLLMTeacherScorer(resolve_model_path(teacher.model), engine)
    if kind == "server":
        from tropd_cli.engine.teacher.server import ServerTeacherScorer, api_key_from

        return ServerTeacherScorer(teacher.url, teacher.timeout_s, teacher.retries, deadline_s=teacher.deadline_s,
                                   api_key=api_key_from(teacher.api_key_env), max_concurrency=teacher.max_concurrency,
                                   model=served_model)
    raise ValueError(f"unknown teacher backend {kind!r}")


def backend_missing(needs: frozenset[str], provides: frozenset[str]) -> list[str]:
    """What of `needs` is not in `provides`, in CAPABILITIES order."""
    return [name for name in CAPABILITIES if name in needs and name not in provides]
