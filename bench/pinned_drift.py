"""How far the pinned loss-regression numbers (tests/engine/test_pinned.py) move between environments.

The pinned numbers must catch wiring bugs, not patch releases. This runs the pinned cases once per
(interpreter, thread count), each in its own process, collects every run's step metrics and reports, for step 1
and for the later steps apart, the largest relative difference from the PINNED table over all runs and metrics.
The test's tolerances are set from this report (see the comment above them in test_pinned.py). `--perturb`
measures, with the first interpreter at one thread, how far a deliberate small bug (extra settings, such as a
learning rate 1% off) moves each case from the unperturbed run: what the tolerance must stay below.

    .venv/bin/python bench/pinned_drift.py --python .venv/bin/python --python .venv-vllm/bin/python --threads 1,2 \
        --perturb lr+1%=train.lr=1.01e-3 --perturb wd0.11=train.weight_decay=0.11

Each interpreter must have tropd installed (editable, from this checkout). Writes pinned_drift.json to --out with
the command, every environment's description and the per-case differences.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.engine.test_pinned import PINNED  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", required=True, help="an interpreter with tropd (repeatable)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--perturb", action="append", default=[], metavar="NAME=SETTING[ SETTING...]",
                        help="a deliberate change to measure against (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    return args


def environment_of(python: str, threads: int) -> dict:
    code = (f"import json, torch; torch.set_num_threads({threads}); from tropd_cli.environment import describe; "
            "print(json.dumps(describe(command=[])))")
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def measure(python: str, threads: int, extra: str = "") -> dict[str, dict[str, list[float]]]:
    """run -> metric -> values per step, from the pinned test in repinning mode (with `extra` settings)."""
    with tempfile.TemporaryDirectory() as folder:
        sink = Path(folder) / "pinned.jsonl"
        env = {**os.environ, "TROPD_REPIN": "1", "TROPD_PINNED_OUT": str(sink), "TROPD_TEST_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1", "TROPD_PINNED_EXTRA": extra}
        subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/engine/test_pinned.py"],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        return {record["run"]: record["metrics"] for record in map(json.loads, sink.read_text().splitlines())}


def relative(got: float, pinned: float) -> float:
    return abs(got - pinned) / max(abs(pinned), 1e-7)


def differences(measured: dict[str, dict[str, list[float]]], reference: dict = PINNED) -> list[dict]:
    """One row per (run, metric, step) of `reference` that was measured: pinned, got, relative difference."""
    rows = []
    for run, metrics in reference.items():
        for name, values in metrics.items():
            for step, pinned in enumerate(values, start=1):
                if run in measured:
                    got = measured[run][name][step - 1]
                    rows.append({"run": run, "metric": name, "step": step, "pinned": pinned, "got": got,
                                 "relative": relative(got, pinned)})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cases = []
    for python in args.python:
        for threads in args.threads:
            print(f"measuring {python} with {threads} thread(s)", flush=True)
            rows = differences(measure(python, threads))
            worst = {label: max((r for r in rows if (r["step"] == 1) == (label == "step 1")),
                                key=lambda r: r["relative"], default=None) for label in ("step 1", "later steps")}
            cases.append({"environment": environment_of(python, threads), "threads": threads, "worst": worst,
                          "rows": rows})
            for label, row in worst.items():
                print(f"  {label}: max relative difference {row['relative']:.2e} ({row['run']} {row['metric']} "
                      f"step {row['step']})")
    perturbations = []
    if args.perturb:
        baseline = measure(args.python[0], 1)
    for spec in args.perturb:
        name, _, settings = spec.partition("=")
        print(f"perturbing: {name} ({settings})", flush=True)
        rows = [row for row in differences(measure(args.python[0], 1, settings), reference=baseline)
                if row["step"] > 1]
        by_run = {run: max(r["relative"] for r in rows if r["run"] == run) for run in baseline}
        perturbations.append({"name": name, "settings": settings, "later_steps_max_by_run": by_run})
        print("  later steps, smallest and largest case: "
              f"{min(by_run.values()):.2e} .. {max(by_run.values()):.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([sys.executable, *sys.argv]), "cases": cases, "perturbations": perturbations}
    (args.out / "pinned_drift.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
