"""`tropd distill`: load the pair, evaluate, run the loop, checkpoint, save the run folder.

The run folder holds config.yaml (resolved configuration), metrics.jsonl (one line per step; steps with
an evaluation carry `eval_accuracy`), checkpoints/ (resumable, see `checkpoints.py`), student/ (the final
student in save_pretrained format with its tokenizer: the whole model, or only the peft adapter when
student.lora is enabled) and summary.json (accuracies before and after, the teacher's, how the run ended,
and the student's base model and format). The first Ctrl-C finishes the step in progress and saves a
checkpoint; a second one stops at once, still saving the student and the summary so far.
`tropd distill --resume RUN` continues from the newest checkpoint (or `--from-step N`), after checking its
files' sha256 and that only RESUMABLE_KEYS changed. The checks of `tropd doctor` run first. The layout is
`runfolder.RunFolder`'s; the folder is locked for the whole run and replaced only whole (`files.OwnedFolder`).

Under torchrun (`--nproc N`, or torchrun itself across nodes) every rank runs this same code: all of them
load the pair, train their share of each step and take part in gathering a sharded student's state, while
rank 0 alone claims and writes the run folder, prints and logs (`engine/distributed.py`). A resumed run
needs the world size it was trained with.
"""

from __future__ import annotations

import contextlib
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
    DamagedCheckpoint,
    config_sha256,
    load_checkpoint,
    random_states,
    restore_random_states,
    save_checkpoint,
    save_student,
)
from tropd_cli.config import RunConfig, dotted, load_config_file, to_yaml
from tropd_cli.engine import distributed
from tropd_cli.engine.rollout import student_eval_sampler
from tropd_cli.engine.run import teacher_loaded_here, wire
from tropd_cli.engine.strategy import SingleDevice
from tropd_cli.environment import describe
from tropd_cli.errors import Interrupted, TeacherUnavailable, TropdError, first_line
from tropd_cli.evaluation.heldout import HeldOut
from tropd_cli.export.card import student_card
from tropd_cli.files import OwnedFolder, atomic_folder, atomic_write_text, writing
from tropd_cli.models import pick_device
from tropd_cli.preflight import Preflight, check_before_distill
from tropd_cli.runfolder import RunFolder, RunSummary
from tropd_cli.telemetry import close_sinks, open_sinks, truncate_metrics

# Above this mean |log p_sampler - log p_student| per sampled token (nats) a run's sampler draws from another policy
# than the one it trains: a QLoRA student's vLLM engine (an unquantized base) measured 0.033 at the first step of
# the toy lab and more later, a float32 engine holding the trained weights 1e-6 (bench/qlora_vllm.py). 16-bit
# numerics alone put an engine near 1e-2 from its trainer, which is not worth a warning: hence 0.02.
SAMPLER_GAP_WARNING = 0.02


def sampler_gap_warning(record: dict, config: RunConfig) -> str | None:
    """The line a run prints (once) when its sampler's log-probs stray from the student's and nothing corrects it."""
    gap = record.get("sampler_logprob_gap")
    if gap is None or gap <= SAMPLER_GAP_WARNING or config.rollout.importance_correction != "none":
        return None
    why = " (a QLoRA student's vLLM engine runs the base unquantized)" if config.student.quantization != "none" else ""
    return (f"warning: sampler_logprob_gap {gap:.3f} at step {record['step']} is above {SAMPLER_GAP_WARNING} nats "
            f"per token: the rollouts come from another policy than the one trained{why}; "
            "rollout.importance_correction=tis corrects for it")


RESUMABLE_KEYS = ("train.steps", "train.checkpoint_every", "train.checkpoint_keep", "train.threads", "train.device",
                  "output.log_to", "output.wandb_project",
                  # a served teacher restarted elsewhere, or slower, is the same teacher
                  "teacher.url", "teacher.api_key_env", "teacher.timeout_s", "teacher.deadline_s", "teacher.retries",
                  "teacher.max_concurrency")


@dataclass
class RunResult:
    run_dir: Path
    summary: dict  # summary.json as written


def run_dir_for(config: RunConfig, preset: str, out: str | None) -> Path:
    """The run folder: --out if given, else output.dir with its placeholders filled."""
    template = out or config.output.dir
    return Path(template.format(preset=Path(preset).stem, objective=config.objective.name,
                                seed=config.train.seed))


