"""The paper's Table 1 comparison on the toy lab: every objective, over seeds, at two mismatch levels.

The paper (arXiv 2606.01249, Table 1) reports OPD 46.79, clip outliers 47.86, mask outliers 47.72, FKL
outliers 49.00, TrOPD 49.85 and top-k FKL alone 1.40. This script runs the same ablation in the toy lab with
the `toylab` preset's budget (100 steps of 16 prompts x 4 rollouts, 300 held-out problems graded greedily,
i.e. avg@1), over seeds 0, 1, 2, for two teacher-student mismatch levels, and writes:

- ablation.md: one table per level in the shape of Table 1, the claims checked, the command and wall time;
- ablation.json: every number, including each run's accuracy and grad-norm curves;
- ablation-<level>.png: held-out accuracy and grad norm over steps, mean over seeds, one line per method.

Every run goes through `tropd_cli.distill.distill` with one torch thread; run folders live under
--work-dir, out of git. A run whose summary.json says finished (or failed) with the same chosen settings
(preset keys and overrides) is reused, so an interrupted comparison resumes where it stopped.

    .venv/bin/python bench/ablation.py                                # full comparison -> bench/results/
    .venv/bin/python bench/ablation.py --quick --out /tmp/ablation    # smoke test: 1 seed, 4 tiny steps
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from ablation_report import write_report  # noqa: E402
from common import (  # noqa: E402
    Method,
    check_folders,
    command_line,
    comparison_parser,
    execute,
    folders,
    mean_std,
    read_json,
    read_metrics,
    reusable_summary,
    run_reporting_errors,
)

from tropd_cli.config import load_config  # noqa: E402
from tropd_cli.environment import describe as describe_environment  # noqa: E402
from tropd_cli.files import atomic_folder, atomic_write_json  # noqa: E402
from tropd_cli.models import TOYLAB_ASSETS, load_tokenizer  # noqa: E402
from tropd_cli.toylab.build import RECIPES, outlier_statistics  # noqa: E402
from tropd_cli.toylab.models import new_toy_model  # noqa: E402
from tropd_cli.toylab.sft import train_sft  # noqa: E402
from tropd_cli.toylab.tasks import Difficulty  # noqa: E402

PRESET = "toylab"
WORK_DIR = "/tmp/tropd-ablation"  # run folders by default (WORK_DIR-quick with --quick)
SPIKE_FACTOR = 5.0  # a grad-norm spike: a step whose pre-clip norm exceeds 5x its run's median
TAIL_STEPS = 10  # "final" trust fraction and response length: mean over the last 10 steps

METHODS = (
    Method("opd", "OPD", ("objective.name=opd",), 46.79),
    Method("tropd_mask", "TrOPD, mask outliers", ("objective.name=tropd", "objective.outlier=mask"), 47.72),
    Method("tropd_clip", "TrOPD, clip outliers", ("objective.name=tropd", "objective.outlier=clip"), 47.86),
    Method("tropd_fkl", "TrOPD, FKL outliers", ("objective.name=tropd", "objective.outlier=fkl"), 49.00),
    Method("tropd", "TrOPD, FKL outliers + guidance",
           ("objective.name=tropd", "objective.outlier=fkl", "objective.guidance=true"), 49.85),
    Method("fkl_topk", "top-k FKL alone", ("objective.name=fkl_topk",), 1.40),
    Method("eopd", "EOPD", ("objective.name=eopd",), None),
    Method("reopold", "REOPOLD", ("objective.name=reopold",), 47.86),
    Method("gkd", "GKD (JSD, beta 0.5)", ("objective.name=gkd", "objective.gkd_beta=0.5"), 47.90),
    Method("entropy_opd", "entropy OPD (top 20%)", ("objective.name=entropy_opd",), 46.13),
)
METHOD_BY_KEY = {method.key: method for method in METHODS}


@dataclass(frozen=True)
class Level:
    """A teacher-student mismatch level: the shipped pair, or the teacher with a rebuilt student."""

    key: str
    label: str
    description: str
    student_recipe: dict | None  # None: the shipped toylab:student


WIDE_RECIPE = dict(RECIPES["student"], shortcut_rate=0.8)
LEVELS = (
    Level("shipped", "shipped pair", "toylab:teacher and toylab:student as shipped (student recipe "
          "shortcut_rate 0.5: half of its SFT solutions skip the scratchpad).", None),
    Level("wide", "wider mismatch", "toylab:teacher and a student rebuilt with the shipped student recipe "
          "except shortcut_rate 0.8: 80% of its SFT solutions skip the scratchpad.", WIDE_RECIPE),
)

LEVEL_CHOICE = """\
The second level was fixed before any comparison run and never re-tuned: the student is rebuilt with the
shipped recipe except `shortcut_rate` 0.8 instead of 0.5. Reasons: (1) in the toy lab the deficit that
on-policy losses repair within minutes is behavioural (skipping the scratchpad), not missing arithmetic
facts, so widening exactly that deficit widens the mismatch in a way every method can act on; (2) more
shortcut answers mean more tokens the teacher finds implausible (an `answer` where the teacher starts a
line, wrong results), the outliers the paper's claims are about. Harder tasks through `data.toylab` were
ruled out by checking the models alone, before any distillation: at 5-7 terms the teacher solves 33% of
300 held-out problems (it was trained on 3-5 terms), so that level would measure a failing teacher rather
than a wider gap; at 4-5 terms the teacher stays at 100% but the student's per-token behaviour is the same
as at the shipped level (it only starts lower, 28% vs 37%)."""

# Changes to the protocol made after the first full run was started, with their reasons.
CHANGES_AFTER_FIRST_RUN: tuple[str, ...] = (
    "Report only, no run repeated or changed: added the claim 'top-k FKL alone ends below OPD'. At the wider "
    "level every method fell below its start, so 'falls below the start' alone cannot tell a collapse of "
    "top-k FKL from the level's general decline.",
    "Report only: added the median grad norm column. Spikes are counted against each run's own median, and "
    "OPD's median is high, so the spike count alone hides how large OPD's norms are throughout.",
    "The first full run (2026-11-26, 16:35 UTC, 60 runs in 50.8 min) was followed by an invocation meant "
    "only to redraw its report, which re-executed 14 runs because the reuse test compared whole resolved "
    "configurations and the code base had gained configuration fields; those were discarded (they had "
    "ended within 4.3 points of the first run's accuracies, 5 of them equal), and the reuse test now "
    "compares only the settings the comparison chooses (preset keys and overrides).",
    "This report is a complete re-run (all 60 runs, a fresh work folder, one code version) after engine "
    "changes that alter numerics only: fused AdamW, the student head as one autograd node, micro-batches "
    "sorted by length. The first run's report is in the git history of bench/results/; its shipped-level "
    "means were OPD 47.8, mask 58.2, clip 49.9, FKL outliers 53.7, TrOPD 51.9, top-k FKL 61.2, EOPD 49.0, "
    "REOPOLD 51.2, GKD 58.3, entropy OPD 47.8.",
)

PAIRWISE_CLAIMS = (
    ("TrOPD beats OPD", "tropd", "opd"),
    ("TrOPD beats EOPD", "tropd", "eopd"),
    ("TrOPD beats REOPOLD", "tropd", "reopold"),
    ("TrOPD beats GKD", "tropd", "gkd"),
    ("masking outliers beats OPD", "tropd_mask", "opd"),
    ("clipping outliers beats OPD", "tropd_clip", "opd"),
    ("FKL outliers beat masking", "tropd_fkl", "tropd_mask"),
    ("FKL outliers beat clipping", "tropd_fkl", "tropd_clip"),
    ("guidance adds to FKL outliers", "tropd", "tropd_fkl"),
    ("top-k FKL alone ends below OPD", "opd", "fkl_topk"),
)


@dataclass(frozen=True)
class Budget:
    """Seeds and the overrides on top of the preset that set the size of the comparison."""

    name: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    student_steps: int | None  # SFT steps of a rebuilt student; None: the recipe's own


COMMON_OVERRIDES = ("train.threads=1", "output.save_model=false")
FULL = Budget("full", (0, 1, 2), ("eval.every=10",), None)
QUICK = Budget("quick", (0,), ("train.steps=4", "rollout.prompts_per_step=4", "rollout.n=2",
                               "eval.problems=20", "eval.every=2"), 30)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the comparison, write the report; user errors exit 2 in one line."""
    args = comparison_parser(__doc__.split("\n\n")[0], WORK_DIR).parse_args(argv)
    work_dir, out = folders(args, WORK_DIR)
    command = command_line("bench/ablation.py", argv)
    return run_reporting_errors(lambda: run_comparison(QUICK if args.quick else FULL, work_dir, out, command))


