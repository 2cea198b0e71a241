"""Rollout backends (`rollout.backend`), made by one factory; the seam itself is in `base.py`.

`hf` generates with the training model (`hf.py`); `vllm` samples from an in-process vLLM engine synced after
every optimizer step (`vllm.py`, imported only when asked for, since vLLM is an optional extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tropd_cli.engine.rollout.base import RolloutBackend, Rollouts, SamplingParams, cut_at_eos
from tropd_cli.engine.rollout.hf import HFGenerateBackend

if TYPE_CHECKING:
    from tropd_cli.config import RunConfig
    from tropd_cli.engine.rollout.vllm import EngineOptions

__all__ = ["HFGenerateBackend", "RolloutBackend", "Rollouts", "SamplingParams", "cut_at_eos",
           "make_rollout_backend", "student_engine_options"]


def make_rollout_backend(kind: str, model: torch.nn.Module, pad_token_id: int, eos_token_ids: list[int],
                         batch_size: int = 256, autocast: torch.dtype | None = None, model_path: str | None = None,
                         options: EngineOptions | None = None, adapter: bool = False) -> RolloutBackend:
    """The rollout backend `kind` (`rollout.backend`) sampling from `model`, stopping at `eos_token_ids`.

    hf: at most `batch_size` sequences per call, forward passes in `autocast` (None: the model's dtype).
    vllm: an engine started on `model_path` (the student's base folder) with `options`, synced to `model`
    (only its adapter when `adapter`).
    """
    if kind == "hf":
        return HFGenerateBackend(model, pad_token_id, eos_token_ids, batch_size, autocast=autocast)
    if kind == "vllm":
        from tropd_cli.engine.rollout.vllm import VLLMRolloutBackend

        if model_path is None:
            raise ValueError("the vllm rollout backend needs the student's model_path")
        return VLLMRolloutBackend(model_path, model, eos_token_ids, options, adapter=adapter)
    raise ValueError(f"unknown rollout backend {kind!r}")


def student_engine_options(config: RunConfig) -> EngineOptions:
    """The vLLM engine settings of the student's rollouts (`rollout.vllm_*`, the run's seed, the LoRA rank).

    The engine computes in the dtype the trainer's forward passes use: the autocast dtype when there is one
    (float32 master weights in bfloat16 on a GPU sample in bfloat16), else the student's.
    """
    from tropd_cli.engine.precision import autocast_dtype
    from tropd_cli.engine.rollout.vllm import EngineOptions
    from tropd_cli.models import pick_device

    rollout, student = config.rollout, config.student
    mixed = autocast_dtype(config.train.autocast, pick_device(config.train.device))
    return EngineOptions(
        dtype=str(mixed).removeprefix("torch.") if mixed is not None else student.dtype, seed=config.train.seed,
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
        sleep=rollout.vllm_sleep, max_model_len=rollout.vllm_max_model_len,
        enforce_eager=rollout.vllm_enforce_eager, kv_cache_gib=rollout.vllm_kv_cache_gib,
        lora_rank=student.lora.r if student.lora.enabled else None,
        trust_remote_code=student.trust_remote_code)