def distill(config: RunConfig, preset: str, out: str | None = None, overwrite: bool = False,
            console: Console | None = None) -> RunResult:
    """Run a distillation described by `config` and write its run folder.

    A new or empty folder is written in place. With `overwrite`, a run folder tropd wrote is replaced only
    once the new run has finished: the new run trains in a temporary sibling `.NAME.new-*`, swapped in at
    the end; if it fails or is interrupted, the previous run stays untouched and the message names the
    sibling that holds the new one (resumable with `--resume`).
    """
    console = console or Console()
    if not distributed.is_writer():
        console = Console(quiet=True)
    preflight = check_before_distill(config, console)
    run_dir = run_dir_for(config, preset, out)
    if not distributed.is_writer():  # rank 0 claims, writes and replaces the folder
        summary = new_summary(config, preset)
        result = _train(config, RunFolder(run_dir), preflight, summary, console, checkpoint=None,
                        final=RunFolder(run_dir))
        return RunResult(run_dir, result.summary)
    with OwnedFolder(run_dir, "distill") as owned:
        owned.claim(overwrite)
        replacing = owned.needs_replacement
        if replacing:
            run = RunFolder(owned.begin_replacement())
        else:
            owned.create_in_place()
            run = RunFolder(run_dir)
        summary = new_summary(config, preset)
        try:
            write_config(run, config, preset)
            result = _train(config, run, preflight, summary, console, checkpoint=None, final=RunFolder(run_dir))
        except BaseException as error:
            if not replacing:
                raise
            if summary.steps_done == 0 and not run.list_checkpoints():
                owned.abandon_replacement()  # nothing trained: nothing worth keeping
                raise
            note = f"the new run stays in {run.path}; {run_dir} still holds the previous run"
            if isinstance(error, TropdError):
                raise type(error)(f"{error}; {note}") from None
            console.print(note, highlight=False, soft_wrap=True)
            raise
        if replacing:
            owned.commit_replacement()
    return RunResult(run_dir, result.summary)


def new_summary(config: RunConfig, preset: str) -> RunSummary:
    """The summary of a fresh run, before its first step."""
    return RunSummary(preset=preset, objective=config.objective.name, seed=config.train.seed,
                      steps=config.train.steps, student_base_model=config.student.model,
                      student_format="adapter" if config.student.lora.enabled else "full",
                      config_sha256=config_sha256(config.model_dump(mode="json")),
                      teacher_loaded_here=teacher_loaded_here(config))


def resume(run_dir: Path, overrides: list[str] | None = None, console: Console | None = None,
           from_step: int | None = None) -> RunResult:
    """Continue a run from its newest checkpoint (or the one of `from_step`) with its own config.yaml; only
    the keys in RESUMABLE_KEYS may differ from the configuration the run was started with (through
    `overrides`, such as more train.steps, or an edited config.yaml). The steps it redoes give the metrics an
    uninterrupted run would have given."""
    console = console or Console()
    if not distributed.is_writer():
        console = Console(quiet=True)
    run = RunFolder(run_dir)
    if not run.is_run():
        raise TropdError(f"{run_dir} is not a run folder (no config.yaml)")
    with OwnedFolder(run_dir, "distill --resume") as owned:
        if distributed.is_writer():  # the other ranks only read the folder rank 0 holds
            owned.lock_in_place()
        config = load_config_file(run.config, overrides)
        step, folder = _checkpoint_to_resume(run, from_step)
        state, trainer_state = _load_resumable(run, step, folder)
        _check_world_size(run_dir, trainer_state.get("world_size", 1))
        resolved = config.model_dump(mode="json")
        _check_unchanged(run_dir, state.get("config"), resolved)
        if step >= config.train.steps:
            raise TropdError(f"{run_dir} already ran {step} steps and train.steps is {config.train.steps}; to "
                             f"train on, pass --set train.steps=N with N above {step}")
        preflight = check_before_distill(config, console)
        summary = RunSummary.from_json(state["summary"])
        summary.steps, summary.status, summary.error = config.train.steps, "running", None
        summary.config_sha256 = config_sha256(resolved)
        summary.teacher_loaded_here = teacher_loaded_here(config)  # teacher.url may now name a server
        summary.resumed_from = [*summary.resumed_from, step]
        write_config(run, config, summary.preset)
        newer = [later for later, _ in run.list_checkpoints() if later > step]
        if newer:
            console.print(f"resuming from step {step} on purpose; the checkpoints of steps "
                          f"{', '.join(map(str, newer))} are replaced as the run passes them", highlight=False)
        console.print(f"resuming {run_dir} from step {step} of {config.train.steps}", highlight=False)
        result = _train(config, run, preflight, summary, console, checkpoint=(folder, trainer_state), final=run)
    return RunResult(run_dir, result.summary)