def run_comparison(budget: Budget, work_dir: Path, out: Path, command: str) -> dict:
    """Run every level x seed x method (seed-major, so a partial comparison stays balanced), then report."""
    check_folders(work_dir, out)
    torch.set_num_threads(1)
    started = time.perf_counter()
    students = {level.key: prepare_student(level, budget, work_dir) for level in LEVELS}
    ledger_path = work_dir / "wall_seconds.json"
    ledger = read_json(ledger_path, {})
    runs: dict[str, dict[str, list[dict]]] = {level.key: {m.key: [] for m in METHODS} for level in LEVELS}
    invocations_path = work_dir / "invocations.json"
    earlier = read_json(invocations_path, [])
    this = {"budget": budget.name, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_seconds": 0.0,
            "runs_executed": 0, "runs_reused": 0}
    total, done, reused = len(LEVELS) * len(budget.seeds) * len(METHODS), 0, 0
    for seed in budget.seeds:
        for level in LEVELS:
            for method in METHODS:
                done += 1
                overrides = run_overrides(budget, students[level.key]["model"], method, seed)
                run_dir = work_dir / budget.name / level.key / f"{method.key}-seed{seed}"
                name = f"{budget.name}/{level.key}/{method.key}-seed{seed}"
                summary = reusable_summary(run_dir, overrides, PRESET)
                note = ", reused"
                if summary is None:
                    note = ""
                    run_started = time.perf_counter()
                    summary = execute(load_config(PRESET, overrides), run_dir, PRESET)
                    ledger[name] = round(time.perf_counter() - run_started, 1)
                    atomic_write_json(ledger_path, ledger)
                else:
                    reused += 1
                stats = run_stats(summary, read_metrics(run_dir), ledger.get(name))
                runs[level.key][method.key].append(stats)
                print(f"[{done}/{total}] {level.key:7s} {method.key:11s} seed {seed}: {describe(stats)}{note}",
                      flush=True)
        this.update(wall_seconds=round(time.perf_counter() - started, 1), runs_executed=done - reused,
                    runs_reused=reused)
        invocations = [entry for entry in earlier if entry["budget"] == budget.name] + [this]
        report = build_report(budget, students, runs, command, invocations)
        write_report(report, out)
    atomic_write_json(invocations_path, [*earlier, this])
    return report


