"""Rollout backends (`rollout.backend`), made by one factory; the seam itself is in `base.py`.

`hf` generates with the training model (`hf.py`); `vllm` samples from an in-process vLLM engine synced after
every optimizer step (`vllm.py`, imported only when asked for, since vLLM is an optional extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tropd_cli.engine.rollout.base import RolloutBackend, Rollouts, SamplingParams, cut_at_eos
from tropd_cli.engine.rollout.hf import HFGenerateBackend

if TYPE_CHECKING:
    from tropd_cli.engine.vllm_engine import EngineOptions

__all__ = ["HFGenerateBackend", "RolloutBackend", "Rollouts", "SamplingParams", "cut_at_eos",
           "make_rollout_backend", "student_eval_sampler"]


def make_rollout_backend(kind: str, model: torch.nn.Module | None, pad_token_id: int, eos_token_ids: list[int],
                         batch_size: int = 256, autocast: torch.dtype | None = None, model_path: str | None = None,
                         options: EngineOptions | None = None, adapter: bool = False, llm: Any = None,
                         setting: str = "rollout.backend=vllm") -> RolloutBackend:
    """The rollout backend `kind` (`rollout.backend`) sampling from `model`, stopping at `eos_token_ids`.

    hf: at most `batch_size` sequences per call, forward passes in `autocast` (None: the model's dtype).
    vllm: an engine started on `model_path` (the student's base folder) with `options`, or the started `llm`,
    synced to `model` (only its adapter when `adapter`; nothing when `model` is None: a frozen teacher); `setting`
    names what asked for vLLM when it is missing.
    """
    if kind == "hf":
        return HFGenerateBackend(model, pad_token_id, eos_token_ids, batch_size, autocast=autocast)
    if kind == "vllm":
        from tropd_cli.engine.rollout.vllm import VLLMRolloutBackend

        if model_path is None:
            raise ValueError("the vllm rollout backend needs the student's model_path")
        return VLLMRolloutBackend(model_path, model, eos_token_ids, options, adapter=adapter, llm=llm, setting=setting)
    raise ValueError(f"unknown rollout backend {kind!r}")



def student_eval_sampler(config: Any) -> str:
    """What samples a run's student for its held-out answers: its vLLM engine (which holds the weights of the last
    update), else HF generate on the student itself (also for a QLoRA student, whose engine runs the unquantized
    base)."""
    return "vllm" if config.rollout.backend == "vllm" and config.student.quantization == "none" else "hf"
