"""The toy lab v3 comparison: the paper's claim in the paper's regime (a teacher that masters the task, a student
that fails on its own at temperature 1), with predictions P1-P4 and a validity gate fixed before any run
(bench/results/ablation-v3-predictions.md).

Two steps, in this order:

1. `--pilot`: OPD alone on the main pair (toylab:v3-teacher, toylab:v3-student) at each of PILOT_LRS, one seed
   outside the comparison's; the learning rate with the best final sampled avg@4 (the lower one on a tie) is the
   comparison's, chosen for the baseline. Writes ablation-v3-lr-pilot.json.
2. The comparison at that learning rate: on the main pair OPD, TrOPD with FKL outliers, with outliers masked, and
   the paper's clip row (REOPOLD's static floor on every token); OPD and FKL on the wide-gap student
   (toylab:v3-student-wide) and with the weak teacher (toylab:v3-teacher-weak) as a control. Five paired seeds,
   seed-major, two runs at a time; no run starts once WALL_BUDGET_S have passed (the pre-registered cut: the last
   seeds go first). Writes ablation-v3.md (the predictions as written, the validity gate, each verdict with its
   numbers, one table per pair), ablation-v3.json (every number and curve) and ablation-v3-*.png.

`--long` is the follow-up the 120-step comparison called for when its validity gate failed: 360 steps, the main
pair only, P1 and P3 (bench/results/ablation-v3-long-predictions.md), its own pilot, a 40-minute wall budget;
its files are ablation-v3-long*.

A run whose summary.json says finished (or failed) with the same chosen settings is reused.

    .venv/bin/python bench/ablation_v3.py --pilot                      # the learning rate -> bench/results/
    .venv/bin/python bench/ablation_v3.py                              # the comparison -> bench/results/
    .venv/bin/python bench/ablation_v3.py --long --pilot && .venv/bin/python bench/ablation_v3.py --long
    .venv/bin/python bench/ablation_v3.py --quick --out /tmp/v3        # smoke test: pilot and comparison, tiny
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
from ablation_v2 import aggregate, run_stats  # noqa: E402
from ablation_v3_report import write_report  # noqa: E402
from common import (  # noqa: E402
    RESULTS,
    Method,
    check_folders,
    command_line,
    comparison_parser,
    execute,
    folders,
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

PRESET = "toylab-v3"
WORK_DIR = "/tmp/tropd-ablation-v3"  # run folders by default (WORK_DIR-quick with --quick)
PILOT_LRS = (3e-5, 1e-4, 3e-4, 1e-3)
PILOT_SEED = 100  # not one of the comparison's seeds
WALL_BUDGET_S = 45 * 60  # no run starts after this many seconds of the invocation
VALIDITY_GAIN = 10.0  # points: OPD's mean gain on the main student for the lab to be in the paper's regime
EQUIVALENT = 2.0  # points: a difference below this, measured to 2 SE below it, is a null (equivalent)

METHODS = (
    Method("opd", "OPD", ("objective.name=opd",), 46.79),
    Method("fkl", "TrOPD, FKL outliers", ("objective.name=tropd", "objective.outlier=fkl"), 49.00),
    Method("mask", "TrOPD, mask outliers", ("objective.name=tropd", "objective.outlier=mask"), 47.72),
    Method("clip", "clip outliers (REOPOLD's static floor, every token)",
           ("objective.name=reopold", "objective.reopold_form=static_floor"), 47.86),
)
METHOD_BY_KEY = {method.key: method for method in METHODS}
PAIRS = {  # pair -> (teacher, student)
    "main": ("toylab:v3-teacher", "toylab:v3-student"),
    "wide": ("toylab:v3-teacher", "toylab:v3-student-wide"),
    "weak": ("toylab:v3-teacher-weak", "toylab:v3-student"),
}
DESIGN: tuple[tuple[str, tuple[str, ...]], ...] = (("main", ("opd", "fkl", "mask", "clip")),
                                                   ("wide", ("opd", "fkl")), ("weak", ("opd", "fkl")))
COMMON_OVERRIDES = ("train.threads=1", "output.save_model=false", "train.grad_norm_split=true", "eval.teacher=false")


@dataclass(frozen=True)
class Budget:
    """A comparison's budget: its seeds, settings, pilot rates, the pairs and methods it runs, the predictions it
    judges and the stem of its files in bench/results."""

    name: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    pilot_lrs: tuple[float, ...]
    design: tuple[tuple[str, tuple[str, ...]], ...] = DESIGN
    keys: tuple[str, ...] = ("P1", "P2", "P3", "P4")
    stem: str = "ablation-v3"
    flag: str = ""  # the command-line option that selects it
    wall_s: float = WALL_BUDGET_S  # no run starts after this many seconds of the invocation

    @property
    def predictions_file(self) -> Path:
        return RESULTS / f"{self.stem}-predictions.md"

    @property
    def pilot_file(self) -> str:
        return f"{self.stem}-lr-pilot.json"


FULL = Budget("full", (0, 1, 2, 3, 4), (), PILOT_LRS)
QUICK = Budget("quick", (0,), ("train.steps=4", "rollout.prompts_per_step=2", "rollout.n=2", "eval.problems=4",
                               "eval.every=2", "rollout.max_new_tokens=24"), (1e-4, 1e-3), flag=" --quick")
# The follow-up the 120-step comparison called for: three times the steps, the main pair only (P1 and P3), its
# learning rate again chosen by OPD alone, its predictions registered before it runs.
LONG = Budget("long", (0, 1, 2, 3, 4), ("train.steps=360", "eval.every=60"), (3e-5, 1e-4),
              design=(("main", ("opd", "fkl", "mask", "clip")),), keys=("P1", "P3"), stem="ablation-v3-long",
              flag=" --long", wall_s=40 * 60)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the pilot or the comparison; user errors exit 2 in one line."""
    parser = comparison_parser(__doc__.split("\n\n")[0], WORK_DIR)
    parser.add_argument("--pilot", action="store_true", help="choose the learning rate with OPD alone")
    parser.add_argument("--long", action="store_true", help="the follow-up: 360 steps, the main pair only")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each (default 2)")
    args = parser.parse_args(argv)
    work_dir, out = folders(args, WORK_DIR)
    if args.quick and args.long:
        parser.error("--quick and --long exclude each other")
    budget = QUICK if args.quick else LONG if args.long else FULL
    command = command_line("bench/ablation_v3.py", argv)
    jobs = max(1, args.jobs)
    step = (lambda: run_pilot(budget, work_dir, out, command, jobs)) if args.pilot else \
        (lambda: run_comparison(budget, work_dir, out, command, jobs))
    return run_reporting_errors(step, stopped_note="; finished runs are kept and reused next time")


