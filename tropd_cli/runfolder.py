"""The run folder's layout and its summary: the one place that knows where a run keeps what.

    RUN/config.yaml      the resolved configuration (`distill --resume` reads it back)
    RUN/summary.json     how the run stands: `RunSummary`, rewritten at start, at each stop and at the end
    RUN/metrics.jsonl    one line per step
    RUN/env.json         where it ran: one `environment.describe()` per process that trained it (start, resumes)
    RUN/checkpoints/     step-NNNNNN/ folders, each a `CheckpointFolder` (what they hold: `checkpoints.py`):
        student/             the student at that step (save_pretrained format)
        trainer_state.pt     optimizer, scheduler, random states
        state.json           the step, the summary so far, the configuration, every other file's sha256
    RUN/student/         the final student (save_pretrained format)
    RUN/tensorboard/     event files when output.log_to has tensorboard
    RUN/.tropd.json      the marker of a folder tropd owns; .tropd.lock and .tropd.lock.json: its writer

`summary.json` always tells the truth: `status` is running while a process trains, then finished, failed
(with `error`, the one line the command printed) or interrupted, and `steps_done` counts the steps whose
metrics were logged.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from tropd_cli.files import atomic_write_json

Status = Literal["running", "finished", "failed", "interrupted"]
STUDENT = "student"  # the student's folder, in a run and in each of its checkpoints
CHECKPOINTS = "checkpoints"
STEP_FOLDER = re.compile(r"^step-(\d{6,})$")


@dataclass
class RunSummary:
    """summary.json as a typed record; accuracies are fractions of the held-out problems."""

    preset: str
    objective: str
    seed: int
    steps: int  # train.steps: the steps planned
    student_base_model: str
    student_format: Literal["full", "adapter"]
    status: Status = "running"
    steps_done: int = 0
    config_sha256: str | None = None  # of the resolved configuration (see `checkpoints.config_sha256`)
    error: str | None = None  # the failure's one line, when status is failed
    teacher_accuracy: float | None = None
    teacher_loaded_here: bool | None = None  # False when a server scores and samples for the teacher
    student_accuracy_before: float | None = None
    student_accuracy_after: float | None = None
    train_seconds: float = 0.0
    student_path: str | None = None
    resumed_from: list[int] = field(default_factory=list)
    wandb_run_id: str | None = None
    held_out: dict[str, Any] | None = None  # the held-out evaluation's protocol (`HeldOut.protocol`)
    eval_accuracy_by_step: dict[str, float] | None = None  # eval.every: step -> held-out accuracy
    student_eval_before: dict[str, float] | None = None  # every held-out measure before training (HeldOut.measure)
    student_eval_after: dict[str, float] | None = None  # and after
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know, kept as they were

    def to_json(self) -> dict[str, Any]:
        """The JSON object of summary.json: unset optional fields are left out."""
        data = {key: value for key, value in asdict(self).items()
                if key != "extra" and value is not None and not (key == "resumed_from" and not value)}
        return {**data, **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSummary:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{key: value for key, value in data.items() if key in known},
                   extra={key: value for key, value in data.items() if key not in known})


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def student(self) -> Path:
        return self.path / STUDENT

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def env(self) -> Path:
        return self.path / "env.json"

    def checkpoint(self, step: int) -> Path:
        """The folder of checkpoint `step` (whether or not it was saved)."""
        return self.checkpoints / f"step-{step:06d}"

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Every saved checkpoint, oldest first, as (step, folder); damaged ones included (a checkpoint folder
        only ever appears complete, so a missing file means damage, not a save in progress)."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for folder in self.checkpoints.iterdir():
            match = STEP_FOLDER.match(folder.name)
            if match and folder.is_dir():
                found.append((int(match.group(1)), folder))
        return sorted(found)

    def is_run(self) -> bool:
        return self.config.is_file()

    def read_summary(self) -> dict[str, Any]:
        """summary.json as written, or {} when it is missing or unreadable."""
        try:
            data = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_summary(self, summary: RunSummary) -> None:
        atomic_write_json(self.summary, summary.to_json())

    def record_environment(self, environment: dict[str, Any]) -> None:
        """Append this process's environment to env.json's `processes`, so that a resumed run keeps where
        each of its parts ran."""
        try:
            processes = json.loads(self.env.read_text())["processes"]
        except (OSError, ValueError, KeyError, TypeError):
            processes = []
        atomic_write_json(self.env, {"processes": [*processes, environment]})


@dataclass(frozen=True)
class CheckpointFolder:
    """Paths inside one checkpoint folder, RUN/checkpoints/step-NNNNNN/ (or the temporary folder it is written
    in before it appears)."""

    path: Path

    @property
    def student(self) -> Path:
        return self.path / STUDENT

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def trainer_state(self) -> Path:
        return self.path / "trainer_state.pt"

    @property
    def named_step(self) -> int | None:
        """The step its name gives when it lies where a run keeps checkpoints (RUN/checkpoints/step-NNNNNN),
        else None."""
        match = STEP_FOLDER.match(self.path.name)
        return int(match.group(1)) if match and self.path.parent.name == CHECKPOINTS else None

    @property
    def run(self) -> RunFolder:
        """The run folder it would belong to (RUN of RUN/checkpoints/step-NNNNNN)."""
        return RunFolder(self.path.parent.parent)