def _check_world_size(run_dir: Path, trained_on: int) -> None:
    """A run resumes on the number of processes it was trained with (sharded optimizer states and the
    ranks' shares of each step depend on it)."""
    running = distributed.world_size()
    if trained_on != running:
        how = f"with --nproc {trained_on}" if trained_on > 1 else "in one process (without --nproc)"
        raise TropdError(f"{run_dir} was trained on {trained_on} process{'es' if trained_on > 1 else ''} and "
                         f"this resume runs {running}; resume it {how}")


def _checkpoint_to_resume(run: RunFolder, from_step: int | None) -> tuple[int, Path]:
    found = run.list_checkpoints()
    if not found:
        raise TropdError(f"{run.path} has no checkpoint to resume from (nothing in {run.checkpoints})")
    if from_step is None:
        return found[-1]
    for step, folder in found:
        if step == from_step:
            return step, folder
    raise TropdError(f"{run.path} has no checkpoint at step {from_step}; saved: {', '.join(str(s) for s, _ in found)}")


def _load_resumable(run: RunFolder, step: int, folder: Path) -> tuple[dict, dict]:
    """The checkpoint's state and trainer state; a damaged one names the older checkpoints there are."""
    try:
        return load_checkpoint(folder)
    except DamagedCheckpoint as error:
        older = [str(s) for s, _ in run.list_checkpoints() if s < step]
        hint = (f"to resume from an older checkpoint on purpose, pass --from-step {older[-1]} (saved: "
                f"{', '.join(older)})" if older else "no older checkpoint is saved")
        raise DamagedCheckpoint(f"{error}; {hint}") from None


def _check_unchanged(run_dir: Path, recorded: dict | None, resolved: dict) -> None:
    """Only RESUMABLE_KEYS may differ from the configuration the checkpoint was trained with."""
    if not isinstance(recorded, dict) or config_sha256(recorded) == config_sha256(resolved):
        return
    before, after = dotted(recorded), dotted(resolved)
    changed = [key for key in sorted(before.keys() | after.keys())
               if before.get(key) != after.get(key) and key not in RESUMABLE_KEYS]
    if changed:
        shown = ", ".join(f"{key} ({_short(before.get(key))} -> {_short(after.get(key))})" for key in changed)
        raise TropdError(f"cannot resume {run_dir}: {shown} differ from the run's configuration; --resume may "
                         f"change only {', '.join(RESUMABLE_KEYS)}; start a new run for the rest")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def write_config(run: RunFolder, config: RunConfig, preset: str) -> None:
    if not distributed.is_writer():
        return
    with writing(str(run.config)):
        atomic_write_text(run.config, f"# tropd {__version__}, preset {preset}\n" + to_yaml(config))


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


def _train(config: RunConfig, run: RunFolder, preflight: Preflight, summary: RunSummary, console: Console,
           checkpoint: tuple[Path, dict] | None, final: RunFolder) -> RunResult:
    """Load the pair, evaluate before (fresh runs), train from the checkpoint's step to train.steps with
    periodic checkpoints, evaluate after, and save the student and summary. `checkpoint` is a checkpoint
    folder and its loaded trainer state; `final` is where the run folder ends up (`run` itself, or the
    folder it replaces at the end)."""
    started = time.perf_counter() - summary.train_seconds
    try:
        device = distributed.rank_device(pick_device(config.train.device))
        with distributed.process_group(device):
            loop = DistillLoop(config, run, preflight, summary, console, final, started, device)
            loop.set_up(checkpoint)
            try:
                loop.evaluate_before()
                loop.train()
                return loop.finish()
            finally:
                loop.wired.backend.close()  # after the last evaluation, which a vLLM engine may sample
    except BaseException as error:
        _record_end(run, summary, error, started)
        raise


