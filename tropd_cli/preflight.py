"""Preflight: can this teacher/student pair be distilled with this configuration, on this device?

Checks run from tokenizers and model configs alone (no weights are read), so they take a second even for
7B models:

- vocabulary: the tokenizers' token -> id maps must be equal. Embedding rows are not compared: padded
  vocabularies differ inside one family (Qwen2.5: 151936 vs 152064 rows for the same tokenizer); each
  model only needs at least as many rows as its tokenizer has tokens;
- EOS and pad tokens: a student that stops on another token than the teacher learns never to stop;
- chat template: prompts are formatted with the student's template and scored by the teacher, so both
  must have one and it must be the same;
- memory: a rough peak estimate (weights by dtype/quantization, gradients and AdamW states of the
  trainable parameters, the rollout KV cache, the scoring chunk's logits, the student's activations)
  against the device's free memory: a warning above 80% of it, a refusal above all of it.

`tropd doctor` prints every check and the estimate; `tropd distill` runs the same checks first, prints
only warnings, and stops at the first failure with its one-line error.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from tropd_cli.config import RunConfig
from tropd_cli.data.prepared import PreparedFolder
from tropd_cli.data.rows import template_reads_thinking
from tropd_cli.data.sources import needs_teacher_responses
from tropd_cli.engine.precision import autocast_dtype
from tropd_cli.engine.scoring import chunk_positions, vocab_rows
from tropd_cli.errors import TropdError
from tropd_cli.models import DTYPES, load_model_config, load_tokenizer, meta_model, pick_device, stop_token_ids
from tropd_cli.toylab.accuracy import prompt_token_ids
from tropd_cli.toylab.tasks import random_problem

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
class Check:
    """One preflight result: what was found, and the one-line error or warning if any."""

    name: str
    detail: str
    error: str | None = None
    warning: str | None = None

    @property
    def status(self) -> str:
        return "fail" if self.error else "warn" if self.warning else "ok"


@dataclass
class MemoryEstimate:
    """Rough peak memory of a run, component by component, and the device's free memory."""

    device: torch.device
    rows: list[tuple[str, int]]  # (component, bytes)
    free: int

    @property
    def total(self) -> int:
        return sum(size for _, size in self.rows)


@dataclass
class Preflight:
    checks: list[Check]
    memory: MemoryEstimate
    student_tokenizer: PreTrainedTokenizerBase  # loaded for the checks; the run reuses it
    stop_ids: list[int]  # ids that end a rollout: tokenizer EOS and generation-config EOS ids
    prepared: PreparedFolder | None = None  # data.prompts, opened and checked; the run reuses it

    @property
    def first_error(self) -> str | None:
        return next((check.error for check in self.checks if check.error), None)


def special_token_check(label: str, teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase,
                        attribute: str) -> Check:
    """The teacher's and the student's `eos`/`pad` token must be the same token with the same id."""
    tokens = [getattr(tok, f"{attribute}_token") for tok in (teacher, student)]
    ids = [getattr(tok, f"{attribute}_token_id") for tok in (teacher, student)]
    if tokens[0] == tokens[1] and ids[0] == ids[1]:
        return Check(f"{label} token", f"{tokens[0]!r} (id {ids[0]})")
    same_token = tokens[0] == tokens[1]  # then only the ids differ: show them
    teacher_text, student_text = (f"{token!r} (id {token_id}, {role})" if same_token else f"{token!r} ({role})"
                                  for token, token_id, role in zip(tokens, ids, ("teacher", "student")))
    return Check(f"{label} token", "differ",
                 error=f"teacher and student {label} tokens differ: {teacher_text} vs {student_text}")


