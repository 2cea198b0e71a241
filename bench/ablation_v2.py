"""The toy lab v2 comparison: the paper's ablation rows on a mismatch of the paper's kind, with predictions
P0-P6 fixed before any run (bench/results/ablation-v2-predictions.md) and a verdict for each.

Toy lab v2's teacher writes each scratchpad line in one of three equally valid forms (real entropy); its
students write one form and slip with probability epsilon per line (a token the teacher never emits, then a
wrong value carried forward): rare, very implausible tokens that make answers wrong. Every method runs with
the `toylab-v2` preset (120 steps of 8 prompts x 4 rollouts, no warm-up, held-out sampled avg@4 and greedy
every 20 steps) over seeds 0, 1, 2 and epsilon in {0, 0.03, 0.1}, plus a learning-rate sweep and a deeper
teacher tail; two runs at a time, one torch thread each. Writes:

- ablation-v2.md: the predictions as written, each verdict with its numbers, one table per condition, the
  command and wall time;
- ablation-v2.json: every number, including each run's curves;
- ablation-v2-*.png: accuracy, grad norm, entropy and slip rate over steps, mean over seeds.

A run whose summary.json says finished (or failed) with the same chosen settings is reused, so an interrupted
comparison resumes where it stopped.

    .venv/bin/python bench/ablation_v2.py                               # full comparison -> bench/results/
    .venv/bin/python bench/ablation_v2.py --quick --out /tmp/ablation   # smoke test: 1 seed, 4 tiny steps
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from ablation_v2_report import write_report  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
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
from tropd_cli.errors import TropdError  # noqa: E402
from tropd_cli.files import atomic_write_json  # noqa: E402
from tropd_cli.models import TOYLAB_ASSETS  # noqa: E402
from tropd_cli.toylab.build import scale_teacher_logits, v2_student_name  # noqa: E402

PRESET = "toylab-v2"
WORK_DIR = "/tmp/tropd-ablation-v2"  # run folders by default (WORK_DIR-quick with --quick)
EPSILONS = (0.0, 0.03, 0.1)
BASE_LR = 1e-4
SWEEP_LRS = (3e-5, 3e-4)
TAIL_SCALE = 2.0
CONTROL = ("opd", "mask", "fkl")
TAIL_STEPS = 10  # "first" and "last" steps of a run's per-step curves (entropy, KL)
DEGRADE_POINTS = 5.0  # P6: final accuracy more than this below the run's best evaluation
PREDICTIONS = RESULTS / "ablation-v2-predictions.md"
# What changed after the first full invocation started, and why; no setting of any run changed.
CHANGES_AFTER_FIRST_RUN: tuple[str, ...] = (
    "The first invocation (87 runs, started 2026-12-01 23:11 UTC; its ledger entry carries its end time, "
    "00:03:57, as `started`, since fixed) ran every run and then failed while writing the report: a condition "
    "name holding `lr3e-05` was split at its dashes. The report code was fixed; no run was touched.",
    "Its next two invocations re-executed the 9 runs at lr 3e-5, because the reuse test compared the override "
    "`train.lr=3e-05`, which YAML reads as a string, with the stored float. Both times each of the 9 runs "
    "reproduced the first invocation's accuracy and grad-norm numbers exactly; the override is now written "
    "`3.0e-05`, so later invocations reuse them.",
)

METHODS = (
    Method("opd", "OPD", ("objective.name=opd",), 46.79),
    Method("mask", "TrOPD, mask outliers", ("objective.name=tropd", "objective.outlier=mask"), 47.72),
    Method("clip", "TrOPD, clip outliers", ("objective.name=tropd", "objective.outlier=clip"), 47.86),
    Method("fkl", "TrOPD, FKL outliers", ("objective.name=tropd", "objective.outlier=fkl"), 49.00),
    Method("fkl_guidance", "TrOPD, FKL outliers + guidance",
           ("objective.name=tropd", "objective.outlier=fkl", "objective.guidance=true"), 49.85),
    Method("topk_grad", "top-k FKL, differentiable", ("objective.name=fkl_topk", "objective.fkl_form=grad"), None),
    Method("topk_advantage", "top-k FKL alone (advantage form)",
           ("objective.name=fkl_topk", "objective.fkl_form=advantage"), 1.40),
    Method("jsd", "on-policy JSD (beta 0.5)", ("objective.name=jsd_onpolicy", "objective.jsd_beta=0.5"), 47.90),
    Method("reopold", "REOPOLD (two-stage)", ("objective.name=reopold", "objective.reopold_form=two_stage"), 36.89),
)
METHOD_BY_KEY = {method.key: method for method in METHODS}


@dataclass(frozen=True)
class Cell:
    """One condition of one method: the student's slip rate, the learning rate, the teacher's logit scale."""

    epsilon: float
    method: str
    lr: float = BASE_LR
    scale: float = 1.0

    @property
    def key(self) -> str:
        return f"e{self.epsilon:.2f}-lr{self.lr:g}-t{self.scale:g}-{self.method}"

    @property
    def condition(self) -> str:
        return f"e{self.epsilon:.2f}-lr{self.lr:g}-t{self.scale:g}"


def full_cells() -> list[Cell]:
    """Every condition of the pre-registered design."""
    cells = [Cell(0.0, method) for method in CONTROL]
    cells += [Cell(epsilon, method.key) for epsilon in EPSILONS[1:] for method in METHODS]
    cells += [Cell(0.1, method, lr=lr) for lr in SWEEP_LRS for method in CONTROL]
    cells += [Cell(0.1, method, scale=TAIL_SCALE) for method in ("opd", "fkl")]
    return cells


@dataclass(frozen=True)
class Budget:
    name: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    cells: tuple[Cell, ...]


COMMON_OVERRIDES = ("train.threads=1", "output.save_model=false", "train.grad_norm_split=true", "eval.teacher=false")
FULL = Budget("full", (0, 1, 2), (), tuple(full_cells()))
QUICK = Budget("quick", (0,), ("train.steps=4", "rollout.prompts_per_step=2", "rollout.n=2", "eval.problems=4",
                               "eval.every=2", "rollout.max_new_tokens=24"),
               tuple([Cell(0.0, "opd"), *(Cell(0.1, m.key) for m in METHODS), Cell(0.1, "opd", lr=3e-4),
                      Cell(0.1, "opd", scale=TAIL_SCALE)]))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the comparison, write the report; user errors exit 2 in one line."""
    parser = comparison_parser(__doc__.split("\n\n")[0], WORK_DIR)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    args = parser.parse_args(argv)
    work_dir, out = folders(args, WORK_DIR)
    command = command_line("bench/ablation_v2.py", argv)
    return run_reporting_errors(
        lambda: run_comparison(QUICK if args.quick else FULL, work_dir, out, command, max(1, args.jobs)),
        stopped_note="; finished runs are kept and reused next time")