class DistillLoop:
    """One process's part of a run, read top to bottom: `set_up` (seeds, the wired parts, a checkpoint's
    state), `evaluate_before`, `train` (steps, checkpoints, stops), `finish` (evaluate after, save)."""

    def __init__(self, config: RunConfig, run: RunFolder, preflight: Preflight, summary: RunSummary,
                 console: Console, final: RunFolder, started: float, device: torch.device) -> None:
        self.config, self.run, self.preflight, self.summary = config, run, preflight, summary
        self.console, self.final, self.started, self.device = console, final, started, device
        self.fresh = True
        self.gap_warned = False  # the sampler-gap warning is printed once a run

    def set_up(self, checkpoint: tuple[Path, dict] | None) -> None:
        config, run, console = self.config, self.run, self.console
        _write_summary(run, self.summary, self.started)  # status running, from the first moment
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        if distributed.is_writer():
            with writing(str(run.env)):
                run.record_environment(describe(self.device))
        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        np.random.seed(config.train.seed % 2**32)
        for section in (config.teacher, config.student):
            if section.trust_remote_code:
                console.print(f"[yellow]trust_remote_code is on:[/] {section.model} runs its own Python code",
                              highlight=False, soft_wrap=True)
        self.held_out = HeldOut(config, self.preflight.student_tokenizer, self.preflight.stop_ids)
        if self.held_out.enabled:
            self.summary.held_out = {**self.held_out.protocol(), "student_sampler": self.student_sampler}
        folder, trainer_state = checkpoint if checkpoint is not None else (None, None)
        start_step = trainer_state["step"] if trainer_state is not None else 0
        self.wired = wire(config, self.preflight, self.device, folder, start_step)
        self.trainer, self.strategy = self.wired.trainer, self.wired.strategy
        self.student = self.trainer.models.student
        if trainer_state is not None:
            self.fresh = False
            self.trainer.load_state_dict(trainer_state)
            restore_random_states(trainer_state["random"])
            if distributed.is_writer():
                truncate_metrics(run.metrics, start_step)

    @property
    def student_sampler(self) -> str:
        """What samples the student's held-out answers (`student_eval_sampler`): its vLLM engine or HF generate."""
        return student_eval_sampler(self.config)

    def measure(self) -> dict[str, float]:
        """The student's held-out metrics, sampled by the run's rollout backend (a vLLM engine holds the weights of
        the last update; not a QLoRA student's, whose engine runs the unquantized base); every rank evaluates, a
        sharded model generates whole."""
        if self.student_sampler == "vllm":
            return self.held_out.measure(self.wired.backend)
        with self.strategy.gathered():
            return self.held_out.measure(self.student)

    def served_teacher_accuracy(self) -> float:
        """The teacher's held-out accuracy, sampled by its vLLM engine or its server. A server is asked once, by the
        first rank, whose number every rank takes; a failure there stops every rank (`from_teacher`)."""
        asks = distributed.is_writer() or self.config.teacher.backend != "server"
        accuracy = self.trainer.from_teacher(
            lambda: self.held_out.accuracy(self.wired.teacher_sampler) if asks else None)
        return self.strategy.gather_objects(accuracy)[0]

    def evaluate_before(self) -> None:
        """The teacher's and the student's accuracy before the first step (fresh runs only)."""
        summary = self.summary
        if not (self.fresh and self.held_out.enabled):
            return
        teacher = self.trainer.models.teacher
        with self.console.status("evaluating before training"):
            if self.config.eval.teacher and teacher is not None:
                with self.wired.teacher_gathered():
                    summary.teacher_accuracy = self.held_out.accuracy(teacher)
            elif self.config.eval.teacher:  # sampled where the teacher is: its vLLM engine or its server
                summary.teacher_accuracy = self.served_teacher_accuracy()
            summary.student_eval_before = self.measure()
            summary.student_accuracy_before = summary.student_eval_before["accuracy"]

    def train(self) -> None:
        """Steps up to train.steps: telemetry, periodic evaluation and checkpoints; a Ctrl-C checkpoints the
        step it finishes (a second one stops at once); a served teacher's failure checkpoints the last step."""
        config, trainer, summary = self.config, self.trainer, self.summary
        progress = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=self.console)
        sinks = open_sinks(config, self.run, trainer.step, summary) if distributed.is_writer() else []
        stop = StopAfterStep(self.console)
        try:
            with progress, stop:
                task = progress.add_task("distill", total=config.train.steps, completed=trainer.step, info="")
                while trainer.step < config.train.steps:
                    record = self.step()
                    for sink in sinks:
                        sink.log(record)
                    summary.steps_done = record["step"]
                    progress.update(task, advance=1, info=f"loss {record['loss']:+.4f} "
                                    f"trust {record.get('trust_fraction', float('nan')):.3f} "
                                    f"len {record['response_length']:.1f}")
                    every = config.train.checkpoint_every
                    stop.requested = self.strategy.any(stop.requested)  # every rank stops after the same step
                    if stop.requested or trainer.step == config.train.steps or (every and trainer.step % every == 0):
                        saved = self.save_checkpoint()
                    if stop.requested:
                        summary.status = "interrupted"
                        self.save_student()
                        _write_summary(self.run, summary, self.started)
                        raise Interrupted(f"stopped after step {trainer.step}; checkpoint saved in {saved}; "
                                          f"continue with: tropd distill --resume {self.run.path}"
                                          f"{_nproc_flag(self.strategy)}")
        except KeyboardInterrupt:
            summary.status = "interrupted"
            self.save_student(gather=False)
            _write_summary(self.run, summary, self.started)
            saved = "metrics" if self.strategy.sharded else "student and metrics"  # a sharded student needs every rank
            raise Interrupted(f"interrupted during step {trainer.step + 1}; {saved} saved in "
                              f"{self.run.path}; {self._newest_checkpoint()}") from None
        finally:
            close_sinks(sinks)

    def step(self) -> dict[str, float]:
        """One training step's record, with the held-out metrics on evaluation steps; one line when the step
        diverged or the served teacher went away."""
        config, trainer = self.config, self.trainer
        step_random = random_states()  # what a failed step's checkpoint resumes with (dropout's stream)
        try:
            record = trainer.train_step()
        except TeacherUnavailable as error:
            raise self.teacher_gone(error, step_random) from None
        warning = None if self.gap_warned else sampler_gap_warning(record, config)
        if warning is not None and distributed.is_writer():
            self.console.print(warning, style="yellow", highlight=False, soft_wrap=True)
        self.gap_warned = self.gap_warned or warning is not None
        diverged = non_finite(record, self.student, self.strategy)
        if diverged:
            raise TropdError(f"training diverged at step {record['step']}: {diverged}; the run "
                             f"stopped; lower train.lr (now {config.train.lr:g}) and start again")
        if config.eval.every and record["step"] % config.eval.every == 0 and self.held_out.enabled:
            record.update({f"eval_{name}": value for name, value in self.measure().items()})
            self.summary.eval_accuracy_by_step = {**(self.summary.eval_accuracy_by_step or {}),
                                                  str(record["step"]): record["eval_accuracy"]}
        return record

    def save_checkpoint(self, random: dict | None = None) -> Path:
        """A checkpoint of the last completed step (every rank takes part: a sharded state is gathered to rank 0);
        `random` replaces the random states it resumes with."""
        self.summary.train_seconds = round(time.perf_counter() - self.started, 2)
        trainer_state = self.trainer.state_dict()
        weights = self.strategy.model_state_dict()
        if not distributed.is_writer():
            return self.run.checkpoint(self.trainer.step)
        return save_checkpoint(self.run.path, self.trainer.step, self.student, self.preflight.student_tokenizer,
                               trainer_state, self.summary, self.config.train.checkpoint_keep,
                               self.config.model_dump(mode="json"), weights, random)

    def teacher_gone(self, error: TeacherUnavailable, step_random: dict) -> TropdError:
        """The line a run stops with when its served teacher goes away during a step: before the step's first
        update, the last completed step is checkpointed with the random states it ended with,
        so that a resume redoes the failed step exactly. Every rank comes here together (the trainer agrees on a
        teacher's failure before any collective) and takes part in the checkpoint."""
        trainer = self.trainer
        how = f"tropd distill --resume {self.run.path}{_nproc_flag(self.strategy)} --set teacher.url=URL"
        if trainer.step == 0 or trainer.updates_in_step:
            return TropdError(f"{error}; the run stopped during step {trainer.step + 1} "
                              f"({self._newest_checkpoint()}); go on with: {how}")
        self.student.zero_grad(set_to_none=True)
        saved = self.save_checkpoint(step_random)
        return TropdError(f"{error}; the run stopped after step {trainer.step} with a checkpoint in {saved}; "
                          f"go on with: {how}")

    def _newest_checkpoint(self) -> str:
        newest = self.run.list_checkpoints()
        return f"the newest checkpoint is step {newest[-1][0]}" if newest else "no checkpoint was written yet"

    def save_student(self, gather: bool = True) -> None:
        _save_student(self.run, self.student, self.preflight.student_tokenizer, self.summary, self.final,
                      self.config, self.strategy, gather=gather)

    def finish(self) -> RunResult:
        """Evaluate after training, save the student (output.save_model) and the finished summary."""
        summary = self.summary
        with self.console.status("evaluating after training"):
            if self.held_out.enabled:
                summary.student_eval_after = self.measure()
                summary.student_accuracy_after = summary.student_eval_after["accuracy"]
        if self.config.output.save_model:
            self.save_student()
        summary.status = "finished"
        _write_summary(self.run, summary, self.started)
        print_summary(self.console, self.final.path, summary)
        return RunResult(self.final.path, summary.to_json())