def overrides_for(budget: Budget, pair: str, method: str, lr: float, seed: int) -> list[str]:
    """The settings on top of the preset: budget, method, pair, learning rate and seed."""
    teacher, student = PAIRS[pair]
    return [*COMMON_OVERRIDES, *budget.overrides, *METHOD_BY_KEY[method].overrides, f"teacher.model={teacher}",
            f"student.model={student}", f"train.lr={lr:.1e}", f"train.seed={seed}"]
    # {lr:.1e} (3.0e-05): YAML reads 3e-05, without a dot, as a string, and a reused run's settings must compare equal


def run_one(overrides: list[str], run_dir: str) -> dict:
    """One distillation in a worker process (one torch thread)."""
    torch.set_num_threads(1)
    return execute(load_config(PRESET, overrides), Path(run_dir), PRESET)


def run_all(todo: list[tuple[str, list[str], Path]], jobs: int, ledger_path: Path, deadline: float | None,
            on_done) -> list[str]:
    """Run each (name, overrides, run folder) of `todo` in order, `jobs` at a time; none starts after `deadline`
    (perf_counter seconds). `on_done(name, summary)` is called as each finishes. Returns the names not started."""
    ledger = read_json(ledger_path, {})
    context = multiprocessing.get_context("spawn")
    queue = list(todo)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        pending = {}
        while queue or pending:
            while queue and len(pending) < jobs and (deadline is None or time.perf_counter() < deadline):
                name, overrides, run_dir = queue.pop(0)
                pending[pool.submit(run_one, overrides, str(run_dir))] = (name, time.perf_counter())
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                name, began = pending.pop(future)
                ledger[name] = round(time.perf_counter() - began, 1)
                atomic_write_json(ledger_path, ledger)
                on_done(name, future.result())
    return [name for name, _, _ in queue]