def cell_overrides(budget: Budget, cell: Cell, seed: int, work_dir: Path, steps: int) -> list[str]:
    """The settings on top of the preset: budget, method, student, learning rate, teacher, seed (`steps`: the
    budget's train.steps)."""
    method = METHOD_BY_KEY[cell.method]
    extra = [f"objective.reopold_switch_step={steps // 2}"] if cell.method == "reopold" else []
    teacher = [f"teacher.model={scaled_teacher(work_dir, cell.scale)}"] if cell.scale != 1.0 else []
    return [*COMMON_OVERRIDES, *budget.overrides, *method.overrides, *extra, *teacher,
            f"student.model=toylab:{v2_student_name(cell.epsilon)}", f"train.lr={cell.lr:.1e}", f"train.seed={seed}"]
    # {lr:.1e} (3.0e-05): YAML reads 3e-05, without a dot, as a string, and a reused run's settings must compare equal


def scaled_teacher(work_dir: Path, scale: float) -> Path:
    """toylab:v2-teacher with its logits scaled by `scale` (the tail-depth knob), written once."""
    folder = work_dir / "teachers" / f"v2-teacher-x{scale:g}"
    if not (folder / "config.json").is_file():
        scale_teacher_logits(TOYLAB_ASSETS / "v2-teacher", folder, scale)
    return folder


def run_one(overrides: list[str], run_dir: str) -> dict:
    """One distillation in a worker process (one torch thread)."""
    torch.set_num_threads(1)
    return execute(load_config(PRESET, overrides), Path(run_dir), PRESET)