def _nproc_flag(strategy: SingleDevice) -> str:
    """The `--nproc N` a resume of this run needs (nothing on one process)."""
    return f" --nproc {strategy.world_size}" if strategy.world_size > 1 else ""


def non_finite(record: dict[str, float], student: torch.nn.Module, strategy: SingleDevice | None = None
               ) -> str | None:
    """What went non-finite in a step, if anything: the loss, the gradient norm, or the updated weights (on
    any rank: each checks the weights it holds)."""
    for name in ("loss", "grad_norm"):
        if not math.isfinite(record[name]):
            return f"{name.replace('_', ' ')} is {record[name]}"
    sums = [_local(parameter.detach()).sum().float() for parameter in student.parameters()
            if parameter.requires_grad]
    finite = not sums or bool(torch.isfinite(torch.stack(sums)).all())
    if strategy is not None:
        finite = not strategy.any(not finite)
    return None if finite else "the updated weights are not finite"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor, or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _save_student(run: RunFolder, student: torch.nn.Module, tokenizer, summary: RunSummary,
                  final: RunFolder, config: RunConfig, strategy: SingleDevice | None = None,
                  gather: bool = True) -> None:
    """The student with its tokenizer and a model card of the run (not peft's placeholder), on rank 0; a
    sharded student is first gathered from every rank, which a second Ctrl-C, `gather=False`, cannot wait
    for: then only the checkpoints hold it."""
    weights = None
    if strategy is not None and strategy.sharded:
        if not gather:
            return
        weights = strategy.model_state_dict()
    if not distributed.is_writer():
        return

    def fill(folder: Path) -> None:
        save_student(folder, student, tokenizer, weights)
        atomic_write_text(folder / "README.md", student_card(config, summary.to_json(), final.path))

    with writing(f"the student {run.student}"):
        atomic_folder(run.student, fill)
    summary.student_path = str(final.student)