def vocabulary_check(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> Check:
    """Equal token -> id maps (added tokens included); the error names the first token that differs."""
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab == student_vocab:
        return Check("vocabulary", f"{len(teacher_vocab)} tokens, identical")
    differing = [token for token in teacher_vocab.keys() | student_vocab.keys()
                 if teacher_vocab.get(token) != student_vocab.get(token)]
    token = min(differing, key=lambda t: (min(i for i in (teacher_vocab.get(t), student_vocab.get(t))
                                              if i is not None), t))

    def where(vocab: dict[str, int]) -> str:
        return f"id {vocab[token]}" if token in vocab else "absent"

    return Check("vocabulary", "differ", error=(
        f"teacher and student vocabularies differ: {len(teacher_vocab)} tokens (teacher) vs "
        f"{len(student_vocab)} tokens (student); first difference {token!r}: {where(teacher_vocab)} (teacher) "
        f"vs {where(student_vocab)} (student)"))


def embedding_check(tokenizers: tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase],
                    configs: tuple[PretrainedConfig, PretrainedConfig]) -> Check:
    """Each model needs an embedding row for every token of its tokenizer; padding rows may differ."""
    rows = [config.get_text_config().vocab_size for config in configs]
    detail = f"{rows[0]} (teacher), {rows[1]} (student)"
    for role, tokenizer, row_count in zip(("teacher", "student"), tokenizers, rows):
        if len(tokenizer) > row_count:
            return Check("embedding rows", detail, error=(
                f"the {role} tokenizer has more tokens than its model has embedding rows: {len(tokenizer)} "
                f"(tokenizer) vs {row_count} (model)"))
    return Check("embedding rows", detail)


def _template_text(template: str | dict | None) -> str | None:
    if isinstance(template, dict):  # named templates: compare them all, in a stable order
        return "\n".join(f"{name}: {text}" for name, text in sorted(template.items()))
    return template


def chat_template_check(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase,
                        allow_mismatch: bool = False) -> Check:
    """Both tokenizers have a chat template, and it is the same (a difference only warns when
    `allow_mismatch`, teacher.allow_template_mismatch)."""
    texts = [_template_text(tok.chat_template) for tok in (teacher, student)]
    if texts[0] is not None and texts[0] == texts[1]:
        return Check("chat template", f"identical ({len(texts[0])} characters)")
    if texts[0] is None or texts[1] is None:
        described = ["missing" if text is None else f"{len(text)} characters" for text in texts]
        who = "teacher and student tokenizers have" if texts[0] is None and texts[1] is None else \
            f"the {'teacher' if texts[0] is None else 'student'} tokenizer has"
        return Check("chat template", "missing", error=(
            f"{who} no chat template: {described[0]} (teacher) vs {described[1]} (student)"))
    at = next((i for i, (a, b) in enumerate(zip(*texts)) if a != b), min(map(len, texts)))
    snippets = [text[max(0, at - 10):at + 20] for text in texts]
    message = (f"teacher and student chat templates differ at character {at}: {snippets[0]!r} (teacher) vs "
               f"{snippets[1]!r} (student)")
    if allow_mismatch:
        return Check("chat template", "differ", warning=f"{message} (allowed by teacher.allow_template_mismatch)")
    return Check("chat template", "differ", error=message)


def tokenizer_checks(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase,
                     configs: tuple[PretrainedConfig, PretrainedConfig], allow_template_mismatch: bool = False
                     ) -> list[Check]:
    """Vocabulary, embedding rows, EOS, pad and chat template, in that order."""
    return [vocabulary_check(teacher, student), embedding_check((teacher, student), configs),
            special_token_check("EOS", teacher, student, "eos"), special_token_check("pad", teacher, student, "pad"),
            chat_template_check(teacher, student, allow_template_mismatch)]


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
    """Tokens in the longest of a seeded sample of the run's prompts (the toy tasks); without a chat template
    (a failed check, reported separately) the bare prompt text."""
    rng = random.Random(config.train.seed)
    problems = [random_problem(rng, config.data.toylab) for _ in range(samples)]
    if tokenizer.chat_template is None:
        return max(len(tokenizer(problem.prompt).input_ids) for problem in problems)
    return max(len(prompt_token_ids(tokenizer, problem)) for problem in problems)


