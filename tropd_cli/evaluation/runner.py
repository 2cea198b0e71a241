"""`tropd evaluate`: every model on every benchmark, same problems and seeds, then the report.

Problems are loaded once per benchmark, before any model, so every model answers the same questions.
Each model is loaded once, generates through the engine's batched backend (KV cache) in chunks of
`batch_size // n` problems, chunk c seeded with `seed + c`, and is freed before the next model. With
temperature 0 and n = 1 the chunks are exactly the batches `toy_accuracy` uses, so the toy-lab numbers
match the manifest's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from tropd_cli.data.chat import chat_prompt_ids
from tropd_cli.engine.generation import generate_texts
from tropd_cli.engine.rollout import SamplingParams
from tropd_cli.evaluation.graders import grade_all
from tropd_cli.evaluation.loading import resolve_model_source
from tropd_cli.evaluation.metrics import summarise
from tropd_cli.evaluation.registry import EvalProblem, ProblemSet, get_benchmark, load_problems
from tropd_cli.evaluation.report import EvalReport, print_table, write_report
from tropd_cli.evaluation.settings import EvalSettings
from tropd_cli.files import OwnedFolder, writing
from tropd_cli.models import load_causal_lm, load_tokenizer, pick_device, stop_token_ids


class ProblemRateColumn(ProgressColumn):
    """Problems per second of a progress task."""

    def render(self, task: Task) -> Text:
        # Generation advances in large chunks, too few updates for Rich's windowed speed estimate.
        elapsed = task.finished_time if task.finished else task.elapsed
        rate = task.completed / elapsed if elapsed and task.completed else None
        return Text(f"{rate:.2f} problems/s" if rate else "- problems/s", style="progress.data.speed")


@dataclass
class Pass:
    """One decoding pass over a benchmark: greedy (n = 1) or sampled (n = k)."""

    name: str
    n: int
    params: SamplingParams


@dataclass
class BenchmarkRun:
    """One model's graded samples on one benchmark, per pass and problem."""

    metrics: dict[str, float | None] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)


def evaluate(settings: EvalSettings, console: Console | None = None, trust_remote_code: bool = False) -> EvalReport:
    """Evaluate `settings.models` on `settings.benchmarks`, write the report folder and print the table.

    The folder is written whole at the end (a failure leaves no folder behind); `overwrite` replaces only a
    folder tropd wrote, which stays locked against other writers while the evaluation runs.
    """
    console = console or Console()
    with OwnedFolder(settings.out, "evaluate") as output:
        output.claim(bool(settings.overwrite))
        report = _evaluate(settings, console, trust_remote_code)
        with writing(f"the report to {settings.out}"):
            output.replace(lambda folder: write_report(report, replace(settings, out=folder)))
    print_table(console, report)
    console.print(f"report: {settings.out / 'report.json'}  samples: {settings.out / 'samples.jsonl'}")
    return report


def _evaluate(settings: EvalSettings, console: Console, trust_remote_code: bool) -> EvalReport:
    benchmarks = [get_benchmark(name) for name in settings.benchmarks]
    problem_sets = [load_problems(b, settings.data, settings.seed, settings.limit) for b in benchmarks]
    sources = [resolve_model_source(spec) for spec in settings.models]
    tokenizers = [load_tokenizer(source.tokenizer, trust_remote_code)  # every tokenizer error before any work
                  for source in sources]
    device = pick_device(settings.device)
    report = EvalReport.start(settings, sources, problem_sets)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        ProblemRateColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=console)
    with progress:
        for label, source, tokenizer in zip(settings.labels, sources, tokenizers):
            model = load_causal_lm(source.model, settings.dtype, device, trainable=False, merge_adapter=source.adapter,
                                   trust_remote_code=trust_remote_code)
            stop_ids = stop_token_ids(source.model, tokenizer)
            for problem_set in problem_sets:
                run = run_benchmark(model, tokenizer, problem_set, settings, progress, label, stop_ids)
                report.add(problem_set.benchmark.name, label, run.metrics, run.samples)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return report


def decoding_passes(settings: EvalSettings, max_new_tokens: int) -> list[Pass]:
    """Greedy only at temperature 0; otherwise k samples, plus a greedy pass when asked."""
    greedy = Pass("greedy", 1, SamplingParams(max_new_tokens, 0.0, 1.0))
    if settings.temperature == 0:
        return [greedy]
    sampled = Pass("sampled", settings.k, SamplingParams(max_new_tokens, settings.temperature, settings.top_p))
    return [sampled, greedy] if settings.greedy else [sampled]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, problem: EvalProblem, thinking: bool | None) -> list[int]:
    """The problem's message in the chat template (with enable_thinking when set), or raw text without one."""
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    return chat_prompt_ids(tokenizer, problem.message, **kwargs)


def run_benchmark(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, problem_set: ProblemSet,
                  settings: EvalSettings, progress: Progress, label: str, stop_ids: list[int]) -> BenchmarkRun:
    """Generate, grade and summarise one model's answers to one benchmark's problems; a response ends at
    any of `stop_ids` (the tokenizer's EOS and the model's generation-config EOS ids, as in `distill`)."""
    problems = problem_set.problems
    benchmark = problem_set.benchmark
    max_new_tokens = settings.max_new_tokens or benchmark.max_new_tokens
    prompts = [prompt_ids(tokenizer, problem, settings.thinking) for problem in problems]
    run = BenchmarkRun()
    started = time.perf_counter()
    response_tokens = truncated = timeouts = 0
    for decoding in decoding_passes(settings, max_new_tokens):
        task = progress.add_task(f"{label} · {benchmark.name} · {decoding.name}", total=len(problems))
        chunk = max(1, settings.batch_size // decoding.n)
        texts: list[str] = []
        finished: list[bool] = []
        for index, start in enumerate(range(0, len(problems), chunk)):
            rollouts, chunk_texts = generate_texts(model, tokenizer, prompts[start:start + chunk], decoding.n,
                                                   decoding.params, settings.seed + index, settings.batch_size,
                                                   stop_ids)
            texts += chunk_texts
            finished += rollouts.finished
            response_tokens += sum(len(ids) for ids in rollouts.response_ids)
            progress.advance(task, len(rollouts.prompt_ids))
        # Responses are prompt-major: problem i owns texts[i * n:(i + 1) * n].
        owners = [problems[i // decoding.n] for i in range(len(texts))]
        grades = grade_all(list(zip(owners, texts)), settings.grading_timeout_s)
        correct = [[g.correct for g in grades[i * decoding.n:(i + 1) * decoding.n]] for i in range(len(problems))]
        extracted = [[g.extracted for g in grades[i * decoding.n:(i + 1) * decoding.n]]
                     for i in range(len(problems))]
        run.metrics.update(summarise(correct, extracted, greedy=decoding.name == "greedy"))
        truncated += finished.count(False)
        timeouts += sum(g.timed_out for g in grades)
        for position, (problem, text, grade, done) in enumerate(zip(owners, texts, grades, finished)):
            run.samples.append({
                "benchmark": benchmark.name, "model": label, "pass": decoding.name, "problem": problem.index,
                "sample": position % decoding.n, "prompt": problem.message, "answer": problem.answer,
                "response": text, "extracted": grade.extracted, "correct": grade.correct, "finished": done,
            })
    run.metrics.update({
        "problems": len(problems),
        "samples": len(run.samples),
        "mean_response_tokens": response_tokens / max(1, len(run.samples)),
        "truncated_fraction": truncated / max(1, len(run.samples)),
        "grading_timeouts": timeouts,
        "seconds": round(time.perf_counter() - started, 2),
    })
    return run
