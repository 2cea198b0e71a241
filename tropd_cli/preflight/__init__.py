"""Preflight: can this teacher/student pair be distilled with this configuration, on this device?

Checks run from tokenizers and model configs alone (no weights are read), so they take a second even for
7B models:

- vocabulary: the tokenizers' token -> id maps must be equal. Embedding rows are not compared: padded
  vocabularies differ inside one family (Qwen2.5: 151936 vs 152064 rows for the same tokenizer); each
  model only needs at least as many rows as its tokenizer has tokens;
- EOS and pad tokens: a student that stops on another token than the teacher learns never to stop;
- chat template: prompts are formatted with the student's template and scored by the teacher, so both
  must have one and it must be the same;
- engine length: rollout.vllm_max_model_len holds the longest prompt an in-process vLLM engine is given plus
  rollout.max_new_tokens;
- backends: vLLM installed where asked for; the teacher backend returns what the objective needs (a
  served teacher has no entropy or full logits); a teacher server answers, with the teacher's vocabulary
  and enough prompt log-probs for the objective's top-k;
- memory: a rough peak estimate (weights by dtype/quantization, gradients and AdamW states of the
  trainable parameters, the rollout KV cache, the scoring chunk's logits, the student's activations)
  against the device's free memory: a warning above 80% of it, a refusal above all of it.

`tropd doctor` prints every check and the estimate; `tropd distill` runs the same checks first, prints
only warnings, and stops at the first failure with its one-line error.

The pair's checks live in `pairs.py`, the memory model in `memory.py`; this module runs them, prints them
and offers every public name under `tropd_cli.preflight`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from tropd_cli.config import RunConfig
from tropd_cli.data.prepared import PreparedFolder
from tropd_cli.errors import TropdError
from tropd_cli.models import load_model_config, load_tokenizer, meta_model, pick_device, stop_token_ids
from tropd_cli.preflight.memory import (
    MemoryEstimate,
    activation_bytes,
    estimate_memory,
    free_memory,
    gib,
    kv_cache_bytes,
    longest_held_out_prompt,
    longest_prompt,
    longest_prompt_of,
    lora_parameters,
    memory_check,
    teacher_samples,
    weight_bytes,
)
from tropd_cli.preflight.pairs import (
    Check,
    backends_check,
    chat_template_check,
    embedding_check,
    engine_length_check,
    engine_prompts,
    objective_check,
    prompts_check,
    sampling_check,
    special_token_check,
    thinking_check,
    tokenizer_checks,
    vocabulary_check,
    weights_check,
)

__all__ = [
    "Check", "MemoryEstimate", "Preflight", "activation_bytes", "backends_check", "chat_template_check",
    "check_before_distill", "checks_table", "doctor", "embedding_check", "engine_length_check", "engine_prompts",
    "estimate_memory", "free_memory", "gib", "kv_cache_bytes", "longest_held_out_prompt", "longest_prompt",
    "longest_prompt_of", "lora_parameters", "memory_check", "memory_table", "objective_check", "prompts_check",
    "run_preflight", "sampling_check", "special_token_check", "teacher_samples", "thinking_check", "tokenizer_checks",
    "vocabulary_check", "weight_bytes", "weights_check"
]


@dataclass
class Preflight:
    checks: list[Check]
    memory: MemoryEstimate
    student_tokenizer: PreTrainedTokenizerBase  # loaded for the checks; the run reuses it
    stop_ids: list[int]  # ids that end a rollout: tokenizer EOS and generation-config EOS ids
    prepared: PreparedFolder | None = None  # data.prompts, opened and checked; the run reuses it
    served_model: str | None = None  # the id a teacher server serves the teacher under; the run's scorer asks for it

    @property
    def first_error(self) -> str | None:
        return next((check.error for check in self.checks if check.error), None)


def run_preflight(config: RunConfig, nproc: int | None = None) -> Preflight:
    """Every check for `config` on its device, the memory per rank of `nproc` processes (default: the
    processes torchrun started); nothing is printed or raised for a failed check."""
    from tropd_cli.engine import distributed

    device = distributed.rank_device(pick_device(config.train.device))
    teacher_tokenizer, student_tokenizer = (load_tokenizer(section.model, section.trust_remote_code)
                                            for section in (config.teacher, config.student))
    configs = tuple(load_model_config(section.model, section.trust_remote_code)
                    for section in (config.teacher, config.student))
    checks = tokenizer_checks(teacher_tokenizer, student_tokenizer, configs, config.teacher.allow_template_mismatch)
    prompts, prepared = prompts_check(config, student_tokenizer)
    checks += [thinking_check(config, teacher_tokenizer, student_tokenizer), prompts, objective_check(config, configs),
               weights_check(config), sampling_check(config)]
    backends, served_model = backends_check(config, teacher_tokenizer)
    checks.append(backends)
    stop_ids = stop_token_ids(config.student.model, student_tokenizer)
    checks.append(Check("stop tokens", ", ".join(f"{student_tokenizer.convert_ids_to_tokens(i)!r} (id {i})"
                                                 for i in stop_ids) or "none"))
    teacher, student = (meta_model(model_config, section.trust_remote_code)
                        for model_config, section in zip(configs, (config.teacher, config.student)))
    longest = longest_prompt_of(config, student_tokenizer, prepared)
    training, held_out = engine_prompts(config)
    if training:
        checks.append(engine_length_check(config, longest, longest_held_out_prompt(config, student_tokenizer)
                                          if held_out else None))
    # looked up here, in the package, so that replacing `tropd_cli.preflight.free_memory` reaches the estimate
    estimate = estimate_memory(config, device, teacher, student, longest, free_memory(device), prepared=prepared,
                               nproc=nproc or distributed.world_size())
    checks.append(memory_check(estimate))
    return Preflight(checks, estimate, student_tokenizer, stop_ids, prepared, served_model)


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
    per_rank = f" ({estimate.ranks})" if estimate.ranks else ""
    table = Table(title=f"rough peak memory on {estimate.device}{per_rank}")
    table.add_column("component")
    table.add_column("size", justify="right")
    for label, size in estimate.rows:
        table.add_row(label, gib(size))
    table.add_row("[bold]total[/]", f"[bold]{gib(estimate.total)}[/]")
    table.add_row("free", gib(estimate.free))
    return table


def doctor(config: RunConfig, console: Console, nproc: int = 1) -> Preflight:
    """Print every check and the memory estimate (per rank of `nproc` processes); raise the first failure as
    a one-line TropdError."""
    result = run_preflight(config, nproc)
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