def method_overrides(method: Method, steps: int) -> list[str]:
    """The method's overrides; REOPOLD switches from the reward floor to entropy selection at half the run,
    as the schema's default T_switch of 100 belongs to the paper's 200-step schedule."""
    if method.key == "reopold":
        return [*method.overrides, f"objective.reopold_switch_step={steps // 2}"]
    return list(method.overrides)


def run_overrides(budget: Budget, student_model: str, method: Method, seed: int) -> list[str]:
    """The settings on top of the preset: the budget, the method's objective, the level's student, the seed."""
    steps = load_config(PRESET, list(budget.overrides)).train.steps
    return [*COMMON_OVERRIDES, *budget.overrides, *method_overrides(method, steps), f"student.model={student_model}",
            f"train.seed={seed}"]


def prepare_student(level: Level, budget: Budget, work_dir: Path) -> dict:
    """The level's student model spec, recipe, and how often its samples contain teacher outliers."""
    tokenizer = load_tokenizer("toylab:teacher")
    if level.student_recipe is None:
        folder, model = TOYLAB_ASSETS, "toylab:student"
        recipe = json.loads((TOYLAB_ASSETS / "manifest.json").read_text())["models"]["student"]["recipe"]
        statistics_path = work_dir / "students" / f"outliers-{level.key}.json"
    else:
        recipe = dict(level.student_recipe)
        if budget.student_steps is not None:
            recipe["steps"] = budget.student_steps
        folder = work_dir / "students" / "-".join(f"{k}{v}" for k, v in sorted(recipe.items()))
        model, statistics_path = str(folder / "student"), folder / "outliers.json"
        if not (folder / "recipe.json").is_file():
            print(f"building the {level.key} student: {recipe}", flush=True)
            build_student(folder, recipe, tokenizer)
    if statistics_path.is_file():
        outliers = json.loads(statistics_path.read_text())
    else:
        outliers = outlier_statistics(folder, tokenizer)
        atomic_write_json(statistics_path, outliers)
    return {"model": model, "recipe": recipe, "outliers": outliers}


def build_student(folder: Path, recipe: dict, tokenizer) -> None:
    """Train a toy student by SFT with `recipe` (RECIPES format) and save it beside a link to the teacher."""
    started = time.perf_counter()
    model = new_toy_model(recipe["size"], recipe["seed"])
    train_sft(model, tokenizer, Difficulty(), recipe["steps"], recipe["batch_size"], recipe["lr"], recipe["seed"],
              warmup=recipe["warmup"], error_rate=recipe["error_rate"], shortcut_rate=recipe["shortcut_rate"])

    def fill(target: Path) -> None:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    atomic_folder(folder / "student", fill)
    teacher_link = folder / "teacher"
    if not teacher_link.exists():
        teacher_link.symlink_to(TOYLAB_ASSETS / "teacher", target_is_directory=True)
    atomic_write_json(folder / "recipe.json", {"recipe": recipe, "build_seconds": round(time.perf_counter() -
                                                                                         started, 1)})


