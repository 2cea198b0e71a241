"""`tropd distill`: load the pair, evaluate, run the loop, checkpoint, save the run folder.

The run folder holds config.yaml (resolved configuration), metrics.jsonl (one line per step; steps with
an evaluation carry `eval_accuracy`), checkpoints/ (resumable, see `checkpoints.py`), student/ (the final
student in save_pretrained format with its tokenizer: the whole model, or only the peft adapter when
student.lora is enabled) and summary.json (accuracies before and after, the teacher's, how the run ended,
and the student's base model and format). The first Ctrl-C finishes the step in progress and saves a
checkpoint; a second one stops at once, still saving the student and the summary so far.
`tropd distill --resume RUN` continues from the newest checkpoint. The checks of `tropd doctor` run first.
"""

from __future__ import annotations

import math
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
from tropd_cli.checkpoints import (
    CHECKPOINTS,
    list_checkpoints,
    load_checkpoint,
    restore_adapter,
    restore_random_states,
    save_checkpoint,
    save_student,
)
from tropd_cli.config import RunConfig, load_config_file, to_yaml
from tropd_cli.data.sources import prompt_batches, teacher_response_source
from tropd_cli.engine.precision import autocast_dtype
from tropd_cli.engine.rollout import HFGenerateBackend, make_rollout_backend, student_engine_options
from tropd_cli.engine.trainer import Models, Trainer
from tropd_cli.errors import Interrupted, TropdError
from tropd_cli.files import atomic_folder, atomic_write_json, atomic_write_text, prepare_output_dir
from tropd_cli.models import LoraSpec, load_causal_lm, pick_device, resolve_model_path
from tropd_cli.preflight import Preflight, check_before_distill
from tropd_cli.telemetry import close_sinks, open_sinks, truncate_metrics
from tropd_cli.toylab.accuracy import toy_accuracy
from tropd_cli.toylab.tasks import sample_problems


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
    preflight = check_before_distill(config, console)
    run_dir = run_dir_for(config, preset, out)
    prepare_output_dir(run_dir, overwrite)
    write_config(run_dir, config, preset)
    summary: dict = {"preset": preset, "objective": config.objective.name, "seed": config.train.seed,
                     "steps_done": 0, "steps": config.train.steps, "status": "running",
                     "student_base_model": config.student.model,
                     "student_format": "adapter" if config.student.lora.enabled else "full"}
    return _train(config, run_dir, preflight, summary, console, checkpoint=None)


def resume(run_dir: Path, overrides: list[str] | None = None, console: Console | None = None) -> RunResult:
    """Continue a run from its newest checkpoint with its own config.yaml (plus `overrides`, such as more
    train.steps); the steps it redoes give the metrics an uninterrupted run would have given."""
    console = console or Console()
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise TropdError(f"{run_dir} is not a run folder (no config.yaml)")
    config = load_config_file(config_path, overrides)
    found = list_checkpoints(run_dir)
    if not found:
        raise TropdError(f"{run_dir} has no checkpoint to resume from (nothing in {run_dir / CHECKPOINTS})")
    step, folder = found[-1]
    if step >= config.train.steps:
        raise TropdError(f"{run_dir} already ran its {config.train.steps} steps; to train on, raise them "
                         f"with --set train.steps=N")
    state, trainer_state = load_checkpoint(folder)
    preflight = check_before_distill(config, console)
    summary = {**state["summary"], "steps": config.train.steps, "status": "running"}
    summary["resumed_from"] = [*summary.get("resumed_from", []), step]
    if overrides:
        write_config(run_dir, config, summary["preset"])
    console.print(f"resuming {run_dir} from step {step} of {config.train.steps}", highlight=False)
    return _train(config, run_dir, preflight, summary, console, checkpoint=(folder, trainer_state))


def write_config(run_dir: Path, config: RunConfig, preset: str) -> None:
    atomic_write_text(run_dir / "config.yaml", f"# tropd {__version__}, preset {preset}\n" + to_yaml(config))


