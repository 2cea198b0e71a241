"""Preflight's memory model: a rough peak-memory estimate of `tropd distill`, and its check.

The estimate adds, from meta-device models (no weights are read) and the configuration's sizes: weights by
dtype and quantization, gradients and AdamW states of the trainable parameters, the rollout KV cache, the
scoring chunk's logits and the student's activations; `memory_check` compares it with the device's free
memory: a warning above 80% of it, a refusal above all of it. `bench/preset_memory.py` and
`bench/real_shape.py` hold it against measured peaks.

On N processes (`--nproc N`) the estimate is per rank, for the strategy `train.strategy` resolves to: each
rank samples and scores 1/N of the step's rollouts; under ddp it holds the whole student, its gradients and
AdamW states; under fsdp2 it holds 1/N of the student's weights, gradients and AdamW states, plus the whole
student gathered while it generates (rollouts run on whole weights). The teacher is whole on every rank,
or with teacher.shard 1/N of it, plus the whole teacher gathered when it generates.

Its prompt probe (`longest_prompt`) samples a prompt generator (data.prompts when it names one, else the
default prompt source, the toy lab's) for the longest prompt of a run that has no prepared folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from tropd_cli.config import DataConfig, RunConfig
from tropd_cli.data import is_generator
from tropd_cli.data.chat import chat_prompt_ids
from tropd_cli.data.generators import get_generator
from tropd_cli.data.prepared import PreparedFolder
from tropd_cli.data.sources import needs_teacher_responses
from tropd_cli.engine.objectives import get_objective
from tropd_cli.engine.precision import autocast_dtype
from tropd_cli.engine.scoring import chunk_positions, vocab_rows
from tropd_cli.errors import TropdError
from tropd_cli.models import DTYPES
from tropd_cli.preflight.pairs import Check

WARN_FRACTION = 0.8  # of free memory: the estimate is rough, so warn before it is reached
# bitsandbytes bytes per quantized weight: nf4 with double quant (4-bit values, 8-bit absmax per block of 64,
# fp32 per 256 absmax) and LLM.int8 (int8 values; its per-row scale is counted separately).
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
FP32_BYTES = 4
# float32 [chunk, vocab] tensors alive while a chunk is scored: the log-probs (logits first, in place) and
# one temporary (the teacher's probabilities; the student's recomputed logits turned into their gradient).
CHUNK_TENSORS = 3
# Activations kept for backward per token and layer, in units of hidden and intermediate size (rough:
# attention inputs/outputs and norms ~ 8 x hidden, MLP gate/up/activation ~ 3 x intermediate).
ACTIVATIONS_PER_HIDDEN, ACTIVATIONS_PER_INTERMEDIATE = 8, 3


@dataclass
class MemoryEstimate:
    """Rough peak memory of a run, component by component, and the device's free memory."""

    device: torch.device
    rows: list[tuple[str, int]]  # (component, bytes)
    free: int
    ranks: str = ""  # "per rank, fsdp2 on 2 processes" on several processes

    @property
    def total(self) -> int:
        return sum(size for _, size in self.rows)


def weight_bytes(model: torch.nn.Module, dtype: str, quantization: str, upcast_unquantized: bool = False) -> int:
    """Bytes of a model's weights: linear layers (not the output head) at the quantized size, the rest at
    `dtype` (float32 when `upcast_unquantized`: peft's k-bit preparation upcasts them for training)."""
    element = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    head = model.get_output_embeddings()
    quantized, scales = 0, 0
    if quantization != "none":
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                quantized += module.weight.numel()
                scales += module.out_features if quantization == "8bit" else 0
    rest = sum(p.numel() for p in model.parameters()) - quantized
    rest_element = FP32_BYTES if quantization != "none" and upcast_unquantized else element
    return int(quantized * QUANTIZED_BYTES.get(quantization, 0) + scales * FP32_BYTES + rest * rest_element)


