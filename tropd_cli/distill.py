"""`tropd distill`: load the pair, evaluate, run the loop, save the run folder.

The run folder holds config.yaml (resolved configuration), metrics.jsonl (one line per step, plus
`eval` lines), student/ (the final student in save_pretrained format with its tokenizer: the whole model,
or only the peft adapter when student.lora is enabled) and summary.json (accuracies before and after, the
teacher's, how the run ended, and the student's base model and format). Ctrl-C saves the current student
and the summary so far before stopping. The preflight checks of `tropd doctor` run first.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tropd_cli import __version__
from tropd_cli.config import RunConfig, to_yaml
from tropd_cli.data.sources import prompt_batches, teacher_response_source
from tropd_cli.engine.rollout import HFGenerateBackend
from tropd_cli.engine.trainer import Models, Trainer
from tropd_cli.errors import TropdError
from tropd_cli.files import atomic_folder, atomic_write_json, atomic_write_text, prepare_output_dir
from tropd_cli.models import LoraSpec, load_causal_lm, pick_device
from tropd_cli.preflight import check_before_distill
from tropd_cli.toylab.accuracy import toy_accuracy
from tropd_cli.toylab.tasks import sample_problems


class Interrupted(TropdError):
    """Ctrl-C during a run: the student and metrics so far were saved."""


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


def run_dir_for(config: RunConfig, preset: str, out: str | None) -> Path:
    """The run folder: --out if given, else output.dir with its placeholders filled."""
    template = out or config.output.dir
    return Path(template.format(preset=Path(preset).stem, objective=config.objective.name,
                                seed=config.train.seed))


def student_lora(config: RunConfig) -> LoraSpec | None:
    """The student's LoRA adapter settings, or None when every weight trains."""
    lora = config.student.lora
    if not lora.enabled:
        return None
    return LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)


def distill(config: RunConfig, preset: str, out: str | None = None, overwrite: bool = False,
            console: Console | None = None) -> RunResult:
    """Run a distillation described by `config` and write its run folder."""
    console = console or Console()
    tokenizer = check_before_distill(config, console).student_tokenizer
    run_dir = run_dir_for(config, preset, out)
    prepare_output_dir(run_dir, overwrite)
    atomic_write_text(run_dir / "config.yaml", f"# tropd {__version__}, preset {preset}\n" + to_yaml(config))
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)

    device = pick_device(config.train.device)
    teacher = load_causal_lm(config.teacher.model, config.teacher.dtype, device,
                             quantization=config.teacher.quantization, trainable=False)
    student = load_causal_lm(config.student.model, config.student.dtype, device,
                             quantization=config.student.quantization, lora=student_lora(config), trainable=True)
    eos_ids = [tokenizer.eos_token_id]
    backend = HFGenerateBackend(student, tokenizer.pad_token_id, eos_ids, config.rollout.batch_size)
    teacher_backend = HFGenerateBackend(teacher, tokenizer.pad_token_id, eos_ids, config.rollout.batch_size)
    trainer = Trainer(config, Models(teacher, student, tokenizer.pad_token_id, device), backend,
                      prompt_batches(config, tokenizer), teacher_backend=teacher_backend,
                      teacher_responses=teacher_response_source(config, teacher_backend))

    held_out = sample_problems(config.eval.seed, config.eval.problems, config.data.toylab, held_out=True)

    def accuracy(model: torch.nn.Module) -> float:
        return toy_accuracy(model, tokenizer, held_out, k=config.eval.k, temperature=config.eval.temperature,
                            max_new_tokens=config.rollout.max_new_tokens, seed=config.eval.seed,
                            batch_size=config.rollout.batch_size).accuracy

    summary: dict = {"preset": preset, "objective": config.objective.name, "seed": config.train.seed,
                     "steps_done": 0, "steps": config.train.steps, "status": "running",
                     "student_base_model": config.student.model,
                     "student_format": "adapter" if config.student.lora.enabled else "full"}
    metrics_path = run_dir / "metrics.jsonl"
    with console.status("evaluating before training"):
        if config.eval.problems:
            if config.eval.teacher:
                summary["teacher_accuracy"] = accuracy(teacher)
            summary["student_accuracy_before"] = accuracy(student)
    started = time.perf_counter()
    progress = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console)
    try:
        with metrics_path.open("a") as metrics_file, progress:
            task = progress.add_task("distill", total=config.train.steps, info="")
            for _ in range(config.train.steps):
                record = trainer.train_step()
                if not all(map(_finite, (record["loss"], record["grad_norm"]))):
                    raise TropdError(f"non-finite loss or gradient at step {record['step']} "
                                     f"(loss {record['loss']}, grad norm {record['grad_norm']}); "
                                     f"lower train.lr or check the teacher")
                if config.eval.every and record["step"] % config.eval.every == 0 and config.eval.problems:
                    record["eval_accuracy"] = accuracy(student)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                summary["steps_done"] = record["step"]
                progress.update(task, advance=1, info=f"loss {record['loss']:+.4f} "
                                f"trust {record.get('trust_fraction', float('nan')):.3f} "
                                f"len {record['response_length']:.1f}")
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        _save(run_dir, student, tokenizer, summary, started)
        raise Interrupted(f"interrupted at step {summary['steps_done']}; student and metrics saved in "
                          f"{run_dir}") from None
    except BaseException:
        summary["status"] = "failed"
        _save(run_dir, student, tokenizer, summary, started)
        raise
    with console.status("evaluating after training"):
        if config.eval.problems:
            summary["student_accuracy_after"] = accuracy(student)
    summary["status"] = "finished"
    _save(run_dir, student if config.output.save_model else None, tokenizer, summary, started)
    print_summary(console, run_dir, summary)
    return RunResult(run_dir, summary)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _save(run_dir: Path, student: torch.nn.Module | None, tokenizer, summary: dict, started: float) -> None:
    summary["train_seconds"] = round(time.perf_counter() - started, 2)
    if student is not None:
        def fill(folder: Path) -> None:
            student.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        atomic_folder(run_dir / "student", fill)
        summary["student_path"] = str(run_dir / "student")
    atomic_write_json(run_dir / "summary.json", summary)


def print_summary(console: Console, run_dir: Path, summary: dict) -> None:
    """The held-out accuracies of the teacher and of the student before and after."""
    table = Table(title=f"held-out accuracy, {summary['objective']} seed {summary['seed']}")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for label, key in (("teacher", "teacher_accuracy"), ("student before", "student_accuracy_before"),
                       ("student after", "student_accuracy_after")):
        if key in summary:
            table.add_row(label, f"{100 * summary[key]:.1f}%")
    if "student_accuracy_before" in summary and "student_accuracy_after" in summary:
        gain = 100 * (summary["student_accuracy_after"] - summary["student_accuracy_before"])
        table.add_row("gain", f"{gain:+.1f} points")
    console.print(table)
    console.print(f"run folder: {run_dir}  ({summary['steps_done']} steps in {summary['train_seconds']:.0f}s)")