def load_models(config: RunConfig, device: torch.device, checkpoint: Path | None
                ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The frozen teacher and the trainable student, the student's weights from `checkpoint` if given."""
    teacher = load_causal_lm(config.teacher.model, config.teacher.dtype, device,
                             quantization=config.teacher.quantization, trainable=False,
                             trust_remote_code=config.teacher.trust_remote_code)
    lora = student_lora(config)
    saved_full_model = checkpoint is not None and lora is None
    student = load_causal_lm(str(checkpoint / "student") if saved_full_model else config.student.model,
                             config.student.dtype, device, quantization=config.student.quantization, lora=lora,
                             trainable=True, trust_remote_code=config.student.trust_remote_code)
    if checkpoint is not None and lora is not None:
        restore_adapter(student, checkpoint / "student")
    return teacher, student


class StopAfterStep:
    """Ctrl-C once: finish the step in progress, checkpoint, stop. Ctrl-C twice: stop at once."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.requested = False
        self.previous = None

    def __enter__(self) -> StopAfterStep:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print("[yellow]Ctrl-C: stopping after this step with a checkpoint "
                           "(Ctrl-C again to stop now)[/]")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _train(config: RunConfig, run_dir: Path, preflight: Preflight, summary: dict, console: Console,
           checkpoint: tuple[Path, dict] | None) -> RunResult:
    """Load the pair, evaluate before (fresh runs), train from the checkpoint's step to train.steps with
    periodic checkpoints, evaluate after, and save the student and summary. `checkpoint` is a checkpoint
    folder and its loaded trainer state."""
    tokenizer = preflight.student_tokenizer
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    np.random.seed(config.train.seed % 2**32)
    for section in (config.teacher, config.student):
        if section.trust_remote_code:
            console.print(f"[yellow]trust_remote_code is on:[/] {section.model} runs its own Python code",
                          highlight=False, soft_wrap=True)

    device = pick_device(config.train.device)
    folder, trainer_state = checkpoint if checkpoint is not None else (None, None)
    teacher, student = load_models(config, device, folder)
    mixed = autocast_dtype(config.train.autocast, device)
    backend = make_rollout_backend(config.rollout.backend, student, tokenizer.pad_token_id, preflight.stop_ids,
                                   config.rollout.batch_size, autocast=mixed,
                                   model_path=resolve_model_path(config.student.model),
                                   options=student_engine_options(config), adapter=config.student.lora.enabled)
    teacher_backend = HFGenerateBackend(teacher, tokenizer.pad_token_id, preflight.stop_ids,
                                        config.rollout.batch_size, autocast=mixed)
    start_step = trainer_state["step"] if trainer_state is not None else 0
    trainer = Trainer(config, Models(teacher, student, tokenizer.pad_token_id, device), backend,
                      prompt_batches(config, tokenizer, start_step, preflight.prepared),
                      teacher_backend=teacher_backend,
                      teacher_responses=teacher_response_source(config, teacher_backend, preflight.prepared))
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)
        restore_random_states(trainer_state["random"])
        truncate_metrics(run_dir / "metrics.jsonl", start_step)

    held_out = sample_problems(config.eval.seed, config.eval.problems, config.data.toylab, held_out=True)

    def accuracy(model: torch.nn.Module) -> float:
        return toy_accuracy(model, tokenizer, held_out, k=config.eval.k, temperature=config.eval.temperature,
                            max_new_tokens=config.rollout.max_new_tokens, seed=config.eval.seed,
                            batch_size=config.rollout.batch_size).accuracy

    def save_checkpoint_now() -> Path:
        return save_checkpoint(run_dir, trainer.step, student, tokenizer, trainer.state_dict(), summary,
                               config.train.checkpoint_keep)

    if checkpoint is None and config.eval.problems:
        with console.status("evaluating before training"):
            if config.eval.teacher:
                summary["teacher_accuracy"] = accuracy(teacher)
            summary["student_accuracy_before"] = accuracy(student)
    started = time.perf_counter() - summary.get("train_seconds", 0.0)
    progress = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console)
    sinks = open_sinks(config, run_dir, start_step, summary)
    stop = StopAfterStep(console)
    try:
        with progress, stop:
            task = progress.add_task("distill", total=config.train.steps, completed=start_step, info="")
            while trainer.step < config.train.steps:
                record = trainer.train_step()
                if not all(map(math.isfinite, (record["loss"], record["grad_norm"]))):
                    raise TropdError(f"non-finite loss or gradient at step {record['step']} "
                                     f"(loss {record['loss']}, grad norm {record['grad_norm']}); "
                                     f"lower train.lr or check the teacher")
                if config.eval.every and record["step"] % config.eval.every == 0 and config.eval.problems:
                    record["eval_accuracy"] = accuracy(student)
                for sink in sinks:
                    sink.log(record)
                summary["steps_done"] = record["step"]
                progress.update(task, advance=1, info=f"loss {record['loss']:+.4f} "
                                f"trust {record.get('trust_fraction', float('nan')):.3f} "
                                f"len {record['response_length']:.1f}")
                every = config.train.checkpoint_every
                if stop.requested or trainer.step == config.train.steps or (every and trainer.step % every == 0):
                    summary["train_seconds"] = round(time.perf_counter() - started, 2)
                    saved = save_checkpoint_now()
                if stop.requested:
                    summary["status"] = "interrupted"
                    _save(run_dir, student, tokenizer, summary, started)
                    raise Interrupted(f"stopped after step {trainer.step}; checkpoint saved in {saved}; "
                                      f"continue with: tropd distill --resume {run_dir}")
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        _save(run_dir, student, tokenizer, summary, started)
        newest = list_checkpoints(run_dir)
        where = f"the newest checkpoint is step {newest[-1][0]}" if newest else "no checkpoint was written yet"
        raise Interrupted(f"interrupted during step {trainer.step + 1}; student and metrics saved in "
                          f"{run_dir}; {where}") from None
    except Interrupted:
        raise
    except BaseException:
        summary["status"] = "failed"
        _save(run_dir, student, tokenizer, summary, started)
        raise
    finally:
        close_sinks(sinks)
    with console.status("evaluating after training"):
        if config.eval.problems:
            summary["student_accuracy_after"] = accuracy(student)
    summary["status"] = "finished"
    _save(run_dir, student if config.output.save_model else None, tokenizer, summary, started)
    print_summary(console, run_dir, summary)
    return RunResult(run_dir, summary)


def _save(run_dir: Path, student: torch.nn.Module | None, tokenizer, summary: dict, started: float) -> None:
    summary["train_seconds"] = round(time.perf_counter() - started, 2)
    if student is not None:
        atomic_folder(run_dir / "student", lambda folder: save_student(folder, student, tokenizer))
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
