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
from collections.abc import Callable
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
    checkpoint_dir,
    config_sha256,
    list_checkpoints,
    load_checkpoint,
    random_states,
    restore_adapter,
    restore_random_states,
    save_checkpoint,
    save_student,
)
from tropd_cli.config import RunConfig, dotted, load_config_file, to_yaml
from tropd_cli.data.sources import prompt_batches, teacher_response_source
from tropd_cli.engine import distributed
from tropd_cli.engine.guidance import InRunTeacherResponses
from tropd_cli.engine.precision import autocast_dtype
from tropd_cli.engine.rollout import make_rollout_backend, student_engine_options
from tropd_cli.engine.scoring import chunk_positions, vocab_rows
from tropd_cli.engine.strategy import (
    GatheredBackend,
    GatheredResponses,
    ShardedTeacherScorer,
    SingleDevice,
    make_strategy,
)
from tropd_cli.engine.trainer import Models, Trainer
from tropd_cli.environment import describe
from tropd_cli.errors import Interrupted, TeacherUnavailable, TropdError, first_line
from tropd_cli.evaluation.heldout import HeldOut
from tropd_cli.export.card import student_card
from tropd_cli.files import OwnedFolder, atomic_folder, atomic_write_text, writing
from tropd_cli.models import LoraSpec, load_causal_lm, pick_device, resolve_model_path
from tropd_cli.preflight import Preflight, check_before_distill
from tropd_cli.runfolder import RunFolder, RunSummary
from tropd_cli.telemetry import close_sinks, open_sinks, truncate_metrics

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


def student_lora(config: RunConfig) -> LoraSpec | None:
    """The student's LoRA adapter settings, or None when every weight trains."""
    lora = config.student.lora
    if not lora.enabled:
        return None
    return LoraSpec(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)


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
            if summary.steps_done == 0 and not list_checkpoints(run.path):
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
                      config_sha256=config_sha256(config.model_dump(mode="json")))


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
        summary.resumed_from = [*summary.resumed_from, step]
        write_config(run, config, summary.preset)
        newer = [later for later, _ in list_checkpoints(run_dir) if later > step]
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
    found = list_checkpoints(run.path)
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
        older = [str(s) for s, _ in list_checkpoints(run.path) if s < step]
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


def sharded_teacher(config: RunConfig, teacher: torch.nn.Module, device: torch.device
                    ) -> tuple[ShardedTeacherScorer | None, Callable[[], contextlib.AbstractContextManager]]:
    """With teacher.shard under torchrun: the teacher's scorer with its weights split over the ranks, and
    the context in which it runs whole (to generate); else (None: the teacher's own forward, no context)."""
    if not (config.teacher.shard and distributed.launched()):
        return None, contextlib.nullcontext
    chunk = chunk_positions(config.train.logit_chunk_size, vocab_rows(teacher))
    scorer = ShardedTeacherScorer(teacher, chunk, autocast_dtype(config.train.autocast, device), device)
    return scorer, scorer.gathered


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
            return _run_loop(config, run, preflight, summary, console, checkpoint, final, started, device)
    except BaseException as error:
        _record_end(run, summary, error, started)
        raise