def run_comparison(budget: Budget, work_dir: Path, out: Path, command: str, jobs: int) -> dict:
    """Run every seed x cell (seed-major, so a partial comparison stays balanced), then report."""
    check_folders(work_dir, out)
    if not (TOYLAB_ASSETS / "v2-teacher" / "config.json").is_file():
        raise TropdError("toy lab v2 is not built; run: tropd toylab build --lab v2")
    torch.set_num_threads(1)
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    work_dir.mkdir(parents=True, exist_ok=True)
    for cell in budget.cells:
        if cell.scale != 1.0:
            scaled_teacher(work_dir, cell.scale)
    ledger_path = work_dir / "wall_seconds.json"
    ledger = read_json(ledger_path, {})
    steps = load_config(PRESET, list(budget.overrides)).train.steps

    def run_dir(cell: Cell, seed: int) -> Path:
        return work_dir / budget.name / cell.condition / f"{cell.method}-seed{seed}"

    todo, stats, reused = [], {}, 0
    for seed in budget.seeds:
        for cell in budget.cells:
            overrides = cell_overrides(budget, cell, seed, work_dir, steps)
            summary = reusable_summary(run_dir(cell, seed), overrides, PRESET)
            if summary is None:
                todo.append((cell, seed, overrides))
            else:
                stats[(cell, seed)] = run_stats(summary, read_metrics(run_dir(cell, seed)))
                reused += 1
    total = len(budget.seeds) * len(budget.cells)
    print(f"{total} runs: {reused} reused, {len(todo)} to run, {jobs} at a time", flush=True)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        pending = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                cell, seed, overrides = queue.pop(0)
                future = pool.submit(run_one, overrides, str(run_dir(cell, seed)))
                pending[future] = (cell, seed, time.perf_counter())
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                cell, seed, began = pending.pop(future)
                name = f"{cell.key}-seed{seed}"
                ledger[name] = round(time.perf_counter() - began, 1)
                atomic_write_json(ledger_path, ledger)
                stats[(cell, seed)] = run_stats(future.result(), read_metrics(run_dir(cell, seed)))
                print(f"[{len(stats)}/{total}] {cell.key} seed {seed}: {describe(stats[(cell, seed)])}, "
                      f"{ledger[name]:.0f}s", flush=True)
    runs: dict[str, dict[str, list[dict]]] = {}
    for cell in budget.cells:  # conditions and methods in the design's order, seeds ascending
        for seed in budget.seeds:
            runs.setdefault(cell.condition, {}).setdefault(cell.method, []).append(stats[(cell, seed)])
    invocations_path = work_dir / "invocations.json"
    invocations = read_json(invocations_path, [])
    invocations.append({"budget": budget.name, "started": started_at,
                        "wall_seconds": round(time.perf_counter() - started, 1), "runs_executed": len(todo),
                        "runs_reused": reused, "jobs": jobs})
    atomic_write_json(invocations_path, invocations)
    report = build_report(budget, runs, command, [i for i in invocations if i["budget"] == budget.name], ledger)
    write_report(report, out)
    return report


def run_stats(summary: dict, records: list[dict]) -> dict:
    """One run's numbers: evaluations over steps (0 = before training), grad-norm tail, entropy and KL trends."""
    evaluations = {0: summary.get("student_eval_before") or {}}
    for record in records:
        if "eval_accuracy" in record:
            evaluations[record["step"]] = {key[5:]: value for key, value in record.items() if key.startswith("eval_")}
    steps = sorted(evaluations)
    grad = [r["grad_norm"] for r in records if r.get("grad_norm") is not None]

    def trend(name: str) -> tuple[float | None, float | None]:
        values = [r[name] for r in records if r.get(name) is not None]
        if not values:
            return None, None
        return statistics.fmean(values[:TAIL_STEPS]), statistics.fmean(values[-TAIL_STEPS:])

    median = statistics.median(grad) if grad else math.nan
    p99 = float(torch.quantile(torch.tensor(grad, dtype=torch.float64), 0.99)) if grad else math.nan
    shares = [r["outlier_grad_share"] for r in records if r.get("outlier_grad_share") is not None]
    final = evaluations[steps[-1]] if steps else {}
    peak = max((evaluations[s]["accuracy"] for s in steps if s > 0 and "accuracy" in evaluations[s]), default=None)
    return {
        "seed": summary["seed"], "status": summary["status"], "error": summary.get("error"),
        "steps_done": summary["steps_done"],
        "start": evaluations[0].get("accuracy"), "final": final.get("accuracy") if len(steps) > 1 else None,
        "peak": peak,
        "start_greedy": evaluations[0].get("greedy_accuracy"), "final_greedy": final.get("greedy_accuracy"),
        "start_slip": evaluations[0].get("slip_rate"), "final_slip": final.get("slip_rate"),
        "coverage_start": evaluations[0].get("format_coverage"),
        "coverage_early": evaluations.get(steps[1] if len(steps) > 1 else 0, {}).get("format_coverage"),
        "coverage_final": final.get("format_coverage"),
        "median_grad_norm": median, "p99_grad_norm": p99, "max_grad_norm": max(grad, default=math.nan),
        "tail_ratio": p99 / median if median and median > 0 else math.nan,
        "outlier_grad_share": statistics.fmean(shares) if shares else None,
        "entropy_first": trend("student_entropy")[0], "entropy_last": trend("student_entropy")[1],
        "kl_first": trend("kl_k1")[0], "kl_last": trend("kl_k1")[1],
        "train_seconds": summary.get("train_seconds"),
        "curves": {
            "eval_steps": steps,
            "accuracy": [evaluations[s].get("accuracy") for s in steps],
            "greedy": [evaluations[s].get("greedy_accuracy") for s in steps],
            "slip": [evaluations[s].get("slip_rate") for s in steps],
            "coverage": [evaluations[s].get("format_coverage") for s in steps],
            "grad_norm": grad,
            "grad_norm_outlier": [r.get("grad_norm_outlier") for r in records],
            "student_entropy": [r.get("student_entropy") for r in records],
        },
    }


