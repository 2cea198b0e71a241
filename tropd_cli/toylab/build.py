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

Toy lab v2 (`tropd toylab build --lab v2`) is a mismatch of the paper's kind: its teacher writes every
scratchpad line in one of three equally valid forms (real entropy where lines start) over longer chains
(4-8 terms), and its students, weaker and trained on the canonical form only, have a slip
channel: with probability epsilon per line they write a token the teacher never saw (`?`) and a wrong
value that later lines carry forward. Three students share one recipe and differ only in epsilon
(0, 0.03, 0.1). Its manifest (manifest-v2.json) adds, per student, the share of sampled tokens that are
slips and the teacher's log-probs of them, and the teacher's entropy at line starts.
"""

from __future__ import annotations

import hashlib
import platform
import random
import time
from dataclasses import dataclass
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
from tropd_cli.toylab.build_v3 import EVAL_V3, MANIFEST_V3, RECIPES_V3, build_v3
from tropd_cli.toylab.models import SIZES, new_toy_model
from tropd_cli.toylab.sft import train_sft
from tropd_cli.toylab.tasks import (
    V2_DIFFICULTY,
    V3_DIFFICULTY,
    Difficulty,
    is_held_out,
    random_problem,
    sample_problems,
)
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

V2_EPSILONS = (0.0, 0.03, 0.1)
V2_TEACHER_STEPS = 2500
V2_STUDENT_STEPS = 1500


def v2_student_name(epsilon: float) -> str:
    """The shipped name of the v2 student with slip rate `epsilon` (v2-student-e0.03)."""
    return f"v2-student-e{epsilon:.2f}"


V2_STUDENT = dict(size="v2-student", seed=0, steps=V2_STUDENT_STEPS, batch_size=64, lr=3e-3, warmup=50,
                  error_rate=0.0, forms="canonical")
RECIPES_V2: dict[str, dict] = {
    "v2-teacher": dict(size="v2-teacher", seed=0, steps=V2_TEACHER_STEPS, batch_size=64, lr=3e-3, warmup=50,
                       error_rate=0.2, forms="varied", slip_rate=0.0),
    **{v2_student_name(eps): dict(V2_STUDENT, slip_rate=eps) for eps in V2_EPSILONS},
}
EVAL_V2 = dict(seed=1234, problems=300, max_new_tokens=64)
MISMATCH = dict(prompts=128, samples=4, seed=0)  # the student samples the manifest's mismatch statistics read


@dataclass(frozen=True)
class Lab:
    """One generation of the toy lab: its recipes, task difficulty, evaluation and manifest file."""

    name: str
    recipes: dict[str, dict]
    difficulty: Difficulty
    eval: dict
    manifest: str


LABS = {
    "v1": Lab("v1", RECIPES, Difficulty(), EVAL, "manifest.json"),
    "v2": Lab("v2", RECIPES_V2, V2_DIFFICULTY, EVAL_V2, "manifest-v2.json"),
    "v3": Lab("v3", RECIPES_V3, V3_DIFFICULTY, EVAL_V3, MANIFEST_V3),  # built by build_v3 (snapshots and gates)
}


def build_toylab(out: Path | None = None, only: str | None = None, console: Console | None = None,
                 lab: str = "v1") -> dict:
    """Train the requested toy models of `lab`, write them to `out` (default: shipped assets) and its
    manifest."""
    import json

    from tropd_cli.errors import TropdError

    console = console or Console()
    if lab not in LABS:
        raise TropdError(f"--lab must be one of {', '.join(LABS)}, got '{lab}'")
    if lab == "v3":
        return build_v3(Path(out) if out is not None else TOYLAB_ASSETS, only, console)
    spec = LABS[lab]
    out = Path(out) if out is not None else TOYLAB_ASSETS
    names = [only] if only else list(spec.recipes)
    for name in names:
        if name not in spec.recipes:
            raise TropdError(f"--only must be one of {', '.join(spec.recipes)}, got '{name}'")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    manifest_path = out / spec.manifest
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    command = "tropd toylab build" + (f" --lab {lab}" if lab != "v1" else "") + (f" --only {only}" if only else "")
    manifest.update({"tropd_version": __version__, "difficulty": spec.difficulty.model_dump(), "eval": spec.eval,
                     "command": command, "torch": torch.__version__, "machine": platform.machine(),
                     "threads": torch.get_num_threads()})
    manifest.setdefault("models", {})
    tokenizer = build_tokenizer()
    held_out = sample_problems(spec.eval["seed"], spec.eval["problems"], spec.difficulty, held_out=True)
    for name in names:
        recipe = spec.recipes[name]
        started = time.perf_counter()
        model = new_toy_model(recipe["size"], recipe["seed"])
        with Progress(TextColumn(f"[bold]train {name}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                      console=console) as progress:
            task = progress.add_task(name, total=recipe["steps"], loss=float("nan"))
            train_sft(model, tokenizer, spec.difficulty, recipe["steps"], recipe["batch_size"], recipe["lr"],
                      recipe["seed"], warmup=recipe["warmup"], error_rate=recipe["error_rate"],
                      shortcut_rate=recipe.get("shortcut_rate", 0.0), forms=recipe.get("forms"),
                      slip_rate=recipe.get("slip_rate", 0.0),
                      on_step=lambda step, loss, task=task: progress.update(task, advance=1, loss=loss))
        model.eval()
        report = toy_accuracy(model, tokenizer, held_out, max_new_tokens=spec.eval["max_new_tokens"])

        def fill(folder: Path, model: torch.nn.Module = model) -> None:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)

        atomic_folder(out / name, fill)
        manifest["models"][name] = {
            "command": command, "recipe": recipe, "architecture": "Qwen3ForCausalLM", "config": SIZES[recipe["size"]],
            "parameters": sum(p.numel() for p in model.parameters()),
            "held_out_accuracy": report.accuracy, "held_out_verdicts": report.verdicts,
            "build_seconds": round(time.perf_counter() - started, 1),
            "sha256": hashlib.sha256((out / name / "model.safetensors").read_bytes()).hexdigest(),
        }
        if lab == "v2":
            manifest["models"][name]["held_out_slip_rate"] = report.slip_rate
            manifest["models"][name]["held_out_format_coverage"] = report.format_coverage
        console.print(f"{name}: held-out accuracy {100 * report.accuracy:.1f}% "
                      f"({manifest['models'][name]['build_seconds']:.0f}s)")
    if lab == "v1" and (out / "teacher").is_dir() and (out / "student").is_dir():
        manifest["student_outliers"] = outlier_statistics(out, tokenizer)
        console.print(f"student samples: {100 * manifest['student_outliers']['implausible_fraction']:.2f}% of "
                      f"tokens have teacher log-prob < {IMPLAUSIBLE_LOGPROB}")
    if lab == "v2":
        record_mismatch(out, manifest, tokenizer, console)
    atomic_write_json(manifest_path, manifest)
    return manifest


def record_mismatch(out: Path, manifest: dict, tokenizer, console: Console) -> None:
    """The teacher's view of every v2 student in `out` (`mismatch_statistics`), into `manifest`."""
    spec = LABS["v2"]
    if not (out / "v2-teacher").is_dir():
        return
    manifest.setdefault("mismatch", {})
    for name in spec.recipes:
        if name != "v2-teacher" and (out / name).is_dir():
            stats = mismatch_statistics(out / "v2-teacher", out / name, tokenizer, spec)
            manifest["mismatch"][name] = stats
            median = stats["slip_teacher_logprob"]["median"]
            console.print(f"{name}: slips are {100 * stats['slip_token_fraction']:.2f}% of sampled tokens"
                          + (f", teacher log-prob of a slip median {median:.1f}" if median is not None else ""))