def check_lab() -> None:
    for name in ("v3-teacher", "v3-teacher-weak", "v3-student", "v3-student-wide"):
        if not (TOYLAB_ASSETS / name / "config.json").is_file():
            raise TropdError("toy lab v3 is not built; run: tropd toylab build --lab v3")


# ------------------------------------------------------------------------------------------------ the pilot


def run_pilot(budget: Budget, work_dir: Path, out: Path, command: str, jobs: int) -> dict:
    """OPD on the main pair at each pilot learning rate; the chosen one is the best final sampled accuracy."""
    check_folders(work_dir, out)
    check_lab()
    torch.set_num_threads(1)
    started = time.perf_counter()
    work_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[float, dict] = {}
    todo, by_name = [], {}
    for lr in budget.pilot_lrs:
        overrides = overrides_for(budget, "main", "opd", lr, PILOT_SEED)
        run_dir = work_dir / budget.name / "pilot" / f"opd-lr{lr:g}-seed{PILOT_SEED}"
        summary = reusable_summary(run_dir, overrides, PRESET)
        if summary is None:
            todo.append((f"pilot-lr{lr:g}", overrides, run_dir))
            by_name[f"pilot-lr{lr:g}"] = (lr, run_dir)
        else:
            stats[lr] = run_stats(summary, read_metrics(run_dir))
    print(f"pilot: {len(budget.pilot_lrs)} runs, {len(todo)} to run", flush=True)

    def done(name: str, summary: dict) -> None:
        lr, run_dir = by_name[name]
        stats[lr] = run_stats(summary, read_metrics(run_dir))
        print(f"pilot lr {lr:g}: {describe(stats[lr])}", flush=True)

    run_all(todo, jobs, work_dir / "wall_seconds.json", None, done)
    chosen = choose_lr(stats)
    report = {"budget": budget.name, "preset": PRESET, "pair": list(PAIRS["main"]), "seed": PILOT_SEED,
              "command": command, "environment": describe_environment("cpu"),
              "overrides": overrides_for(budget, "main", "opd", chosen, PILOT_SEED), "chosen_lr": chosen,
              "rule": "the learning rate with the highest final sampled avg@4 of OPD; the lower one on a tie",
              "wall_seconds": round(time.perf_counter() - started, 1),
              "runs": {f"{lr:g}": {key: value for key, value in stats[lr].items() if key != "curves"}
                       | {"accuracy_curve": stats[lr]["curves"]["accuracy"],
                          "greedy_curve": stats[lr]["curves"]["greedy"],
                          "eval_steps": stats[lr]["curves"]["eval_steps"]}
                       for lr in sorted(stats)}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / budget.pilot_file, report)
    print(f"chosen learning rate: {chosen:g}", flush=True)
    return report


def choose_lr(stats: dict[float, dict]) -> float:
    """The learning rate whose finished run ends with the highest sampled accuracy (the lower on a tie)."""
    finished = {lr: s["final"] for lr, s in stats.items() if s["status"] == "finished" and s["final"] is not None}
    if not finished:
        raise TropdError("no pilot run finished; see the run folders' summary.json")
    best = max(finished.values())
    return min(lr for lr, final in finished.items() if final == best)


def pilot_lr(out: Path, budget: Budget) -> float:
    """The learning rate the pilot chose, read from its JSON in `out`."""
    path = out / budget.pilot_file
    if not path.is_file():
        raise TropdError(f"no learning-rate pilot in {out}; run first: .venv/bin/python bench/ablation_v3.py "
                         f"--pilot{budget.flag} --out {out}")
    return float(json.loads(path.read_text())["chosen_lr"])


# ------------------------------------------------------------------------------------------- the comparison


def cells(budget: Budget) -> list[tuple[int, str, str]]:
    """(seed, pair, method) in the order they run: seed-major, so a cut takes the last seeds first."""
    return [(seed, pair, method) for seed in budget.seeds for pair, methods in budget.design for method in methods]