def describe(stats: dict) -> str:
    if stats["status"] != "finished":
        return f"{stats['status']} at step {stats['steps_done']}: {stats['error']}"
    return (f"sampled {100 * (stats['start'] or 0):.1f}% -> {100 * (stats['final'] or 0):.1f}%, grad norm median "
            f"{stats['median_grad_norm']:.2f} p99/median {stats['tail_ratio']:.1f}")


# ------------------------------------------------------------------------------------------------ verdicts


def paired(better: list[dict], worse: list[dict], field: str) -> dict:
    """better - worse per seed in points (finished runs of both), mean, SE and the holds / reversed / not
    resolved rule."""
    return verdict_of(list(differences_of(better, worse, field).values()))


def verdict_of(diffs: list[float]) -> dict:
    if not diffs:
        return {"diffs": [], "mean": None, "se": None, "verdict": "not resolved"}
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    verdict = "not resolved"
    if len(diffs) > 1 and mean > 2 * se and all(d > 0 for d in diffs):
        verdict = "holds"
    elif len(diffs) > 1 and mean < -2 * se and all(d < 0 for d in diffs):
        verdict = "reversed"
    return {"diffs": diffs, "mean": mean, "se": se, "verdict": verdict}


def combine(parts: list[dict]) -> str:
    verdicts = [part["verdict"] for part in parts]
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    if "reversed" in verdicts and "holds" not in verdicts:
        return "reversed"
    return "not resolved"


def threshold_part(title: str, values: list[float], above: float) -> dict:
    """A threshold claim on a mean over seeds: holds above it, reversed at or below it."""
    mean = statistics.fmean(values) if values else None
    verdict = "not resolved" if mean is None else ("holds" if mean > above else "reversed")
    return {"title": title, "values": values, "mean": mean, "verdict": verdict}


def differences_of(a: list[dict], b: list[dict], field: str) -> dict[int, float]:
    """100 x (a - b) of `field` per seed, over the seeds where both finished with a value."""
    other = {r["seed"]: r[field] for r in b if r["status"] == "finished" and r[field] is not None}
    return {r["seed"]: 100 * (r[field] - other[r["seed"]]) for r in a
            if r["status"] == "finished" and r[field] is not None and r["seed"] in other}