def scale_teacher_logits(source: Path, destination: Path, scale: float) -> None:
    """Write a copy of a toy teacher whose logits are `scale` times the original's (the toy-only tail-depth
    knob): the final norm's weight is scaled, and with tied embeddings every logit scales with it. Tokens the
    teacher already ranks far below its top choices sink further; equally likely choices stay equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_folder(destination, fill)


def _quantiles(values: torch.Tensor) -> dict:
    if values.numel() == 0:
        return {"count": 0, "median": None, "p10": None, "p90": None, "min": None}
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"count": values.numel(), "median": round(float(q[1]), 3), "p10": round(float(q[0]), 3),
            "p90": round(float(q[2]), 3), "min": round(float(values.min()), 3)}


def mismatch_statistics(teacher_folder: Path, student_folder: Path, tokenizer, spec: Lab) -> dict:
    """What the teacher makes of a v2 student's temperature-1 samples: slips (share of tokens, teacher
    log-probs of the slip token and of the value after it), implausible tokens, and the teacher's entropy at
    line starts."""
    from tropd_cli.toylab.tasks import SLIP_TOKEN, ScratchpadProfile

    prompts, samples, seed = MISMATCH["prompts"], MISMATCH["samples"], MISMATCH["seed"]
    problems, rollouts, teacher_stats = sampled_and_scored(teacher_folder, student_folder, tokenizer,
                                                           spec.difficulty, prompts, samples,
                                                           spec.eval["max_new_tokens"], seed)
    logprobs, entropy = teacher_stats.logprobs, teacher_stats.entropy
    tokens = torch.tensor([t for response in rollouts.response_ids for t in response])
    slip_id, newline_id = tokenizer.convert_tokens_to_ids(SLIP_TOKEN), tokenizer.convert_tokens_to_ids("\n")
    slip = tokens == slip_id
    after_slip = torch.zeros_like(slip)
    after_slip[1:] = slip[:-1]
    line_start = torch.zeros_like(slip)
    offset = 0
    for response in rollouts.response_ids:
        line_start[offset] = True
        for i in range(1, len(response)):
            line_start[offset + i] = response[i - 1] == newline_id
        offset += len(response)
    profile = ScratchpadProfile()
    for response, index in zip(rollouts.response_ids, rollouts.prompt_index):
        profile.add(tokenizer.decode(response, skip_special_tokens=True), problems[index].expression)
    return {
        "prompts": prompts, "samples_per_prompt": samples, "temperature": 1.0, "tokens": logprobs.numel(),
        "mean_response_tokens": round(logprobs.numel() / len(rollouts.response_ids), 1),
        "slip_line_rate": round(profile.slip_rate, 4), "format_coverage": round(profile.format_coverage, 3),
        "slip_token_fraction": float(slip.float().mean()),
        "slip_teacher_logprob": _quantiles(logprobs[slip]),
        "after_slip_teacher_logprob": _quantiles(logprobs[after_slip]),
        "other_teacher_logprob": _quantiles(logprobs[~slip & ~after_slip]),
        "below_minus_5_fraction": float((logprobs < -5).float().mean()),
        "below_minus_20_fraction": float((logprobs < -20).float().mean()),
        "teacher_entropy_line_start": _quantiles(entropy[line_start]),
        "teacher_entropy_elsewhere": _quantiles(entropy[~line_start]),
    }


def sampled_and_scored(teacher_folder: Path, student_folder: Path, tokenizer, difficulty: Difficulty,
                       prompts: int, samples: int, max_new_tokens: int, seed: int):
    """The student's temperature-1 samples of `prompts` training-split problems and the teacher's scores of
    them: (problems, rollouts, teacher stats with top-1)."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_folder).eval()
    student = AutoModelForCausalLM.from_pretrained(student_folder).eval()
    rng = random.Random(seed)
    problems = []
    while len(problems) < prompts:
        problem = random_problem(rng, difficulty)
        if not is_held_out(problem.expression):
            problems.append(problem)
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in problems]
    rollouts = make_rollout_backend("hf", student, tokenizer.pad_token_id, [tokenizer.eos_token_id]).generate(
        prompt_ids, samples, SamplingParams(max_new_tokens, 1.0, 1.0), seed)
    batch = build_sequences([prompt_ids[i] for i in rollouts.prompt_index], rollouts.response_ids,
                            tokenizer.pad_token_id)
    return problems, rollouts, score_teacher(teacher, batch, top_k=1, chunk_size=1024)


def outlier_statistics(folder: Path, tokenizer, prompts: int = 128, seed: int = 0) -> dict:
    """How often the student samples (temperature 1) tokens the teacher finds implausible."""
    _, _, scored = sampled_and_scored(folder / "teacher", folder / "student", tokenizer, Difficulty(), prompts, 4,
                                      EVAL["max_new_tokens"], seed)
    teacher_logprobs = scored.logprobs
    return {
        "prompts": prompts, "samples_per_prompt": 4, "temperature": 1.0, "tokens": teacher_logprobs.numel(),
        "implausible_logprob": IMPLAUSIBLE_LOGPROB,
        "implausible_fraction": float((teacher_logprobs < IMPLAUSIBLE_LOGPROB).float().mean()),
        "below_minus_10_fraction": float((teacher_logprobs < -10).float().mean()),
        "min_teacher_logprob": float(teacher_logprobs.min()),
    }