def _write_summary(run: RunFolder, summary: RunSummary, started: float) -> None:
    if not distributed.is_writer():
        return
    summary.train_seconds = round(time.perf_counter() - started, 2)
    with writing(str(run.summary)):
        run.write_summary(summary)


def _record_end(run: RunFolder, summary: RunSummary, error: BaseException, started: float) -> None:
    """summary.json after a stop: interrupted, or failed with the error's line; a second failure while
    writing it (the disk that broke the run) must not hide the first."""
    if isinstance(error, (KeyboardInterrupt, Interrupted)):
        summary.status = "interrupted"
    else:
        summary.status = "failed"
        summary.error = str(error) if isinstance(error, TropdError) else f"{type(error).__name__}: {first_line(error)}"
    with contextlib.suppress(Exception):
        _write_summary(run, summary, started)


def print_summary(console: Console, run_dir: Path, summary: RunSummary) -> None:
    """The held-out accuracies of the teacher and of the student before and after."""
    table = Table(title=f"held-out accuracy, {summary.objective} seed {summary.seed}")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for label, key in (("teacher", "teacher_accuracy"), ("student before", "student_accuracy_before"),
                       ("student after", "student_accuracy_after")):
        value = getattr(summary, key)
        if value is not None:
            table.add_row(label, f"{100 * value:.1f}%")
    if summary.student_accuracy_before is not None and summary.student_accuracy_after is not None:
        gain = 100 * (summary.student_accuracy_after - summary.student_accuracy_before)
        table.add_row("gain", f"{gain:+.1f} points")
    console.print(table)
    console.print(f"run folder: {run_dir}  ({summary.steps_done} steps in {summary.train_seconds:.0f}s)")