def run_comparison(budget: Budget, work_dir: Path, out: Path, command: str, jobs: int) -> dict:
    """Run every seed x pair x method at the pilot's learning rate (or until the wall budget), then report."""
    check_folders(work_dir, out)
    check_lab()
    failed = [name for name, gate in json.loads((TOYLAB_ASSETS / "manifest-v3.json").read_text())
              .get("gates", {}).items() if not gate["pass"]]
    if budget is not QUICK and failed:  # --quick is a smoke test of the code, whatever the shipped pair
        raise TropdError(f"the v3 pair fails its gates ({', '.join(failed)}; manifest-v3.json): no comparison runs")
    lr = pilot_lr(out, budget)
    torch.set_num_threads(1)
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    work_dir.mkdir(parents=True, exist_ok=True)

    def run_dir(seed: int, pair: str, method: str) -> Path:
        return work_dir / budget.name / pair / f"{method}-lr{lr:g}-seed{seed}"

    todo, stats, reused = [], {}, 0
    names = {}
    for seed, pair, method in cells(budget):
        overrides = overrides_for(budget, pair, method, lr, seed)
        summary = reusable_summary(run_dir(seed, pair, method), overrides, PRESET)
        name = f"{pair}-{method}-seed{seed}"
        names[name] = (seed, pair, method)
        if summary is None:
            todo.append((name, overrides, run_dir(seed, pair, method)))
        else:
            stats[(seed, pair, method)] = run_stats(summary, read_metrics(run_dir(seed, pair, method)))
            reused += 1
    total = len(names)
    print(f"{total} runs at lr {lr:g}: {reused} reused, {len(todo)} to run, {jobs} at a time", flush=True)

    def done(name: str, summary: dict) -> None:
        seed, pair, method = names[name]
        stats[(seed, pair, method)] = run_stats(summary, read_metrics(run_dir(seed, pair, method)))
        print(f"[{len(stats)}/{total}] {pair} {method} seed {seed}: {describe(stats[(seed, pair, method)])}",
              flush=True)

    cut = run_all(todo, jobs, work_dir / "wall_seconds.json", started + budget.wall_s, done)
    if cut:
        print(f"wall budget of {budget.wall_s / 60:.0f} min spent: {len(cut)} runs not started", flush=True)
    runs: dict[str, dict[str, list[dict]]] = {}
    for seed, pair, method in cells(budget):
        if (seed, pair, method) in stats:
            runs.setdefault(pair, {}).setdefault(method, []).append(stats[(seed, pair, method)])
    invocations_path = work_dir / f"invocations-{budget.name}.json"
    invocations = read_json(invocations_path, [])
    invocations.append({"started": started_at, "wall_seconds": round(time.perf_counter() - started, 1),
                        "runs_executed": len(todo) - len(cut), "runs_reused": reused, "runs_cut": cut,
                        "jobs": jobs})
    atomic_write_json(invocations_path, invocations)
    ledger = read_json(work_dir / "wall_seconds.json", {})
    report = build_report(budget, lr, runs, command, invocations, ledger, out)
    write_report(report, out)
    return report


def describe(stats: dict) -> str:
    if stats["status"] != "finished":
        return f"{stats['status']} at step {stats['steps_done']}: {stats['error']}"
    return (f"sampled {100 * (stats['start'] or 0):.1f}% -> {100 * (stats['final'] or 0):.1f}%, greedy "
            f"{100 * (stats['start_greedy'] or 0):.1f}% -> {100 * (stats['final_greedy'] or 0):.1f}%")


# ------------------------------------------------------------------------------------------------ verdicts


def verdict_of(diffs: list[float]) -> dict:
    """Paired differences in points: mean, SE = sd / sqrt(n) and the pre-registered rule: holds when
    mean > 2 SE and mean >= 2 points; reversed when mean < -2 SE and mean <= -2; equivalent when |mean| < 2 and
    2 SE < 2; otherwise not resolved (fewer than 3 seeds is never resolved)."""
    if len(diffs) < 3:
        mean = statistics.fmean(diffs) if diffs else None
        return {"diffs": diffs, "mean": mean, "se": None, "verdict": "not resolved"}
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    if mean > 2 * se and mean >= EQUIVALENT:
        verdict = "holds"
    elif mean < -2 * se and mean <= -EQUIVALENT:
        verdict = "reversed"
    elif abs(mean) < EQUIVALENT and 2 * se < EQUIVALENT:
        verdict = "equivalent"
    else:
        verdict = "not resolved"
    return {"diffs": diffs, "mean": mean, "se": se, "verdict": verdict}


