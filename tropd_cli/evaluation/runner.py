"""`tropd evaluate`: every model on every benchmark, same problems and seeds, then the report.

Problems are loaded once per benchmark, before any model, so every model answers the same questions.
Each model is loaded once (`--backend hf`: as a torch module generating through the engine's batched backend;
`--backend vllm`: in a vLLM engine), generates in chunks of `batch_size // n` problems, chunk c seeded with
`seed + c`, and is freed before the next model. With temperature 0 and n = 1 the chunks are exactly the batches
`toy_accuracy` uses, so the toy-lab numbers match the manifest's. Every finished chunk goes to the evaluation's
journal (evaluation/journal.py): run again after an interruption, the evaluation generates only the chunks it
lacks, and a model whose chunks are all there is not loaded.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

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
from tropd_cli.engine.generation import Generator, generate_texts
from tropd_cli.engine.rollout import SamplingParams
from tropd_cli.errors import Interrupted
from tropd_cli.evaluation.graders import grade_all
from tropd_cli.evaluation.journal import Chunk, Journal, journal_folder, journal_lock
from tropd_cli.evaluation.loading import ModelSource, resolve_model_source
from tropd_cli.evaluation.metrics import summarise
from tropd_cli.evaluation.registry import EvalProblem, ProblemSet, get_benchmark, load_problems
from tropd_cli.evaluation.report import EvalReport, print_table, write_report
from tropd_cli.evaluation.settings import EvalSettings
from tropd_cli.files import OwnedFolder, writing
from tropd_cli.models import (
    auto_dtype,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_model_path,
    stop_token_ids,
)


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
        with journal_lock(settings.out):
            try:
                report, journal = _evaluate(settings, console, trust_remote_code)
            except KeyboardInterrupt:
                folder = journal_folder(settings.out)
                if not (folder / "samples.jsonl").is_file():
                    raise Interrupted("interrupted before any response was finished; nothing was kept") from None
                raise Interrupted(f"interrupted; the responses generated so far are kept in {folder}; run the same "
                                  "command again to continue") from None
            with writing(f"the report to {settings.out}"):
                output.replace(lambda folder: write_report(report, replace(settings, out=folder)))
            journal.remove()
    print_table(console, report)
    console.print(f"report: {settings.out / 'report.json'}  samples: {settings.out / 'samples.jsonl'}")
    return report


def _evaluate(settings: EvalSettings, console: Console, trust_remote_code: bool) -> tuple[EvalReport, Journal]:
    benchmarks = [get_benchmark(name) for name in settings.benchmarks]
    problem_sets = [load_problems(b, settings.data, settings.seed, settings.limit) for b in benchmarks]
    sources = [resolve_model_source(spec) for spec in settings.models]
    tokenizers = [load_tokenizer(source.tokenizer, trust_remote_code)  # every tokenizer error before any work
                  for source in sources]
    device = pick_device(settings.device)
    if settings.backend == "vllm":
        from tropd_cli.engine.vllm_engine import import_vllm

        import_vllm("--backend vllm")  # a missing vLLM is one line before any model loads
    if settings.dtype == "auto":
        settings = replace(settings, dtype=auto_dtype(device))
    report = EvalReport.start(settings, sources, problem_sets)
    journal = Journal(settings.out, journal_protocol(report, sources, device), console)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        ProblemRateColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                        console=console)
    with progress:
        for label, source, tokenizer in zip(settings.labels, sources, tokenizers):
            model = LoadedOnUse(source, settings, device, stop_token_ids(source.model, tokenizer), trust_remote_code)
            for problem_set in problem_sets:
                run = run_benchmark(model, tokenizer, problem_set, settings, progress, label, journal)
                report.add(problem_set.benchmark.name, label, run.metrics, run.samples)
            model.free()
    return report, journal


def journal_protocol(report: EvalReport, sources: list[ModelSource], device: torch.device) -> dict:
    """What a journal's chunks depend on: the report's protocol (less when and by which version it was made, and
    grading, which changes no response), the device, the models with their files, the benchmarks' problems."""
    protocol = {key: value for key, value in report.protocol.items()
                if key not in ("created", "tropd_version", "grading_timeout_s")}
    return json.loads(json.dumps({**protocol, "device": device.type, "models": report.models,
                                  "model_files": [model_files(source) for source in sources], "benchmarks": {
        name: {key: entry[key] for key in ("source", "fingerprint", "problems", "max_new_tokens")}
        for name, entry in report.benchmarks.items()}}))