def thinking_check(config: RunConfig, teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> Check:
    """Which templates read `enable_thinking`; data.thinking on a student template that ignores it warns."""
    reads = [template_reads_thinking(tok) for tok in (teacher, student)]
    detail = (f"enable_thinking read by the template: {'yes' if reads[0] else 'no'} (teacher), "
              f"{'yes' if reads[1] else 'no'} (student); data.thinking: "
              f"{'template default' if config.data.thinking is None else str(config.data.thinking).lower()}")
    if config.data.thinking is not None and not reads[1]:
        return Check("thinking mode", detail, warning=f"data.thinking={str(config.data.thinking).lower()} has no "
                     "effect: the student's chat template does not read enable_thinking")
    return Check("thinking mode", detail)


def prompts_check(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> tuple[Check, PreparedFolder | None]:
    """The prompt source: the toy tasks, or a prepared folder made with the student's tokenizer (returned
    when usable, so that the other checks read it once)."""
    if config.data.prompts == "toylab":
        return Check("prompts", "toy tasks (built-in generator)"), None
    try:
        folder = PreparedFolder.open(config.data.prompts)
        folder.check_tokenizer(tokenizer, config.student.model)
    except TropdError as error:
        return Check("prompts", "unusable", error=str(error)), None
    counts = folder.manifest.get("counts", {})
    drafts = "with teacher drafts" if folder.drafts is not None else "no teacher drafts"
    return Check("prompts", f"{config.data.prompts}: {counts.get('train', '?')} train prompts, {drafts}"), folder


def teacher_samples(config: RunConfig, prepared: PreparedFolder | None = None) -> bool:
    """Whether the teacher generates during the run (then its KV cache counts too): for its held-out
    accuracy, gkd's off-policy steps, seqkd, and guidance or sft without the `prepared` folder's teacher
    drafts (a folder not prepared yet is assumed to get them)."""
    if config.eval.teacher and config.eval.problems or config.objective.name in ("gkd", "seqkd"):
        return True
    if not needs_teacher_responses(config):
        return False
    if config.data.prompts == "toylab":
        return True
    return prepared is not None and prepared.drafts is None


def longest_prompt_of(config: RunConfig, tokenizer: PreTrainedTokenizerBase, prepared: PreparedFolder | None
                      ) -> int:
    """Tokens in the longest training prompt: the `prepared` folder's, else a sample of the toy tasks'."""
    if prepared is not None:
        try:
            return max(map(len, prepared.train_prompt_ids()))
        except (TropdError, ValueError):  # no train.jsonl, or an empty one: the prompts check's concern
            return config.data.max_prompt_tokens
    return longest_prompt(config, tokenizer)


def free_memory(device: torch.device) -> int:
    """Bytes free on a CUDA device, or the memory available to new processes on this machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def estimate_memory(config: RunConfig, device: torch.device, teacher: torch.nn.Module, student: torch.nn.Module,
                    prompt_tokens: int, free: int | None = None, prepared: PreparedFolder | None = None
                    ) -> MemoryEstimate:
    """A rough peak-memory estimate of `tropd distill` from meta-device models and the config's sizes;
    `free` defaults to the device's free memory now; `prepared` is the run's prepared folder, if any."""
    t, s, rollout, train = config.teacher, config.student, config.rollout, config.train
    student_weights = weight_bytes(student, s.dtype, s.quantization, upcast_unquantized=s.lora.enabled)
    if s.lora.enabled:
        trainable = lora_parameters(student, s.lora.r, s.lora.target_modules)
        trainable_bytes = trainable * FP32_BYTES  # peft keeps adapters in float32 under a 16-bit base
        student_weights += trainable_bytes
    else:
        trainable = sum(p.numel() for p in student.parameters())
        trainable_bytes = weight_bytes(student, s.dtype, "none")
    sequences = min(rollout.prompts_per_step * rollout.n, rollout.batch_size)
    length = prompt_tokens + rollout.max_new_tokens
    mixed = autocast_dtype(train.autocast, device)
    compute = {dtype: name for name, dtype in DTYPES.items()}.get(mixed)  # autocast: 16-bit KV and activations
    kv = kv_cache_bytes(student, compute or s.dtype, sequences, length)
    if teacher_samples(config, prepared):
        kv = max(kv, kv_cache_bytes(teacher, compute or t.dtype, sequences, length))
    micro = min(train.micro_batch_size, sequences)
    vocab = max(vocab_rows(model) for model in (teacher, student))
    chunk = min(chunk_positions(train.logit_chunk_size, vocab), micro * rollout.max_new_tokens)
    rows = [
        (f"teacher weights ({t.dtype}, {t.quantization})", weight_bytes(teacher, t.dtype, t.quantization)),
        (f"student weights ({s.dtype}, {s.quantization}{', LoRA' if s.lora.enabled else ''})", student_weights),
        (f"gradients + AdamW states ({trainable:,} trainable)", 3 * trainable_bytes),
        (f"rollout KV cache ({sequences} x {length} tokens)", kv),
        (f"scoring logits ({chunk} positions x {vocab} vocab, float32)", CHUNK_TENSORS * chunk * vocab * FP32_BYTES),
        (f"student activations ({micro} x {length} tokens{', checkpointed' if train.gradient_checkpointing else ''}"
         ", rough)", activation_bytes(student, compute or s.dtype,
                                      micro * length, train.gradient_checkpointing)),
    ]
    return MemoryEstimate(device, rows, free_memory(device) if free is None else free)


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


def run_preflight(config: RunConfig) -> Preflight:
    """Every check for `config` on its device; nothing is printed or raised for a failed check."""
    device = pick_device(config.train.device)
    teacher_tokenizer, student_tokenizer = (load_tokenizer(section.model, section.trust_remote_code)
                                            for section in (config.teacher, config.student))
    configs = tuple(load_model_config(section.model, section.trust_remote_code)
                    for section in (config.teacher, config.student))
    checks = tokenizer_checks(teacher_tokenizer, student_tokenizer, configs, config.teacher.allow_template_mismatch)
    prompts, prepared = prompts_check(config, student_tokenizer)
    checks += [thinking_check(config, teacher_tokenizer, student_tokenizer), prompts]
    stop_ids = stop_token_ids(config.student.model, student_tokenizer)
    checks.append(Check("stop tokens", ", ".join(f"{student_tokenizer.convert_ids_to_tokens(i)!r} (id {i})"
                                                 for i in stop_ids) or "none"))
    teacher, student = (meta_model(model_config, section.trust_remote_code)
                        for model_config, section in zip(configs, (config.teacher, config.student)))
    estimate = estimate_memory(config, device, teacher, student,
                               longest_prompt_of(config, student_tokenizer, prepared), prepared=prepared)
    checks.append(memory_check(estimate))
    return Preflight(checks, estimate, student_tokenizer, stop_ids, prepared)


def checks_table(config: RunConfig, result: Preflight) -> Table:
    """The checks as a table: name, status, what was found."""
    table = Table(title=f"preflight: {config.teacher.model} (teacher) vs {config.student.model} (student)")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    colours = {"ok": "green", "warn": "yellow", "fail": "red"}
    for check in result.checks:
        table.add_row(check.name, f"[{colours[check.status]}]{check.status}[/]",
                      check.error or check.warning or check.detail)
    return table


def memory_table(estimate: MemoryEstimate) -> Table:
    """The memory estimate as a table, with its total and the device's free memory."""
    table = Table(title=f"rough peak memory on {estimate.device}")
    table.add_column("component")
    table.add_column("size", justify="right")
    for label, size in estimate.rows:
        table.add_row(label, gib(size))
    table.add_row("[bold]total[/]", f"[bold]{gib(estimate.total)}[/]")
    table.add_row("free", gib(estimate.free))
    return table


def doctor(config: RunConfig, console: Console) -> Preflight:
    """Print every check and the memory estimate; raise the first failure as a one-line TropdError."""
    result = run_preflight(config)
    console.print(checks_table(config, result))
    console.print(memory_table(result.memory))
    if result.first_error:
        raise TropdError(result.first_error)
    console.print("[green]ready to distill[/]")
    return result


def check_before_distill(config: RunConfig, console: Console) -> Preflight:
    """The same checks before a run: print warnings, raise the first failure as a one-line TropdError."""
    result = run_preflight(config)
    if result.first_error:
        raise TropdError(result.first_error)
    for check in result.checks:
        if check.warning:
            console.print(f"[yellow]warning:[/] {check.warning}", highlight=False)
    return result