def per_seed(runs: list[dict], field: str) -> dict[int, float]:
    return {r["seed"]: r[field] for r in runs if r["status"] == "finished" and r[field] is not None}


def differences(a: list[dict], b: list[dict], field: str = "final") -> dict[int, float]:
    """100 x (a - b) of `field` per seed, over the seeds where both finished."""
    left, right = per_seed(a, field), per_seed(b, field)
    return {seed: 100 * (left[seed] - right[seed]) for seed in left if seed in right}


def gains(runs: list[dict], field: str = "final", start: str = "start") -> dict[int, float]:
    """100 x (final - start) per finished seed."""
    return {r["seed"]: 100 * (r[field] - r[start]) for r in runs
            if r["status"] == "finished" and r[field] is not None and r[start] is not None}


def combine(parts: list[dict]) -> str:
    """A prediction's verdict from its parts: `holds` when every part comes out as predicted, `fails` when a part is
    resolved against it, otherwise `not resolved`."""
    outcomes = [part["outcome"] for part in parts]
    if outcomes and all(outcome == "as predicted" for outcome in outcomes):
        return "holds"
    if "against" in outcomes:
        return "fails"
    return "not resolved"


def part(title: str, diffs: dict[int, float], predicted: tuple[str, ...]) -> dict:
    """One part of a prediction: its verdict, and whether that is as predicted (`predicted`: the verdicts that
    count as such), against it (a resolved verdict outside them) or not resolved."""
    result = verdict_of([diffs[seed] for seed in sorted(diffs)])
    verdict = result["verdict"]
    outcome = "as predicted" if verdict in predicted else "not resolved" if verdict == "not resolved" else "against"
    return {"title": title, "seeds": sorted(diffs), **result, "predicted": list(predicted), "outcome": outcome}