def run_stats(summary: dict, records: list[dict], wall_seconds: float | None) -> dict:
    """Accuracy, stability and length numbers of one run, with its curves for the plots."""
    grad_norms = [r["grad_norm"] for r in records]
    median = statistics.median(grad_norms) if grad_norms else math.nan
    tail = records[-TAIL_STEPS:]
    trust = [r["trust_fraction"] for r in tail if "trust_fraction" in r]
    # gkd's off-policy steps train on teacher samples: their lengths are the teacher's, not the student's
    lengths = [r["response_length"] for r in tail if r.get("on_policy", 1.0) == 1.0]
    before, after = summary.get("student_accuracy_before"), summary.get("student_accuracy_after")
    curve = [[0, before]] if before is not None else []
    curve += [[r["step"], r["eval_accuracy"]] for r in records if "eval_accuracy" in r]
    return {
        "seed": summary["seed"],
        "status": summary["status"],
        "error": summary.get("error"),
        "steps_done": summary["steps_done"],
        "teacher_accuracy": summary.get("teacher_accuracy"),
        "accuracy_before": before,
        "accuracy_after": after,
        "gain": after - before if after is not None and before is not None else None,
        "max_grad_norm": max(grad_norms, default=math.nan),
        "median_grad_norm": median,
        "spikes": sum(g > SPIKE_FACTOR * median for g in grad_norms),
        "final_trust_fraction": statistics.fmean(trust) if trust else None,
        "response_length": statistics.fmean(lengths) if lengths else None,
        "train_seconds": summary.get("train_seconds"),
        "wall_seconds": wall_seconds,
        "accuracy_curve": curve,
        "grad_norm_curve": grad_norms,
    }


def describe(stats: dict) -> str:
    if stats["status"] != "finished":
        return f"{stats['status']} at step {stats['steps_done']}: {stats['error']}"
    wall = f", {stats['wall_seconds']:.0f}s" if stats["wall_seconds"] is not None else ""
    return (f"accuracy {100 * stats['accuracy_before']:.1f}% -> {100 * stats['accuracy_after']:.1f}%, "
            f"max grad norm {stats['max_grad_norm']:.2f}{wall}")


def aggregate(runs: list[dict]) -> dict:
    """One method's row: means and sample standard deviations over its finished seeds."""
    finished = [r for r in runs if r["status"] == "finished"]
    after_mean, after_std = mean_std([r["accuracy_after"] for r in finished])
    gain_mean, gain_std = mean_std([r["gain"] for r in finished])
    trust = [r["final_trust_fraction"] for r in finished if r["final_trust_fraction"] is not None]
    lengths = [r["response_length"] for r in finished if r["response_length"] is not None]
    return {
        "runs": len(runs),
        "finished": len(finished),
        "accuracy_after_mean": after_mean,
        "accuracy_after_std": after_std,
        "gain_mean": gain_mean,
        "gain_std": gain_std,
        "max_grad_norm": max((r["max_grad_norm"] for r in runs), default=None),
        "median_grad_norm": statistics.fmean(r["median_grad_norm"] for r in runs) if runs else None,
        "spikes": sum(r["spikes"] for r in runs),
        "final_trust_fraction": statistics.fmean(trust) if trust else None,
        "response_length": statistics.fmean(lengths) if lengths else None,
        "seeds": runs,
    }


def pairwise_claim(title: str, better: list[dict], worse: list[dict]) -> dict:
    """Paired by seed: the held-out accuracy difference, its standard error, and a verdict.

    holds: every seed agrees and the mean difference exceeds 2 standard errors; reversed: the same the
    other way; otherwise not resolved. With 3 seeds this is a loose test (a t-test at 95% needs 4.3 SE).
    """
    after = {r["seed"]: r["accuracy_after"] for r in worse if r["status"] == "finished"}
    diffs = [100 * (r["accuracy_after"] - after[r["seed"]]) for r in better
             if r["status"] == "finished" and r["seed"] in after]
    if not diffs:
        return {"claim": title, "differences": [], "shown": "—", "mean": None, "se": None,
                "verdict": "no finished pair"}
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    if all(d > 0 for d in diffs) and mean > 2 * se:
        verdict = "holds"
    elif all(d < 0 for d in diffs) and -mean > 2 * se:
        verdict = "reversed"
    else:
        verdict = "not resolved"
    return {"claim": title, "differences": diffs, "shown": ", ".join(f"{d:+.1f}" for d in diffs), "mean": mean,
            "se": se, "verdict": verdict}


