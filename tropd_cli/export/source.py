"""What `tropd export` exports: a run folder (its final student) or one of its checkpoints, and the facts
about it that a model card records (`run_facts`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tropd_cli import __version__
from tropd_cli.checkpoints import verify_checkpoint
from tropd_cli.config import RunConfig, load_config_file
from tropd_cli.data import is_generator
from tropd_cli.engine.objectives import get_objective
from tropd_cli.errors import TropdError
from tropd_cli.runfolder import CheckpointFolder, RunFolder


@dataclass
class ExportSource:
    """What is exported: the run (its folder, configuration, summary) and which student of it."""

    run_dir: Path
    student_dir: Path
    config: RunConfig
    summary: dict  # summary.json, or for a checkpoint the summary as of that step
    checkpoint_step: int | None  # None: the run's final student

    @property
    def is_adapter(self) -> bool:
        return (self.student_dir / "adapter_config.json").is_file()

    @property
    def is_quantized(self) -> bool:
        """A QLoRA run (`is_qlora`)."""
        return is_qlora(self.config)


def is_qlora(config: RunConfig) -> bool:
    """A QLoRA run: its adapter was trained over a 4-bit copy of the base (the schema lets a 4-bit student train
    only through LoRA)."""
    return config.student.quantization == "4bit"


def find_source(path: Path, step: int | None = None) -> ExportSource:
    """The run folder and student folder named by a run folder (plus `step`) or a checkpoint folder."""
    if not path.exists():
        raise TropdError(f"'{path}' does not exist")
    checkpoint_step = None
    state: dict = {}
    named = CheckpointFolder(path)
    if named.named_step is not None and named.student.is_dir():
        run = named.run
        student_dir = named.student
        state = verify_checkpoint(path)
        checkpoint_step = state["step"] if isinstance(state.get("step"), int) else named.named_step
        if step is not None and step != checkpoint_step:
            raise TropdError(f"--step {step} disagrees with checkpoint folder '{path}' (step {checkpoint_step})")
        if not run.is_run():
            raise TropdError(f"checkpoint folder '{path}' is not inside a run folder (no {run.config})")
    elif RunFolder(path).is_run():
        run = RunFolder(path)
        if step is None:
            student_dir = run.student
            if not student_dir.is_dir():
                raise TropdError(f"run folder '{path}' holds no student/ (the run saved no model)"
                                 f"{_saved_steps_hint(run)}")
        else:
            checkpoint_step = step
            checkpoint = CheckpointFolder(run.checkpoint(step))
            student_dir = checkpoint.student
            if not student_dir.is_dir():
                raise TropdError(f"run folder '{path}' has no checkpoint at step {step}{_saved_steps_hint(run)}")
            state = verify_checkpoint(checkpoint.path)
    else:
        raise TropdError(f"'{path}' is not a tropd run folder (no config.yaml) or checkpoint folder "
                         f"(RUN/checkpoints/step-NNNNNN with student/)")
    config = load_config_file(run.config)
    summary = state.get("summary") if isinstance(state.get("summary"), dict) else run.read_summary()
    return ExportSource(run.path, student_dir, config, summary, checkpoint_step)


def _saved_steps_hint(run: RunFolder) -> str:
    steps = [step for step, folder in run.list_checkpoints() if CheckpointFolder(folder).student.is_dir()]
    return f"; saved checkpoints: {', '.join(map(str, steps))}" if steps else "; it saved no checkpoints"


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when the file is missing or holds something else."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_facts(config: RunConfig, summary: dict, run_dir: Path, checkpoint_step: int | None = None) -> dict:
    """What a model card records about a run: teacher, student base, objective, steps, data, evaluation.
    `eval` holds the accuracies the run measured (`run_accuracy`: its student at the end, or at the checkpoint's
    step when eval.every evaluated there)."""
    objective = config.objective
    options = get_objective(objective.name).options  # what changes what it computes; the whole section is kept too
    if not objective.guidance:
        options = tuple(name for name in options if name != "guidance_beta")
    student = config.student
    if not student.lora.enabled:
        training = "full fine-tuning"
    else:
        training = f"LoRA r={student.lora.r} alpha={student.lora.alpha} on {student.lora.target_modules}"
        if is_qlora(config):
            training += " over a 4-bit (nf4) base (QLoRA)"
    evaluation = {key: summary[key] for key in ("teacher_accuracy", "student_accuracy_before") if key in summary}
    if checkpoint_step is None:
        if "student_accuracy_after" in summary:
            evaluation["run_accuracy"] = summary["student_accuracy_after"]
    else:
        at_step = _eval_at_step(RunFolder(run_dir).metrics, checkpoint_step)
        if at_step is not None:
            evaluation["run_accuracy"] = at_step
    steps = checkpoint_step if checkpoint_step is not None else summary.get("steps_done")
    return {
        "tropd_version": __version__,
        "teacher": config.teacher.model,
        "student_base": student.model,
        "student_training": training,
        "quantized_base": is_qlora(config),
        "objective": objective.name,
        "objective_options": {name: getattr(objective, name) for name in options},
        "objective_config": objective.model_dump(mode="json"),
        "seed": config.train.seed,
        "steps": steps,
        "steps_planned": config.train.steps,
        "checkpoint_step": checkpoint_step,
        "run_status": summary.get("status"),
        "run_dir": str(run_dir.resolve()),
        "data": config.data.prompts,
        "data_fingerprint": data_fingerprint(config.data.prompts),
        "eval": evaluation,
        "eval_benchmark": config.eval.benchmark,
        "eval_problems": config.eval.problems,
    }


def describe(source: ExportSource, format_: str, dtype: str, base: str) -> dict:
    """The facts an export's model card records: the run's, and how it was exported."""
    facts = run_facts(source.config, source.summary, source.run_dir, source.checkpoint_step)
    return {**facts, "format": format_, "dtype": dtype, "base": base}


def data_fingerprint(prompts: str) -> str | None:
    """The `fingerprint` of a prepared dataset's manifest.json, when `prompts` names such a folder."""
    if is_generator(prompts):
        return None
    value = _read_json(Path(prompts) / "manifest.json").get("fingerprint")
    return str(value) if value is not None else None


def _eval_at_step(metrics: Path, step: int) -> float | None:
    """The held-out accuracy logged at `step` (eval.every), if any."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step") == step and "eval_accuracy" in record:
            return record["eval_accuracy"]
    return None