def validity(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """The validity gate: OPD's mean gain (sampled avg@4, points) on the main student reaches VALIDITY_GAIN."""
    opd = gains(runs.get("main", {}).get("opd", []))
    mean = statistics.fmean(opd.values()) if opd else None
    return {"title": f"OPD's gain on the main student (points, mean over seeds) >= {VALIDITY_GAIN:g}",
            "gains": [opd[s] for s in sorted(opd)], "mean": mean,
            "pass": mean is not None and round(mean, 6) >= VALIDITY_GAIN}  # 100 x (0.3 - 0.2) is 9.999...


def predictions(runs: dict[str, dict[str, list[dict]]], keys: tuple[str, ...] = FULL.keys) -> list[dict]:
    """P1-P4 (those of `keys`) as written in ablation-v3-predictions.md, each with its parts and verdict."""
    main, wide, weak = (runs.get(pair, {}) for pair in ("main", "wide", "weak"))
    out = []
    parts = [part("fkl - OPD, main student (points)", differences(main.get("fkl", []), main.get("opd", [])),
                  ("holds",))]
    out.append({"key": "P1", "parts": parts})
    gap_main = differences(main.get("fkl", []), main.get("opd", []))
    gap_wide = differences(wide.get("fkl", []), wide.get("opd", []))
    parts = [part("(fkl - OPD) on the wide-gap student - (fkl - OPD) on the main student (points)",
                  {s: gap_wide[s] - gap_main[s] for s in gap_wide if s in gap_main}, ("holds",))]
    out.append({"key": "P2", "parts": parts})
    parts = [part("fkl - mask, main student (points)", differences(main.get("fkl", []), main.get("mask", [])),
                  ("holds",)),
             part("fkl - clip (static floor), main student (points)",
                  differences(main.get("fkl", []), main.get("clip", [])), ("holds",)),
             part("mask: final - start, main student (points; does not collapse)", gains(main.get("mask", [])),
                  ("holds", "equivalent"))]
    out.append({"key": "P3", "parts": parts})
    parts = [part("OPD: final - start with the weak teacher (points)", gains(weak.get("opd", [])),
                  ("equivalent", "reversed")),
             part("fkl: final - start with the weak teacher (points)", gains(weak.get("fkl", [])),
                  ("equivalent", "reversed")),
             part("fkl - OPD with the weak teacher (points)", differences(weak.get("fkl", []), weak.get("opd", [])),
                  ("equivalent", "reversed"))]
    out.append({"key": "P4", "parts": parts})
    out = [prediction for prediction in out if prediction["key"] in keys]
    for prediction in out:
        prediction["verdict"] = combine(prediction["parts"])
    return out


def secondary(runs: dict[str, dict[str, list[dict]]]) -> list[dict]:
    """The same comparisons in greedy accuracy (secondary; no verdicts are drawn from them)."""
    main, wide, weak = (runs.get(pair, {}) for pair in ("main", "wide", "weak"))
    rows = [("fkl - OPD, main", differences(main.get("fkl", []), main.get("opd", []), "final_greedy")),
            ("fkl - mask, main", differences(main.get("fkl", []), main.get("mask", []), "final_greedy")),
            ("fkl - clip, main", differences(main.get("fkl", []), main.get("clip", []), "final_greedy")),
            ("fkl - OPD, wide-gap student", differences(wide.get("fkl", []), wide.get("opd", []), "final_greedy")),
            ("fkl - OPD, weak teacher", differences(weak.get("fkl", []), weak.get("opd", []), "final_greedy")),
            ("OPD: final - start, main", gains(main.get("opd", []), "final_greedy", "start_greedy"))]
    out = []
    for title, diffs in rows:
        if not diffs:  # a pair this budget does not run
            continue
        measured = verdict_of([diffs[seed] for seed in sorted(diffs)])
        out.append({"title": title, "seeds": sorted(diffs), "diffs": measured["diffs"], "mean": measured["mean"],
                    "se": measured["se"]})
    return out


def build_report(budget: Budget, lr: float, runs: dict, command: str, invocations: list[dict], ledger: dict,
                 out: Path) -> dict:
    manifest = json.loads((TOYLAB_ASSETS / "manifest-v3.json").read_text())
    pilot = json.loads((out / budget.pilot_file).read_text())
    gate = validity(runs)
    return {
        "budget": budget.name, "stem": budget.stem, "preset": PRESET, "seeds": list(budget.seeds), "lr": lr,
        "overrides": list(budget.overrides), "common_overrides": list(COMMON_OVERRIDES), "command": command,
        "invocations": invocations, "wall_budget_seconds": budget.wall_s,
        "eval": load_config(PRESET, list(budget.overrides)).eval.model_dump(include={"problems", "k", "temperature",
                                                                                      "every"}),
        "run_seconds": round(sum(ledger.values()), 1),
        "environment": describe_environment("cpu"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "methods": [{"key": m.key, "label": m.label, "overrides": list(m.overrides), "paper": m.paper}
                    for m in METHODS],
        "pairs": {pair: {"teacher": teacher, "student": student} for pair, (teacher, student) in PAIRS.items()},
        "lab": {"models": {name: {key: entry.get(key) for key in ("step", "held_out_accuracy", "sampled_accuracy",
                                                                  "logit_scale", "parameters")}
                           for name, entry in manifest.get("models", {}).items()},
                "gates": manifest.get("gates", {})},
        "pilot": {"chosen_lr": pilot["chosen_lr"], "seed": pilot["seed"],
                  "runs": {lr_: {key: row.get(key) for key in ("start", "final", "peak", "start_greedy",
                                                                "final_greedy", "status")}
                           for lr_, row in pilot["runs"].items()}},
        "conditions": {pair: {method: aggregate(seeds) for method, seeds in by_method.items()}
                       for pair, by_method in runs.items()},
        "validity": gate,
        "predictions_text": budget.predictions_file.read_text() if budget.predictions_file.is_file() else "",
        "predictions": predictions(runs, budget.keys) if gate["pass"] else [],
        "predictions_withheld": None if gate["pass"] else (
            "the validity gate failed: the lab is not in the paper's regime, and no verdict is drawn"),
        "secondary_greedy": secondary(runs),
    }


if __name__ == "__main__":
    sys.exit(main())
