"""Where each step's metrics go: RUN/metrics.jsonl always, TensorBoard and Weights & Biases on request.

Every sink gets the same record under the same names (README, "Metrics"). metrics.jsonl is strict JSON on
every line: a non-finite value (NaN, +-inf) is written as null and named in the line's `nonfinite` list
(Python's json would write `NaN` and `Infinity`, which no JSON parser accepts). A resumed run truncates
metrics.jsonl to its checkpoint, tells TensorBoard to drop events after it, and resumes the same W&B run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Protocol

from tropd_cli.config import RunConfig
from tropd_cli.errors import TropdError
from tropd_cli.files import atomic_write_text
from tropd_cli.runfolder import RunFolder, RunSummary


class Sink(Protocol):
    def log(self, record: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON line per record, flushed at once, so a crash loses at most the step in progress."""

    def __init__(self, path: Path) -> None:
        self.stream = path.open("a")

    def log(self, record: dict[str, float]) -> None:
        self.stream.write(json_line(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


def json_line(record: dict[str, float]) -> str:
    """One record as strict JSON: non-finite numbers become null and are listed under `nonfinite`."""
    nonfinite = [name for name, value in record.items() if isinstance(value, float) and not math.isfinite(value)]
    if nonfinite:
        record = {**{name: None if name in nonfinite else value for name, value in record.items()},
                  "nonfinite": nonfinite}
    return json.dumps(record, allow_nan=False)


class TensorBoardSink:
    """Scalars under their metric names at global step `step`, in RUN/tensorboard."""

    def __init__(self, log_dir: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TropdError("output.log_to has tensorboard, but it is not installed; "
                             "pip install 'tropd[tensorboard]'") from None
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, float]) -> None:
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(name, value, global_step=int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run named after the run folder; resuming continues the same run id."""

    def __init__(self, config: RunConfig, run_dir: Path, run_id: str | None) -> None:
        try:
            import wandb
        except ImportError:
            raise TropdError("output.log_to has wandb, but it is not installed; pip install wandb") from None
        self.run = wandb.init(project=config.output.wandb_project, name=run_dir.name, dir=str(run_dir),
                              config=config.model_dump(mode="json"), id=run_id,
                              resume="allow" if run_id else None)

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record: dict[str, float]) -> None:
        self.run.log({name: value for name, value in record.items() if name != "step"}, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def open_sinks(config: RunConfig, run: RunFolder, start_step: int, summary: RunSummary) -> list[Sink]:
    """metrics.jsonl plus the configured sinks; a W&B run id is kept in `summary` for resuming."""
    sinks: list[Sink] = [JsonlSink(run.metrics)]
    try:
        if "tensorboard" in config.output.log_to:
            sinks.append(TensorBoardSink(run.tensorboard, start_step))
        if "wandb" in config.output.log_to:
            sink = WandbSink(config, run.path, summary.wandb_run_id)
            summary.wandb_run_id = sink.run_id
            sinks.append(sink)
    except BaseException:
        close_sinks(sinks)
        raise
    return sinks


def close_sinks(sinks: list[Sink]) -> None:
    for sink in sinks:
        sink.close()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the records of steps up to `last_step` (a resumed run rewrites the rest); returns how many."""
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except ValueError:  # a line cut short by a crash
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(kept)