def predictions(runs: dict[str, dict[str, list[dict]]]) -> list[dict]:
    """P0-P6 as written in ablation-v2-predictions.md, each with its parts and verdict."""
    def cond(epsilon: float, lr: float = BASE_LR, scale: float = 1.0) -> dict[str, list[dict]]:
        return runs.get(Cell(epsilon, "opd", lr, scale).condition, {})

    def part(title: str, result: dict) -> dict:
        return {"title": title, **result}

    out = []
    control = cond(0.0)
    parts = []
    for method in ("mask", "fkl"):
        result = paired(control.get(method, []), control.get("opd", []), "final")
        agree = result["mean"] is not None and (abs(result["mean"]) <= 2 * result["se"] or abs(result["mean"]) < 2)
        verdict = "reversed" if result["verdict"] != "not resolved" else ("holds" if agree else "not resolved")
        parts.append(part(f"{method} - OPD at epsilon 0 (points)", {**result, "verdict": verdict}))
    p0 = "reversed" if any(p["verdict"] == "reversed" for p in parts) else combine(parts)
    out.append({"key": "P0", "parts": parts, "verdict": p0})  # reversed if either difference is resolved

    parts = []
    for epsilon in EPSILONS[1:]:
        here = cond(epsilon)
        ratios = [r["tail_ratio"] for r in here.get("opd", []) if r["status"] == "finished"]
        parts.append(threshold_part(f"(a) OPD p99/median grad norm at epsilon {epsilon:g}", ratios, 5.0))
        for method in ("mask", "fkl"):
            drop = {r["seed"]: r["entropy_first"] - r["entropy_last"] for r in here.get("opd", [])
                    if r["status"] == "finished" and r["entropy_first"] is not None}
            other = {r["seed"]: r["entropy_first"] - r["entropy_last"] for r in here.get(method, [])
                     if r["status"] == "finished" and r["entropy_first"] is not None}
            result = verdict_of([drop[s] - other[s] for s in drop if s in other])
            parts.append(part(f"(b) OPD's entropy drop - {method}'s at epsilon {epsilon:g} (nats)", result))
        parts.append(part(f"(c) fkl - OPD at epsilon {epsilon:g} (points)",
                          paired(here.get("fkl", []), here.get("opd", []), "final")))
    out.append({"key": "P1", "parts": parts, "verdict": combine(parts)})

    def gaps(condition: dict[str, list[dict]]) -> dict[int, float]:
        return differences_of(condition.get("fkl", []), condition.get("opd", []), "final")

    parts = []
    for low, high in ((0.0, 0.03), (0.03, 0.1)):
        g_low, g_high = gaps(cond(low)), gaps(cond(high))
        parts.append(part(f"gap at epsilon {high:g} - gap at {low:g} (points)",
                          verdict_of([g_high[s] - g_low[s] for s in g_high if s in g_low])))
    g_deep, g_base = gaps(cond(0.1, scale=TAIL_SCALE)), gaps(cond(0.1))
    parts.append(part(f"gap with teacher logits x{TAIL_SCALE:g} - gap at x1, epsilon 0.1 (points)",
                      verdict_of([g_deep[s] - g_base[s] for s in g_deep if s in g_base])))
    out.append({"key": "P2", "parts": parts, "verdict": combine(parts)})

    parts = []
    for epsilon in EPSILONS[1:]:
        here = cond(epsilon)
        parts.append(part(f"mask's final slip rate - fkl's at epsilon {epsilon:g} (points)",
                          paired(here.get("mask", []), here.get("fkl", []), "final_slip")))
        parts.append(part(f"fkl - mask at epsilon {epsilon:g} (points)",
                          paired(here.get("fkl", []), here.get("mask", []), "final")))
    out.append({"key": "P3", "parts": parts, "verdict": combine(parts)})

    parts = []
    for epsilon in EPSILONS[1:]:
        here = cond(epsilon)
        advantage = [r for r in here.get("topk_advantage", []) if r["status"] == "finished"]
        change = [100 * (r["final"] - r["start"]) for r in advantage if r["final"] is not None]
        mean = statistics.fmean(change) if change else None
        parts.append({"title": f"advantage form: final - start at epsilon {epsilon:g} (points, <= 0)",
                      "values": change, "mean": mean,
                      "verdict": "not resolved" if mean is None else ("holds" if mean <= 0 else "reversed")})
        growth = [r["kl_last"] - r["kl_first"] for r in advantage if r["kl_first"] is not None]
        parts.append({"title": f"advantage form: K1 KL last 10 steps - first 10 at epsilon {epsilon:g} (> 0 every "
                      "seed)", "values": growth, "mean": statistics.fmean(growth) if growth else None,
                      "verdict": "not resolved" if not growth else (
                          "holds" if all(g > 0 for g in growth) else
                          "reversed" if all(g <= 0 for g in growth) else "not resolved")})
        gradient = [r for r in here.get("topk_grad", []) if r["status"] == "finished" and r["final"] is not None]
        parts.append(part(f"differentiable form: final - start at epsilon {epsilon:g} (points)",
                          verdict_of([100 * (r["final"] - r["start"]) for r in gradient])))
    out.append({"key": "P4", "parts": parts, "verdict": combine(parts)})

    parts = []
    for epsilon in EPSILONS[1:]:
        here = cond(epsilon)
        parts.append(part(f"coverage at the first evaluation, fkl + guidance - fkl, epsilon {epsilon:g} (points)",
                          paired(here.get("fkl_guidance", []), here.get("fkl", []), "coverage_early")))
    out.append({"key": "P5", "parts": parts, "verdict": combine(parts)})

    lowest: dict[str, float] = {}
    details = []
    for method in CONTROL:
        lowest[method] = math.inf
        for lr in sorted((*SWEEP_LRS, BASE_LR)):
            seeds = cond(0.1, lr=lr).get(method, [])
            if not seeds:
                continue
            diverged = any(r["status"] != "finished" for r in seeds)
            finished = [r for r in seeds if r["status"] == "finished" and r["final"] is not None]
            final = statistics.fmean(r["final"] for r in finished) if finished else None
            peak = statistics.fmean(r["peak"] for r in finished) if finished else None
            degrades = diverged or (final is not None and 100 * (peak - final) > DEGRADE_POINTS)
            details.append({"method": method, "lr": lr, "final": final, "peak": peak, "diverged": diverged,
                            "degrades": degrades})
            if degrades and lr < lowest[method]:
                lowest[method] = lr
    others = [lowest["mask"], lowest["fkl"]]
    if not details:
        verdict = "not resolved"
    elif all(lowest["opd"] < other for other in others):
        verdict = "holds"
    elif any(lowest["opd"] > other for other in others):
        verdict = "reversed"
    else:
        verdict = "not resolved"
    out.append({"key": "P6", "parts": [{"title": "lowest degrading lr", "values": {
        m: (None if math.isinf(v) else v) for m, v in lowest.items()}, "verdict": verdict}],
        "sweep": details, "verdict": verdict})
    return out