def level_claims(methods: dict[str, dict]) -> list[dict]:
    """The paper's claims checked on one level's rows."""
    claims = [pairwise_claim(title, methods[a]["seeds"], methods[b]["seeds"]) for title, a, b in PAIRWISE_CLAIMS]
    gains = [100 * r["gain"] for r in methods["fkl_topk"]["seeds"] if r["status"] == "finished"]
    failed = sum(r["status"] != "finished" for r in methods["fkl_topk"]["seeds"])
    collapsed = failed > 0 or (bool(gains) and max(gains) < 0)
    claims.append({"claim": "top-k FKL alone collapses (accuracy falls below the start on every seed)",
                   "differences": gains, "shown": ", ".join(f"{g:+.1f}" for g in gains) + f" ({failed} failed)",
                   "mean": statistics.fmean(gains) if gains else None, "se": None,
                   "verdict": "holds" if collapsed else "does not hold"})
    opd, tropd = methods["opd"], methods["tropd"]
    claims.append({"claim": f"OPD has more grad-norm spikes (> {SPIKE_FACTOR:g}x the run's median) than TrOPD",
                   "differences": [opd["spikes"], tropd["spikes"]],
                   "shown": f"OPD {opd['spikes']}, TrOPD {tropd['spikes']}", "mean": None, "se": None,
                   "verdict": "holds" if opd["spikes"] > tropd["spikes"] else "does not hold"})
    claims.append({"claim": "OPD's largest grad norm exceeds TrOPD's",
                   "differences": [opd["max_grad_norm"], tropd["max_grad_norm"]],
                   "shown": f"OPD {opd['max_grad_norm']:.2f}, TrOPD {tropd['max_grad_norm']:.2f}", "mean": None,
                   "se": None,
                   "verdict": "holds" if opd["max_grad_norm"] > tropd["max_grad_norm"] else "does not hold"})
    return claims


def build_report(budget: Budget, students: dict, runs: dict, command: str, invocations: list[dict]) -> dict:
    """Everything the report shows, as plain data."""
    levels = {}
    for level in LEVELS:
        methods = {key: aggregate(seed_runs) for key, seed_runs in runs[level.key].items() if seed_runs}
        finished = [r for rows in methods.values() for r in rows["seeds"] if r["status"] == "finished"]
        levels[level.key] = {
            "label": level.label,
            "description": level.description,
            "student": students[level.key],
            "teacher_accuracy": finished[0]["teacher_accuracy"] if finished else None,
            "student_accuracy_before": finished[0]["accuracy_before"] if finished else None,
            "methods": methods,
            "claims": level_claims(methods) if len(methods) == len(METHODS) else [],
        }
    config = load_config(PRESET, [*COMMON_OVERRIDES, *budget.overrides])
    run_seconds = [r["wall_seconds"] for lv in levels.values() for m in lv["methods"].values() for r in m["seeds"]
                   if r["wall_seconds"] is not None]
    return {
        "command": command,
        "budget": budget.name,
        "seeds": list(budget.seeds),
        "preset": PRESET,
        "overrides": [*COMMON_OVERRIDES, *budget.overrides],
        "steps": config.train.steps,
        "prompts_per_step": config.rollout.prompts_per_step,
        "rollouts_per_prompt": config.rollout.n,
        "eval": config.eval.model_dump(),
        "spike_factor": SPIKE_FACTOR,
        "tail_steps": TAIL_STEPS,
        "invocations": invocations,
        "wall_seconds": round(sum(entry["wall_seconds"] for entry in invocations), 1),
        "run_wall_seconds_total": round(sum(run_seconds), 1),
        "runs_reused": invocations[-1]["runs_reused"],
        "torch": torch.__version__,
        "environment": describe_environment("cpu"),
        "threads": config.train.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "level_choice": LEVEL_CHOICE,
        "changes_after_first_run": list(CHANGES_AFTER_FIRST_RUN),
        "methods": {m.key: {"label": m.label, "overrides": method_overrides(m, config.train.steps),
                            "paper_table1": m.paper}
                    for m in METHODS},
        "levels": levels,
    }


if __name__ == "__main__":
    sys.exit(main())