def _run_loop(config: RunConfig, run: RunFolder, preflight: Preflight, summary: RunSummary, console: Console,
              checkpoint: tuple[Path, dict] | None, final: RunFolder, started: float, device: torch.device
              ) -> RunResult:
    _write_summary(run, summary, started)  # status running, from the first moment
    tokenizer = preflight.student_tokenizer
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if distributed.is_writer():
        with writing(str(run.env)):
            run.record_environment(describe(device))
    torch.manual_seed(config.train.seed)
    random.seed(config.train.seed)
    np.random.seed(config.train.seed % 2**32)
    for section in (config.teacher, config.student):
        if section.trust_remote_code:
            console.print(f"[yellow]trust_remote_code is on:[/] {section.model} runs its own Python code",
                          highlight=False, soft_wrap=True)

    held_out = HeldOut(config, tokenizer, preflight.stop_ids)
    if held_out.enabled:
        summary.held_out = held_out.protocol()

    strategy = make_strategy(config.train.strategy, config.student.lora.enabled, config.rollout.prompts_per_step,
                             device)
    if strategy.world_size > 1 and config.rollout.backend == "vllm":
        raise TropdError("rollout.backend=vllm runs on one process today; on several use rollout.backend=hf")
    folder, trainer_state = checkpoint if checkpoint is not None else (None, None)
    teacher, student = load_models(config, device, folder)
    mixed = autocast_dtype(config.train.autocast, device)
    backend = make_rollout_backend(config.rollout.backend, student, tokenizer.pad_token_id, preflight.stop_ids,
                                   config.rollout.batch_size, autocast=mixed,
                                   model_path=resolve_model_path(config.student.model),
                                   options=student_engine_options(config), adapter=config.student.lora.enabled)
    teacher_backend = make_rollout_backend("hf", teacher, tokenizer.pad_token_id, preflight.stop_ids,
                                           config.rollout.batch_size, autocast=mixed)
    teacher_scorer, teacher_gathered = sharded_teacher(config, teacher, device)
    teacher_responses = teacher_response_source(config, teacher_backend, preflight.prepared)
    if isinstance(teacher_responses, InRunTeacherResponses):  # samples the prompts it has not cached
        teacher_responses = GatheredResponses(teacher_responses, teacher_gathered)
    start_step = trainer_state["step"] if trainer_state is not None else 0
    trainer = Trainer(config, Models(teacher, student, tokenizer.pad_token_id, device),
                      GatheredBackend(backend, strategy.gathered),
                      prompt_batches(config, tokenizer, start_step, preflight.prepared, strategy.rank,
                                     strategy.world_size),
                      teacher_backend=GatheredBackend(teacher_backend, teacher_gathered),
                      teacher_responses=teacher_responses, teacher_scorer=teacher_scorer, strategy=strategy)
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)
        restore_random_states(trainer_state["random"])
        if distributed.is_writer():
            truncate_metrics(run.metrics, start_step)

    def measure(model: torch.nn.Module) -> dict[str, float]:
        # every rank evaluates; a sharded model generates whole
        with strategy.gathered():
            return held_out.measure(model)

    resolved = config.model_dump(mode="json")

    def save_checkpoint_now(random: dict | None = None) -> Path:
        summary.train_seconds = round(time.perf_counter() - started, 2)
        trainer_state = trainer.state_dict()  # every rank: a sharded state is gathered to rank 0
        weights = strategy.model_state_dict()
        if not distributed.is_writer():
            return checkpoint_dir(run.path, trainer.step)
        return save_checkpoint(run.path, trainer.step, student, tokenizer, trainer_state, summary,
                               config.train.checkpoint_keep, resolved, weights, random)

    def teacher_gone(error: TeacherUnavailable, step_random: dict) -> TropdError:
        """The line a run stops with when its served teacher goes away during a step: on one process, before
        the step's first update, the last completed step is checkpointed with the random states it ended with,
        so that a resume redoes the failed step exactly."""
        how = f"tropd distill --resume {run.path}{_nproc_flag(strategy)} --set teacher.url=URL"
        if trainer.step == 0 or strategy.world_size > 1 or trainer.updates_in_step:
            newest = list_checkpoints(run.path)
            where = f"the newest checkpoint is step {newest[-1][0]}" if newest else "no checkpoint was written yet"
            return TropdError(f"{error}; the run stopped during step {trainer.step + 1} ({where}); go on with: {how}")
        student.zero_grad(set_to_none=True)
        saved = save_checkpoint_now(step_random)
        return TropdError(f"{error}; the run stopped after step {trainer.step} with a checkpoint in {saved}; "
                          f"go on with: {how}")

    if checkpoint is None and held_out.enabled:
        with console.status("evaluating before training"):
            if config.eval.teacher:
                with teacher_gathered():
                    summary.teacher_accuracy = held_out.accuracy(teacher)
            summary.student_eval_before = measure(student)
            summary.student_accuracy_before = summary.student_eval_before["accuracy"]
    progress = Progress(TextColumn("[bold]distill"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console)
    sinks = open_sinks(config, run, start_step, summary) if distributed.is_writer() else []
    stop = StopAfterStep(console)
    try:
        with progress, stop:
            task = progress.add_task("distill", total=config.train.steps, completed=start_step, info="")
            while trainer.step < config.train.steps:
                step_random = random_states()  # what a failed step's checkpoint resumes with (dropout's stream)
                try:
                    record = trainer.train_step()
                except TeacherUnavailable as error:
                    raise teacher_gone(error, step_random) from None
                diverged = non_finite(record, student, strategy)
                if diverged:
                    raise TropdError(f"training diverged at step {record['step']}: {diverged}; the run "
                                     f"stopped; lower train.lr (now {config.train.lr:g}) and start again")
                if config.eval.every and record["step"] % config.eval.every == 0 and held_out.enabled:
                    record.update({f"eval_{name}": value for name, value in measure(student).items()})
                    summary.eval_accuracy_by_step = {**(summary.eval_accuracy_by_step or {}),
                                                     str(record["step"]): record["eval_accuracy"]}
                for sink in sinks:
                    sink.log(record)
                summary.steps_done = record["step"]
                progress.update(task, advance=1, info=f"loss {record['loss']:+.4f} "
                                f"trust {record.get('trust_fraction', float('nan')):.3f} "
                                f"len {record['response_length']:.1f}")
                every = config.train.checkpoint_every
                stop.requested = strategy.any(stop.requested)  # every rank stops after the same step
                if stop.requested or trainer.step == config.train.steps or (every and trainer.step % every == 0):
                    saved = save_checkpoint_now()
                if stop.requested:
                    summary.status = "interrupted"
                    _save_student(run, student, tokenizer, summary, final, config, strategy)
                    _write_summary(run, summary, started)
                    raise Interrupted(f"stopped after step {trainer.step}; checkpoint saved in {saved}; "
                                      f"continue with: tropd distill --resume {run.path}{_nproc_flag(strategy)}")
    except KeyboardInterrupt:
        summary.status = "interrupted"
        _save_student(run, student, tokenizer, summary, final, config, strategy, gather=False)
        _write_summary(run, summary, started)
        newest = list_checkpoints(run.path)
        where = f"the newest checkpoint is step {newest[-1][0]}" if newest else "no checkpoint was written yet"
        saved = "metrics" if strategy.sharded else "student and metrics"  # a sharded student needs every rank
        raise Interrupted(f"interrupted during step {trainer.step + 1}; {saved} saved in "
                          f"{run.path}; {where}") from None
    finally:
        close_sinks(sinks)
        backend.close()
    with console.status("evaluating after training"):
        if held_out.enabled:
            summary.student_eval_after = measure(student)
            summary.student_accuracy_after = summary.student_eval_after["accuracy"]
    if config.output.save_model:
        _save_student(run, student, tokenizer, summary, final, config, strategy)
    summary.status = "finished"
    _write_summary(run, summary, started)
    print_summary(console, final.path, summary)
    return RunResult(final.path, summary.to_json())


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
