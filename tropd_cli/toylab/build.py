"""`tropd toylab build`: train the toy teacher and the weaker toy student from scratch.

The teacher (0.9M parameters) is trained by SFT on scratchpads with injected, unsupervised mistakes, so
that it reaches ~100% held-out accuracy and, like a real teacher, predicts the locally correct next token
after a student's mistake. The student (0.17M parameters, half the width and layers) is trained briefly
on a mix in which half of the solutions skip the scratchpad and give only the answer line: it often
answers without working, is wrong more often than not, and its samples contain tokens the teacher finds
implausible (an `answer` where the teacher would start a line, wrong sums). That is the kind of student
on-policy distillation helps, and the kind whose outliers destabilise OPD.

Both are written with the tokenizer and a manifest that records how they were made (command, recipes,
held-out accuracy, the fraction of student-sampled tokens with teacher log-prob below -5, sha256 of the
weights), so the demo never retrains them.
"""

from __future__ import annotations

import hashlib
import platform
import random
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tropd_cli import __version__
from tropd_cli.engine.rollout import SamplingParams, make_rollout_backend
from tropd_cli.engine.scoring import build_sequences, score_teacher
from tropd_cli.files import atomic_folder, atomic_write_json
from tropd_cli.models import TOYLAB_ASSETS
from tropd_cli.toylab.accuracy import prompt_token_ids, toy_accuracy
from tropd_cli.toylab.models import SIZES, new_toy_model
from tropd_cli.toylab.sft import train_sft
from tropd_cli.toylab.tasks import Difficulty, is_held_out, random_problem, sample_problems
from tropd_cli.toylab.tokenizer import build_tokenizer

# How each shipped model is made. Changing any value changes the shipped checkpoints.
RECIPES: dict[str, dict] = {
    "teacher": dict(size="teacher", seed=0, steps=2000, batch_size=64, lr=3e-3, warmup=50, error_rate=0.2,
                    shortcut_rate=0.0),
    "student": dict(size="student", seed=0, steps=1200, batch_size=64, lr=3e-3, warmup=50, error_rate=0.0,
                    shortcut_rate=0.5),
}
EVAL = dict(seed=1234, problems=500, max_new_tokens=48)
IMPLAUSIBLE_LOGPROB = -5.0


def build_toylab(out: Path | None = None, only: str | None = None, console: Console | None = None) -> dict:
    """Train the requested toy models, write them to `out` (default: shipped assets) and the manifest."""
    import json

    console = console or Console()
    out = Path(out) if out is not None else TOYLAB_ASSETS
    names = [only] if only else list(RECIPES)
    for name in names:
        if name not in RECIPES:
            from tropd_cli.errors import TropdError

            raise TropdError(f"--only must be one of {', '.join(RECIPES)}, got '{name}'")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.update({"tropd_version": __version__, "difficulty": Difficulty().model_dump(), "eval": EVAL,
                     "command": "tropd toylab build" + (f" --only {only}" if only else ""),
                     "torch": torch.__version__, "machine": platform.machine()})
    manifest.setdefault("models", {})
    tokenizer = build_tokenizer()
    held_out = sample_problems(EVAL["seed"], EVAL["problems"], Difficulty(), held_out=True)
    for name in names:
        recipe = RECIPES[name]
        started = time.perf_counter()
        model = new_toy_model(recipe["size"], recipe["seed"])
        with Progress(TextColumn(f"[bold]train {name}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                      console=console) as progress:
            task = progress.add_task(name, total=recipe["steps"], loss=float("nan"))
            train_sft(model, tokenizer, Difficulty(), recipe["steps"], recipe["batch_size"], recipe["lr"],
                      recipe["seed"], warmup=recipe["warmup"], error_rate=recipe["error_rate"],
                      shortcut_rate=recipe["shortcut_rate"],
                      on_step=lambda step, loss, task=task: progress.update(task, advance=1, loss=loss))
        report = toy_accuracy(model, tokenizer, held_out, max_new_tokens=EVAL["max_new_tokens"])

        def fill(folder: Path, model: torch.nn.Module = model) -> None:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        atomic_folder(out / name, fill)
        manifest["models"][name] = {
            "recipe": recipe, "architecture": "Qwen3ForCausalLM", "config": SIZES[recipe["size"]],
            "parameters": sum(p.numel() for p in model.parameters()),
            "held_out_accuracy": report.accuracy, "held_out_verdicts": report.verdicts,
            "build_seconds": round(time.perf_counter() - started, 1),
            "sha256": hashlib.sha256((out / name / "model.safetensors").read_bytes()).hexdigest(),
        }
        console.print(f"{name}: held-out accuracy {100 * report.accuracy:.1f}% "
                      f"({manifest['models'][name]['build_seconds']:.0f}s)")
    if (out / "teacher").is_dir() and (out / "student").is_dir():
        manifest["student_outliers"] = outlier_statistics(out, tokenizer)
        console.print(f"student samples: {100 * manifest['student_outliers']['implausible_fraction']:.2f}% of "
                      f"tokens have teacher log-prob < {IMPLAUSIBLE_LOGPROB}")
    atomic_write_json(manifest_path, manifest)
    return manifest


def outlier_statistics(folder: Path, tokenizer, prompts: int = 128, seed: int = 0) -> dict:
    """How often the student samples (temperature 1) tokens the teacher finds implausible."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(folder / "teacher").eval()
    student = AutoModelForCausalLM.from_pretrained(folder / "student").eval()
    rng = random.Random(seed)
    problems = []
    while len(problems) < prompts:
        problem = random_problem(rng, Difficulty())
        if not is_held_out(problem.expression):
            problems.append(problem)
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in problems]
    rollouts = make_rollout_backend("hf", student, tokenizer.pad_token_id, [tokenizer.eos_token_id]).generate(
        prompt_ids, 4, SamplingParams(EVAL["max_new_tokens"], 1.0, 1.0), seed)
    batch = build_sequences([prompt_ids[i] for i in rollouts.prompt_index], rollouts.response_ids,
                            tokenizer.pad_token_id)
    teacher_logprobs = score_teacher(teacher, batch, top_k=1, chunk_size=1024).logprobs
    return {
        "prompts": prompts, "samples_per_prompt": 4, "temperature": 1.0, "tokens": teacher_logprobs.numel(),
        "implausible_logprob": IMPLAUSIBLE_LOGPROB,
        "implausible_fraction": float((teacher_logprobs < IMPLAUSIBLE_LOGPROB).float().mean()),
        "below_minus_10_fraction": float((teacher_logprobs < -10).float().mean()),
        "min_teacher_logprob": float(teacher_logprobs.min()),
    }