def lora_parameters(model: torch.nn.Module, r: int, target_modules: str | list[str]) -> int:
    """Parameters of LoRA adapters (A: r x in, B: out x r) on the targeted linear layers, as peft picks them."""
    head = model.get_output_embeddings()
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        if target_modules == "all-linear":
            targeted = True
        elif isinstance(target_modules, str):
            targeted = re.fullmatch(target_modules, name) is not None
        else:
            targeted = any(name == target or name.endswith(f".{target}") for target in target_modules)
        if targeted:
            count += r * (module.in_features + module.out_features)
    return count


def _text_config(model: torch.nn.Module) -> PretrainedConfig:
    return model.config.get_text_config()


def kv_cache_bytes(model: torch.nn.Module, dtype: str, sequences: int, tokens: int) -> int:
    """Keys and values of every layer for `sequences` x `tokens` positions."""
    config = _text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    element = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element * sequences * tokens


def activation_bytes(model: torch.nn.Module, dtype: str, tokens: int, checkpointed: bool = False) -> int:
    """Very rough: what one micro-batch's forward keeps for backward. With gradient checkpointing, each
    layer's input, plus one layer's activations while it is recomputed."""
    config = _text_config(model)
    intermediate = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    element = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    per_layer = ACTIVATIONS_PER_HIDDEN * config.hidden_size + ACTIVATIONS_PER_INTERMEDIATE * intermediate
    if checkpointed:
        return (config.num_hidden_layers * config.hidden_size + per_layer) * element * tokens
    return config.num_hidden_layers * per_layer * element * tokens


def longest_prompt(config: RunConfig, tokenizer: PreTrainedTokenizerBase, samples: int = 64) -> int:
    """Tokens in the longest of a seeded sample of a prompt generator's prompts, chat-formatted: data.prompts'
    generator, or for a folder the default prompt source's (the schema's data.prompts); without a chat template
    (a failed check, reported separately) the bare prompt text, as the chat encoder falls back to."""
    name = config.data.prompts if is_generator(config.data.prompts) else DataConfig.model_fields["prompts"].default
    prompts = get_generator(name).probe_prompts(config, samples)
    return max(len(chat_prompt_ids(tokenizer, prompt)) for prompt in prompts)


def teacher_samples(config: RunConfig, prepared: PreparedFolder | None = None) -> bool:
    """Whether the teacher generates during the run (then its KV cache counts too): for its held-out
    accuracy, gkd's off-policy steps, seqkd, and guidance or sft without the `prepared` folder's teacher
    drafts (a folder not prepared yet is assumed to get them)."""
    if config.eval.teacher and config.eval.problems or get_objective(config.objective.name).teacher_generates():
        return True
    if not needs_teacher_responses(config):
        return False
    if is_generator(config.data.prompts):
        return True
    return prepared is not None and prepared.drafts is None


def longest_prompt_of(config: RunConfig, tokenizer: PreTrainedTokenizerBase, prepared: PreparedFolder | None
                      ) -> int:
    """Tokens in the longest training prompt: the `prepared` folder's, else a prompt generator's sample."""
    if prepared is not None:
        try:
            return max(map(len, prepared.train_prompt_ids()))
        except (TropdError, ValueError):  # no train.jsonl, or an empty one: the prompts check's concern
            return config.data.max_prompt_tokens
    return longest_prompt(config, tokenizer)


