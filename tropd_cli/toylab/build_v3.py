"""`tropd toylab build --lab v3`: the paper's regime, a teacher that masters the task and students that fail on
their own, gated.

Teacher and student learn the same line forms (V3_LINE_FORMS: `step a+b=c` or `compute a+b=c` for "+" lines,
drawn uniformly; `a-b=c` for "-" lines) on 4-6 term chains, so the teacher's entropy where a line starts is one the
student shares. The two "+" forms differ in their first word only: a choice between two numbers (`a+b` or `b+a`)
is one tiny models learn as a context-dependent coin, and the trust test then rejects style where the coins
differ. The student gets no injected slips: its mistakes are its own, sampled at temperature 1. One student run
is snapshotted every `checkpoint_every` steps; the main student is the latest snapshot whose greedy held-out
accuracy lies in its target range (40-60%) before the run first rises above it, the wide-gap student likewise
(20-35%): the most trained student in range, whose samples at temperature 1 hold the fewest errors.
The teacher run is snapshotted too: the weak teacher (a control) is the early snapshot whose accuracy is
nearest the main student's. The teacher is trained with injected, unsupervised mistakes (as v1's), so that after
a student's mistake it predicts the locally correct continuation. A tiny teacher is right long before its tails
are thin (it samples a neighbour of the right number now and then), so the shipped teachers' logits are scaled
by the smallest of TEACHER_LOGIT_SCALES that lets the teacher pass its sampled-accuracy gate (greedy answers do
not change). Both have an output head of their own (tied embeddings keep a tiny model unsure between neighbouring
numbers); the student is never scaled.

The build then measures the pair's gates (`GATES`) with `tropd_cli.probe`, the code `tropd probe` runs: the
teacher's greedy and sampled accuracy, and on 128 held-out prompts x 4 student samples at temperature 1 the
trust test's rejection at line starts and the tokens with r < -5 (their share of the tokens, of sum |r|, and
how many responses holding one are wrong). The same numbers for the wide-gap student and the weak teacher are
recorded as information. Everything goes to manifest-v3.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tropd_cli import __version__
from tropd_cli.engine.rollout import SamplingParams
from tropd_cli.files import atomic_folder, atomic_write_json
from tropd_cli.probe import batch_statistics, sampled_batch
from tropd_cli.toylab.accuracy import prompt_token_ids, toy_accuracy
from tropd_cli.toylab.models import SIZES, new_toy_model
from tropd_cli.toylab.sft import train_sft
from tropd_cli.toylab.tasks import V3_DIFFICULTY, Problem, Verdict, grade, sample_problems
from tropd_cli.toylab.tokenizer import build_tokenizer

V3_TEACHER_STEPS = 1800
V3_STUDENT_STEPS = 1500
RECIPES_V3: dict[str, dict] = {
    "v3-student": dict(size="v3-student", seed=0, steps=V3_STUDENT_STEPS, batch_size=64, lr=3e-3, warmup=50,
                       error_rate=0.0, forms="shared", checkpoint_every=25),
    "v3-teacher": dict(size="v3-teacher", seed=0, steps=V3_TEACHER_STEPS, batch_size=64, lr=3e-3, warmup=50,
                       error_rate=0.2, forms="shared", checkpoint_every=50),
}
# The shipped teachers' logits are the trained network's times the smallest of these scales at which the teacher's
# sampled accuracy reaches its gate: a tiny model is right long before its tails are thin (a sharper teacher, as
# sampling it at temperature 1/scale; its greedy answers do not change). Students are never scaled.
TEACHER_LOGIT_SCALES = (1.0, 1.5, 2.0, 2.5, 3.0)
# Shipped models cut from the student run: name -> greedy held-out accuracy range; the latest snapshot in it.
STUDENT_TARGETS = {"v3-student": (0.40, 0.60), "v3-student-wide": (0.20, 0.35)}
WEAK_TEACHER = "v3-teacher-weak"
WEAK_TEACHER_SEARCH = 0.25  # teacher snapshots are read in step order until one is this far above the main student
EVAL_V3 = dict(seed=1234, problems=300, max_new_tokens=64)
GATE_SAMPLES = dict(prompts=128, samples=4, seed=0, temperature=1.0, trust="bernoulli")
GATES = {  # name -> (lowest, highest) allowed
    "teacher_greedy_accuracy": (0.98, 1.0),
    "teacher_sampled_accuracy": (0.95, 1.0),
    "line_start_rejection": (0.0, 0.10),
    "outlier_token_fraction": (0.005, 0.05),
    "outlier_abs_reward_share": (0.50, 1.0),
    "outlier_responses_wrong": (0.80, 1.0),
}
MANIFEST_V3 = "manifest-v3.json"


def build_v3(out: Path, only: str | None, console: Console) -> dict:
    """Train the v3 student and teacher runs (or `only` one), cut the shipped models from their snapshots, write
    them to `out` with manifest-v3.json, its gates measured when every model is there."""
    from tropd_cli.errors import TropdError

    if only is not None and only not in RECIPES_V3:
        raise TropdError(f"--only must be one of {', '.join(RECIPES_V3)}, got '{only}'")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    manifest_path = out / MANIFEST_V3
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    command = "tropd toylab build --lab v3" + (f" --only {only}" if only else "")
    manifest.update({"tropd_version": __version__, "difficulty": V3_DIFFICULTY.model_dump(), "eval": EVAL_V3,
                     "command": command, "torch": torch.__version__, "machine": platform.machine(),
                     "threads": torch.get_num_threads(), "gate_samples": GATE_SAMPLES,
                     "targets": {name: list(bounds) for name, bounds in STUDENT_TARGETS.items()}})
    manifest.setdefault("models", {})
    manifest.setdefault("runs", {})
    tokenizer = build_tokenizer()
    held_out = sample_problems(EVAL_V3["seed"], EVAL_V3["problems"], V3_DIFFICULTY, held_out=True)
    for run in [only] if only else list(RECIPES_V3):
        started = time.perf_counter()
        recipe = RECIPES_V3[run]
        snapshots = train_with_snapshots(run, recipe, tokenizer, console)
        model = new_toy_model(recipe["size"], recipe["seed"])
        measured: dict[int, float] = {}

        def accuracy_at(step: int, model: torch.nn.Module = model, snapshots: dict = snapshots,
                        measured: dict[int, float] = measured) -> float:
            if step not in measured:
                model.load_state_dict(snapshots[step])
                measured[step] = toy_accuracy(model.eval(), tokenizer, held_out,
                                              max_new_tokens=EVAL_V3["max_new_tokens"]).accuracy
            return measured[step]

        if run == "v3-student":
            chosen = {name: latest_within(snapshots, accuracy_at, *bounds) for name, bounds in STUDENT_TARGETS.items()}
        else:
            # the main student's accuracy when it is built, else the middle of its range
            main = manifest["models"].get("v3-student", {}).get("held_out_accuracy",
                                                                  sum(STUDENT_TARGETS["v3-student"]) / 2)
            chosen = {run: max(snapshots), WEAK_TEACHER: nearest(snapshots, accuracy_at, main,
                                                                  stop_above=main + WEAK_TEACHER_SEARCH)}
        manifest["runs"][run] = {"command": command, "recipe": recipe,
                                 **({"weak_teacher_target": main} if run == "v3-teacher" else {}),
                                 "snapshot_accuracy": {str(step): acc for step, acc in sorted(measured.items())}}
        scale = 1.0
        if run == "v3-teacher":
            scale, by_scale = teacher_logit_scale(model, snapshots[max(snapshots)], tokenizer, held_out)
            manifest["runs"][run].update(logit_scale=scale, sampled_accuracy_by_logit_scale=by_scale)
        ship(model, {name: (step, snapshots[step]) for name, step in chosen.items()}, scale, run, command, tokenizer,
             held_out, out, manifest, console)
        manifest["runs"][run]["build_seconds"] = round(time.perf_counter() - started, 1)
    if all((out / name).is_dir() for name in ("v3-teacher", WEAK_TEACHER, *STUDENT_TARGETS)):
        started = time.perf_counter()
        manifest["gates"], manifest["informational"] = measure_gates(out, manifest, tokenizer, console)
        manifest["gates_seconds"] = round(time.perf_counter() - started, 1)
    manifest["build_seconds"] = round(sum(run.get("build_seconds", 0.0) for run in manifest["runs"].values())
                                      + manifest.get("gates_seconds", 0.0), 1)
    atomic_write_json(manifest_path, manifest)
    return manifest


def train_with_snapshots(run: str, recipe: dict, tokenizer, console: Console) -> dict[int, dict]:
    """Train a run's model by its recipe; its state every `checkpoint_every` steps (and the last), by step."""
    model = new_toy_model(recipe["size"], recipe["seed"])
    snapshots: dict[int, dict] = {}

    def on_step(step: int, loss: float) -> None:
        progress.update(task, advance=1, loss=loss)
        if (step + 1) % recipe["checkpoint_every"] == 0 or step + 1 == recipe["steps"]:
            snapshots[step + 1] = copy.deepcopy(model.state_dict())

    with Progress(TextColumn(f"[bold]train {run}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task(run, total=recipe["steps"], loss=float("nan"))
        train_sft(model, tokenizer, V3_DIFFICULTY, recipe["steps"], recipe["batch_size"], recipe["lr"], recipe["seed"],
                  warmup=recipe["warmup"], error_rate=recipe["error_rate"], forms=recipe["forms"], on_step=on_step)
    return snapshots


def ship(model: torch.nn.Module, chosen: dict[str, tuple[int, dict]], scale: float, run: str, command: str,
         tokenizer, held_out: list[Problem], out: Path, manifest: dict, console: Console) -> None:
    """Write each chosen snapshot of `run` (name -> (step, state)), its logits times `scale`, to `out` and its
    entry (step, greedy and sampled held-out accuracy, sha256) to `manifest`."""
    size = RECIPES_V3[run]["size"]
    for name, (step, state) in chosen.items():
        model.load_state_dict(state)
        sharpen(model, scale)
        save_model(model, tokenizer, out / name)
        report = toy_accuracy(model.eval(), tokenizer, held_out, max_new_tokens=EVAL_V3["max_new_tokens"])
        sampled = toy_accuracy(model, tokenizer, held_out, k=4, temperature=1.0,
                               max_new_tokens=EVAL_V3["max_new_tokens"], seed=EVAL_V3["seed"])
        manifest["models"][name] = {
            "command": command, "run": run, "step": step, "logit_scale": scale, "architecture": "Qwen3ForCausalLM",
            "config": SIZES[size], "parameters": sum(p.numel() for p in model.parameters()),
            "held_out_accuracy": report.accuracy, "held_out_verdicts": report.verdicts,
            "sampled_accuracy": sampled.accuracy, "held_out_format_coverage": report.format_coverage,
            "sha256": hashlib.sha256((out / name / "model.safetensors").read_bytes()).hexdigest(),
        }
        console.print(f"{name} (step {step} of {run}): held-out greedy {100 * report.accuracy:.1f}%, "
                      f"sampled avg@4 {100 * sampled.accuracy:.1f}%")


def sharpen(model: torch.nn.Module, scale: float) -> None:
    """Multiply every logit of a toy model by `scale` (its final norm's weight; the head is linear in it)."""
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)


def teacher_logit_scale(model: torch.nn.Module, state: dict, tokenizer, problems: list[Problem]
                        ) -> tuple[float, dict[str, float]]:
    """The smallest of TEACHER_LOGIT_SCALES at which the teacher (`model` holding `state`) reaches its sampled
    accuracy gate on `problems`, and the accuracy at each scale tried (the largest scale when none reaches it)."""
    tried: dict[str, float] = {}
    for scale in TEACHER_LOGIT_SCALES:
        model.load_state_dict(state)
        sharpen(model, scale)
        tried[f"{scale:g}"] = toy_accuracy(model.eval(), tokenizer, problems, k=4, temperature=1.0,
                                           max_new_tokens=EVAL_V3["max_new_tokens"], seed=EVAL_V3["seed"]).accuracy
        if tried[f"{scale:g}"] >= GATES["teacher_sampled_accuracy"][0]:
            return scale, tried
    return TEACHER_LOGIT_SCALES[-1], tried


def latest_within(snapshots: dict[int, dict], accuracy_at: Callable[[int], float], low: float, high: float) -> int:
    """The latest snapshot step whose accuracy lies in [low, high], reading snapshots in step order and no further
    than the first above `high`; the snapshot nearest the middle when none lies in the range."""
    best: int | None = None
    for step in sorted(snapshots):
        accuracy = accuracy_at(step)
        if low <= accuracy <= high:
            best = step
        elif accuracy > high:
            break
    return best if best is not None else nearest(snapshots, accuracy_at, (low + high) / 2)


def nearest(snapshots: dict[int, dict], accuracy_at: Callable[[int], float], target: float,
            stop_above: float | None = None) -> int:
    """The snapshot step whose accuracy is nearest `target` (the earlier one on a tie), reading snapshots in step
    order and, with `stop_above`, no further than the first whose accuracy exceeds it."""
    best: int | None = None
    for step in sorted(snapshots):
        accuracy = accuracy_at(step)
        if best is None or abs(accuracy - target) < abs(accuracy_at(best) - target):
            best = step
        if stop_above is not None and accuracy > stop_above:
            break
    assert best is not None, "a run without snapshots"
    return best


def save_model(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """Write `model` and the tokenizer to `folder`, replacing it whole."""

    def fill(target: Path) -> None:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    atomic_folder(folder, fill)


def pair_statistics(teacher_folder: Path, student_folder: Path, tokenizer, problems: list[Problem]) -> dict:
    """`tropd_cli.probe.batch_statistics` of the student's GATE_SAMPLES on `problems` under the teacher."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder).eval()
    student = AutoModelForCausalLM.from_pretrained(student_folder).eval()
    params = SamplingParams(EVAL_V3["max_new_tokens"], GATE_SAMPLES["temperature"], 1.0)
    batch = sampled_batch(teacher, student, tokenizer, [prompt_token_ids(tokenizer, p) for p in problems],
                          GATE_SAMPLES["samples"], params, GATE_SAMPLES["seed"], [tokenizer.eos_token_id],
                          lambda index, text: grade(text, problems[index].answer) is Verdict.CORRECT)
    return batch_statistics(batch, GATE_SAMPLES["trust"])


def gate_values(statistics: dict) -> dict[str, float | None]:
    """The gated numbers of one pair's statistics."""
    outliers = statistics["outliers"]
    return {"line_start_rejection": statistics["rejection"]["line_start"]["rejection"],
            "outlier_token_fraction": outliers["fraction"], "outlier_abs_reward_share": outliers["abs_reward_share"],
            "outlier_responses_wrong": outliers["wrong_share"]}


def gate(name: str, value: float | None) -> dict:
    """A gate's entry: its value, its allowed range and whether it passes."""
    low, high = GATES[name]
    return {"value": value, "min": low, "max": high, "pass": value is not None and low <= value <= high}


def measure_gates(out: Path, manifest: dict, tokenizer, console: Console) -> tuple[dict, dict]:
    """The gates of the main pair (v3-teacher, v3-student), and the same numbers for the wide-gap student and the
    weak teacher."""
    problems = sample_problems(EVAL_V3["seed"], GATE_SAMPLES["prompts"], V3_DIFFICULTY, held_out=True)
    teacher = manifest["models"]["v3-teacher"]
    gates = {"teacher_greedy_accuracy": gate("teacher_greedy_accuracy", teacher["held_out_accuracy"]),
             "teacher_sampled_accuracy": gate("teacher_sampled_accuracy", teacher["sampled_accuracy"])}
    main = pair_statistics(out / "v3-teacher", out / "v3-student", tokenizer, problems)
    gates.update({name: gate(name, value) for name, value in gate_values(main).items()})
    informational = {"v3-teacher/v3-student": main}
    for teacher_name, student_name in (("v3-teacher", "v3-student-wide"), (WEAK_TEACHER, "v3-student")):
        statistics = pair_statistics(out / teacher_name, out / student_name, tokenizer, problems)
        informational[f"{teacher_name}/{student_name}"] = statistics
    for name, entry in gates.items():
        shown = "n/a" if entry["value"] is None else f"{entry['value']:.4f}"
        console.print(f"gate {name}: {shown} in [{entry['min']}, {entry['max']}]: "
                      + ("[green]pass[/]" if entry["pass"] else "[red]fail[/]"))
    return gates, informational