def aggregate(seeds: list[dict]) -> dict:
    """A condition's row for one method: means (and sample std) over finished seeds."""
    finished = [r for r in seeds if r["status"] == "finished"]

    def mean(field: str) -> float | None:
        values = [r[field] for r in finished if r[field] is not None and not (isinstance(r[field], float)
                                                                               and math.isnan(r[field]))]
        return statistics.fmean(values) if values else None

    final_mean, final_std = mean_std([r["final"] for r in finished if r["final"] is not None])
    gain_mean, gain_std = mean_std([r["final"] - r["start"] for r in finished if r["final"] is not None])
    return {"runs": len(seeds), "finished": len(finished), "final_mean": final_mean, "final_std": final_std,
            "gain_mean": gain_mean, "gain_std": gain_std, "start": mean("start"),
            **{field: mean(field) for field in ("final_greedy", "start_greedy", "final_slip", "start_slip",
                                                "coverage_early", "coverage_final", "median_grad_norm",
                                                "tail_ratio", "outlier_grad_share", "entropy_first",
                                                "entropy_last", "max_grad_norm")},
            "seeds": seeds}


def build_report(budget: Budget, runs: dict, command: str, invocations: list[dict], ledger: dict) -> dict:
    student_manifest = json.loads((TOYLAB_ASSETS / "manifest-v2.json").read_text())
    return {
        "budget": budget.name, "preset": PRESET, "seeds": list(budget.seeds), "overrides": list(budget.overrides),
        "common_overrides": list(COMMON_OVERRIDES), "command": command, "invocations": invocations,
        "eval": load_config(PRESET, list(budget.overrides)).eval.model_dump(include={"problems", "k", "temperature",
                                                                                      "every"}),
        "run_seconds": round(sum(ledger.values()), 1),
        "environment": describe_environment("cpu"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "methods": [{"key": m.key, "label": m.label, "overrides": list(m.overrides), "paper": m.paper}
                    for m in METHODS],
        "lab": {"models": student_manifest.get("models", {}), "mismatch": student_manifest.get("mismatch", {})},
        "conditions": {condition: {method: aggregate(seeds) for method, seeds in by_method.items()}
                       for condition, by_method in runs.items()},
        "predictions_text": PREDICTIONS.read_text() if PREDICTIONS.is_file() else "",
        "changes_after_first_run": list(CHANGES_AFTER_FIRST_RUN) if budget.name == "full" else [],
        "predictions": predictions(runs),
    }


if __name__ == "__main__":
    sys.exit(main())
