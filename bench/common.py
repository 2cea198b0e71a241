"""What the ablation comparisons share: `ablation.py` (the paper's Table 1 on the toy lab) and `ablation_v2.py`
(toy lab v2 with pre-registered predictions), and their reports.

Both take --quick, --work-dir and --out, exit 130 when stopped and 2 on a one-line error; both run each
distillation through `tropd_cli.distill.distill` and reuse a run already done with the same chosen settings
(preset keys and overrides), so that an interrupted comparison resumes where it stopped; both keep a ledger
of each run's wall time and one of their invocations in the work folder, and report means with sample
standard deviations, as percentages, with PNG plots written atomically. Not a script: imported by them, and
by the other benchmarks for `publish` (a report's JSON and markdown, written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from tropd_cli.config import RunConfig, apply_override, dotted, preset_path
from tropd_cli.distill import distill
from tropd_cli.errors import Interrupted, TropdError
from tropd_cli.files import atomic_write_json, atomic_write_text
from tropd_cli.runfolder import RunFolder

RESULTS = Path(__file__).resolve().parent / "results"  # where a full comparison's report goes by default


@dataclass(frozen=True)
class Method:
    """One row of a comparison: the overrides that select its objective, and the paper's Table 1 average."""

    key: str
    label: str
    overrides: tuple[str, ...]
    paper: float | None


# ------------------------------------------------------------------------------------------- command line


def comparison_parser(description: str, work_dir: str) -> argparse.ArgumentParser:
    """The options every comparison takes; `work_dir` is the default root of its run folders."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 4 steps, tiny budgets")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help=f"run folders (default {work_dir}, or {work_dir}-quick)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report folder (default bench/results, or WORK_DIR/report with --quick)")
    return parser


def folders(args: argparse.Namespace, work_dir: str) -> tuple[Path, Path]:
    """(the run folders' root, the report folder) the command line names, or their defaults."""
    work = args.work_dir or Path(work_dir + ("-quick" if args.quick else ""))
    return work, args.out or (work / "report" if args.quick else RESULTS)


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as the report quotes it, e.g. `.venv/bin/python bench/ablation.py --quick`."""
    return shlex.join([".venv/bin/python", script, *(sys.argv[1:] if argv is None else argv)])


def run_reporting_errors(comparison: Callable[[], object], stopped_note: str = "") -> int:
    """Run `comparison`: 0 when it finishes, 130 when it is stopped (the line ends with `stopped_note`), 2 with a
    one-line error for a user's mistake."""
    try:
        comparison()
    except (Interrupted, KeyboardInterrupt) as error:
        print(f"stopped: {error or 'interrupted'}{stopped_note}", file=sys.stderr)
        return 130
    except TropdError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def check_folders(work_dir: Path, out: Path) -> None:
    """--work-dir and --out are folders, or do not exist yet."""
    for folder, role in ((work_dir, "--work-dir"), (out, "--out")):
        if folder.exists() and not folder.is_dir():
            raise TropdError(f"{role} {folder} exists and is not a folder")


def read_json(path: Path, default: Any) -> Any:
    """A ledger of the work folder (wall_seconds.json, invocations.json), or `default` before the first run."""
    return json.loads(path.read_text()) if path.is_file() else default


# ------------------------------------------------------------------------------------------------- one run


def reusable_summary(run_dir: Path, overrides: list[str], preset: str) -> dict | None:
    """The summary of a run already done (finished or failed) with every setting this comparison chooses.

    The chosen settings are the preset's keys and the overrides. Fields the schema gains later, or
    defaults the preset does not set, do not force a rerun: a changed code base is the user's call
    (a fresh --work-dir reruns everything).
    """
    run = RunFolder(run_dir)
    if not (run.summary.is_file() and run.config.is_file()):
        return None
    summary = json.loads(run.summary.read_text())
    if summary.get("status") not in ("finished", "failed"):
        return None
    stored = dotted(yaml.safe_load(run.config.read_text()) or {})
    if any(stored.get(key, _MISSING) != value for key, value in chosen_settings(overrides, preset).items()):
        return None
    return summary


_MISSING = object()


def chosen_settings(overrides: list[str], preset: str) -> dict[str, object]:
    """Every dotted key the preset file or an override sets, with its value."""
    raw = yaml.safe_load(preset_path(preset).read_text()) or {}
    for override in overrides:
        apply_override(raw, override)
    return dotted(raw)


def execute(config: RunConfig, run_dir: Path, preset: str) -> dict:
    """One distillation; a run stopped by a non-finite loss is a result (status failed), not an abort."""
    try:
        return distill(config, preset, out=str(run_dir), overwrite=True, console=Console(quiet=True)).summary
    except Interrupted:
        raise
    except TropdError as error:
        summary_path = RunFolder(run_dir).summary
        if not summary_path.is_file():  # stopped before training: a setup error, not a result
            raise
        summary = json.loads(summary_path.read_text())
        summary["error"] = str(error)
        atomic_write_json(summary_path, summary)
        return summary


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-step records of a run's metrics.jsonl."""
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------- reporting


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for a single value; None for no values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(value: float | None, std: float | None = None, sign: bool = False) -> str:
    """A fraction as a percentage with one decimal (± its std), or — when there is none."""
    if value is None:
        return "—"
    text = f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"
    return text + (f" ± {100 * std:.1f}" if std is not None else "")


def num(value: float | None, digits: int = 2) -> str:
    """A number with `digits` decimals, or — for none or NaN."""
    return "—" if value is None or value != value else f"{value:.{digits}f}"


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_png(figure, path: Path) -> None:
    """Write `figure` to `path` atomically and close it."""
    temporary = path.with_name(f".{path.name}.tmp")
    figure.savefig(temporary, format="png")
    pyplot().close(figure)
    os.replace(temporary, path)


def publish(out: Path, stem: str, report: dict, text: str) -> None:
    """A benchmark's report as OUT/STEM.json and its markdown as OUT/STEM.md (both atomic), and the markdown
    printed."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", report)
    atomic_write_text(out / f"{stem}.md", text)
    print(text)