def model_files(source: ModelSource) -> list[list]:
    """Name, size and modification time of each file of a model's (and its adapter's) local folder: what tells a
    folder trained again in place from the one a journal's responses came from (a hub id has none here)."""
    folders = [Path(resolve_model_path(source.model)), *([Path(source.adapter)] if source.adapter else [])]
    return [[str(path), path.stat().st_size, path.stat().st_mtime_ns] for folder in folders if folder.is_dir()
            for path in sorted(folder.iterdir()) if path.is_file() and not path.name.startswith(".")]


class LoadedOnUse:
    """One model of the evaluation, loaded when it first generates (a model whose every chunk is in the journal
    never loads): a torch module (`--backend hf`) or a vLLM engine (`--backend vllm`)."""

    def __init__(self, source: ModelSource, settings: EvalSettings, device: torch.device, stop_ids: list[int],
                 trust_remote_code: bool) -> None:
        self.source, self.settings, self.device = source, settings, device
        self.stop_ids, self.trust_remote_code = stop_ids, trust_remote_code
        self.loaded: Generator | None = None
        self.load_s = 0.0  # seconds spent loading (a vLLM engine's start-up included), kept out of `seconds`

    @property
    def generator(self) -> Generator:
        if self.loaded is None:
            began = time.perf_counter()
            self.loaded = self._load()
            self.load_s += time.perf_counter() - began
        return self.loaded

    def _load(self) -> Generator:
        source, settings = self.source, self.settings
        if settings.backend == "hf":
            return load_causal_lm(source.model, settings.dtype, self.device, trainable=False,
                                  merge_adapter=source.adapter, trust_remote_code=self.trust_remote_code)
        from tropd_cli.engine.rollout.vllm import VLLMRolloutBackend
        from tropd_cli.engine.vllm_engine import EngineOptions

        rank = None
        if source.adapter:  # the largest rank of the adapter, per-module ranks included
            adapter = json.loads((Path(source.adapter) / "adapter_config.json").read_text())
            rank = max([adapter["r"], *(adapter.get("rank_pattern") or {}).values()])
        options = EngineOptions(dtype=settings.dtype, seed=settings.seed, sleep=False, lora_rank=rank,
                                gpu_memory_utilization=0.85 if self.device.type == "cuda" else 0.3,
                                trust_remote_code=self.trust_remote_code)
        return VLLMRolloutBackend(resolve_model_path(source.model), None, self.stop_ids, options,
                                  adapter_path=source.adapter, setting="--backend vllm")

    def free(self) -> None:
        """Let go of the model before the next one loads."""
        if self.loaded is not None and not isinstance(self.loaded, torch.nn.Module):
            self.loaded.shut_down()
        self.loaded = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


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


def run_benchmark(model: LoadedOnUse, tokenizer: PreTrainedTokenizerBase, problem_set: ProblemSet,
                  settings: EvalSettings, progress: Progress, label: str, journal: Journal) -> BenchmarkRun:
    """Generate (or take from the journal), grade and summarise one model's answers to one benchmark's problems; a
    response ends at any of the model's stop ids (the tokenizer's EOS and the model's generation-config EOS ids,
    as in `distill`)."""
    problems = problem_set.problems
    benchmark = problem_set.benchmark
    max_new_tokens = settings.max_new_tokens or benchmark.max_new_tokens
    prompts = [prompt_ids(tokenizer, problem, settings.thinking) for problem in problems]
    run = BenchmarkRun()
    started, loading = time.perf_counter(), model.load_s
    response_tokens = truncated = timeouts = 0
    for decoding in decoding_passes(settings, max_new_tokens):
        task = progress.add_task(f"{label} · {benchmark.name} · {decoding.name}", total=len(problems))
        chunk = max(1, settings.batch_size // decoding.n)
        texts: list[str] = []
        finished: list[bool] = []
        for index, start in enumerate(range(0, len(problems), chunk)):
            key = (label, benchmark.name, decoding.name, index)
            done = journal.get(key)
            if done is None:
                rollouts, chunk_texts = generate_texts(model.generator, tokenizer, prompts[start:start + chunk],
                                                       decoding.n, decoding.params, settings.seed + index,
                                                       settings.batch_size, model.stop_ids)
                done = Chunk(chunk_texts, rollouts.finished, sum(len(ids) for ids in rollouts.response_ids))
                journal.add(key, done)
            texts += done.texts
            finished += done.finished
            response_tokens += done.tokens
            progress.advance(task, len(prompts[start:start + chunk]))
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
        "seconds": round(time.perf_counter() - started - (model.load_s - loading), 2),  # loading left out
    })
    return run