def longest_held_out_prompt(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Tokens in the longest held-out prompt, as the run asks it (None when the benchmark cannot be read here: the
    run's own set-up says why)."""
    from tropd_cli.evaluation.heldout import HeldOut

    try:
        return max(map(len, HeldOut(config, tokenizer).prompt_ids()), default=0)
    except TropdError:
        return None


def free_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device, or the memory available to new processes on this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def total_memory(device: torch.device) -> int:
    """Bytes a CUDA device has in all, or this machine's memory: what vLLM's memory share is a fraction of."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total


def engine_row(whose: str, weights: int, config: RunConfig, device_total: int) -> tuple[str, int]:
    """A vLLM engine's memory: its weights and a KV cache of rollout.vllm_kv_cache_gib, or, when vLLM sizes the
    cache, the share rollout.vllm_gpu_memory_utilization of the device that vLLM claims for weights and cache."""
    rollout = config.rollout
    if rollout.vllm_kv_cache_gib is not None:
        return (f"{whose} vLLM engine (weights + {rollout.vllm_kv_cache_gib:g} GiB KV cache)",
                weights + int(rollout.vllm_kv_cache_gib * 2**30))
    share = rollout.vllm_gpu_memory_utilization
    return (f"{whose} vLLM engine ({share:g} of the device, rollout.vllm_gpu_memory_utilization)",
            max(weights, int(share * device_total)))


def estimate_memory(config: RunConfig, device: torch.device, teacher: torch.nn.Module, student: torch.nn.Module,
                    prompt_tokens: int, free: int | None = None, prepared: PreparedFolder | None = None,
                    nproc: int = 1, device_total: int | None = None) -> MemoryEstimate:
    """A rough peak-memory estimate of `tropd distill` from meta-device models and the config's sizes, per
    rank on `nproc` processes; `free` defaults to the device's free memory now and `device_total` to its whole
    memory (what a vLLM engine's share is of); `prepared` is the run's prepared folder, if any.

    A vLLM engine (`teacher.backend: vllm`, `rollout.backend: vllm`) counts as held through the run: the
    teacher's never sleeps, and the student's sleeps only between rollouts (the peak is while it samples)."""
    from tropd_cli.engine.strategy import resolve_strategy

    t, s, rollout, train = config.teacher, config.student, config.rollout, config.train
    strategy = resolve_strategy(train.strategy, nproc, s.lora.enabled) if nproc > 1 else "single"
    shards = nproc if strategy == "fsdp2" else 1
    student_weights = weight_bytes(student, s.dtype, s.quantization, upcast_unquantized=s.lora.enabled)
    if s.lora.enabled:
        trainable = lora_parameters(student, s.lora.r, s.lora.target_modules)
        trainable_bytes = trainable * FP32_BYTES  # peft keeps adapters in float32 under a 16-bit base
        student_weights += trainable_bytes
    else:
        trainable = sum(p.numel() for p in student.parameters())
        trainable_bytes = weight_bytes(student, s.dtype, "none")
    sequences = min(rollout.prompts_per_step * rollout.n // nproc, rollout.batch_size)
    length = prompt_tokens + rollout.max_new_tokens
    mixed = autocast_dtype(train.autocast, device)
    compute = {dtype: name for name, dtype in DTYPES.items()}.get(mixed)  # autocast: 16-bit KV and activations
    served = t.backend == "server"  # the server holds the teacher's weights and KV cache, and samples
    teacher_engine, student_engine = t.backend == "vllm", rollout.backend == "vllm"  # engines hold their own caches
    kv = 0 if student_engine else kv_cache_bytes(student, compute or s.dtype, sequences, length)
    if teacher_samples(config, prepared) and t.backend == "hf":
        kv = max(kv, kv_cache_bytes(teacher, compute or t.dtype, sequences, length))
    micro = min(train.micro_batch_size, sequences)
    vocab = max(vocab_rows(model) for model in ((student,) if served else (teacher, student)))
    chunk = min(chunk_positions(train.logit_chunk_size, vocab), micro * rollout.max_new_tokens)
    sharded = f", 1/{shards} per rank" if shards > 1 else ""
    teacher_shards = nproc if t.shard and nproc > 1 else 1
    teacher_weights = 0 if served else weight_bytes(teacher, t.dtype, t.quantization)
    gathered_teacher = teacher_shards > 1 and teacher_samples(config, prepared)
    device_total = total_memory(device) if device_total is None and (teacher_engine or student_engine) \
        else device_total
    if served:
        teacher_row = ("teacher weights: none here (served)", 0)
    elif teacher_engine:  # the engine's copy is the only one
        teacher_row = engine_row("teacher", teacher_weights, config, device_total)
    else:
        teacher_row = (f"teacher weights ({t.dtype}, {t.quantization}"
                       f"{f', 1/{teacher_shards} per rank' if teacher_shards > 1 else ''})",
                       teacher_weights // teacher_shards)
    engine_dtype = compute or s.dtype  # the student's engine samples in the dtype the trainer computes in
    rows = [
        teacher_row,
        *([("teacher weights gathered whole while generating", teacher_weights)] if gathered_teacher else []),
        (f"student weights ({s.dtype}, {s.quantization}{', LoRA' if s.lora.enabled else ''}{sharded})",
         student_weights // shards),
        *([gathered_student_row(student, config, student_weights, trainable_bytes)] if shards > 1 else []),
        (f"gradients + AdamW states ({trainable:,} trainable{sharded})", 3 * trainable_bytes // shards),
        *([engine_row("student's", weight_bytes(student, engine_dtype, "none"), config, device_total)]
          if student_engine else []),
        *([(f"rollout KV cache ({sequences} x {length} tokens)", kv)] if kv else []),
        (f"scoring logits ({chunk} positions x {vocab} vocab, float32)", CHUNK_TENSORS * chunk * vocab * FP32_BYTES),
        (f"student activations ({micro} x {length} tokens{', checkpointed' if train.gradient_checkpointing else ''}"
         ", rough)", activation_bytes(student, compute or s.dtype,
                                      micro * length, train.gradient_checkpointing)),
    ]
    ranks = f"per rank, {strategy} on {nproc} processes" if nproc > 1 else ""
    return MemoryEstimate(device, rows, free_memory(device) if free is None else free, ranks)


def gathered_student_row(student: torch.nn.Module, config: RunConfig, student_weights: int,
                         trainable_bytes: int) -> tuple[str, int]:
    """What a sharded (fsdp2) student holds whole beside its shard: with HF rollouts the whole student while it
    generates; with a vLLM engine (which generates from its own copy) only what each sync hands it: a LoRA student's
    adapters, together, or a full student's tensors one at a time (the largest). A QLoRA student's held-out answers
    come from HF generate (its engine runs the unquantized base), on the whole student."""
    from tropd_cli.engine.rollout import student_eval_sampler

    s = config.student
    if config.rollout.backend != "vllm" or (config.eval.problems > 0 and student_eval_sampler(config) == "hf"):
        return "student weights gathered whole while generating", student_weights
    if s.lora.enabled:
        return "student's LoRA adapters gathered whole at each engine sync", trainable_bytes
    largest = max(p.numel() for p in student.parameters())
    return ("student's largest tensor gathered whole at each engine sync (one at a time)",
            largest * DTYPES[s.dtype].itemsize)


def gib(size: float) -> str:
    """A byte count for people: MiB below one GiB."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def memory_check(estimate: MemoryEstimate) -> Check:
    """Refuse above the device's free memory, warn above WARN_FRACTION of it."""
    total, free, where = estimate.total, estimate.free, str(estimate.device)
    detail = f"~{gib(total)} of {gib(free)} free on {where}"
    if total > free:
        return Check("memory", detail, error=(
            f"the run needs more memory than {where} has free: ~{gib(total)} (estimate) vs {gib(free)} (free); "
            f"lower rollout.batch_size, train.micro_batch_size or train.logit_chunk_size, or quantize"))
    if total > WARN_FRACTION * free:
        return Check("memory", detail, warning=(
            f"the run may not fit in memory on {where}: ~{gib(total)} (estimate) vs {gib(free)} (free)"))
    return Check("memory", detail)
