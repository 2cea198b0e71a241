"""The evaluation report: report.json (protocol and metrics), samples.jsonl, report.md, and the Rich table.

report.json holds the full protocol (k, temperature, top_p, max new tokens, seed, limit, thinking, dtype, backend,
each benchmark's source, grader, instruction and dataset fingerprint) and, per benchmark and model, every
metric with its standard error. The table shows models side by side with deltas against the first model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from rich.console import Console
from rich.table import Table

from tropd_cli import __version__
from tropd_cli.evaluation.loading import ModelSource
from tropd_cli.evaluation.registry import ProblemSet
from tropd_cli.evaluation.settings import EvalSettings
from tropd_cli.files import atomic_write_json, atomic_write_text

# Metrics shown in the table, in this order, when present (pass@k and friends are matched by prefix).
TABLE_PREFIXES = ("greedy", "avg@", "pass@", "maj@")


@dataclass
class EvalReport:
    """Everything report.json holds, plus the per-sample records written to samples.jsonl."""

    protocol: dict
    models: list[dict]
    benchmarks: dict[str, dict]
    samples: list[dict] = field(default_factory=list, repr=False)

    @classmethod
    def start(cls, settings: EvalSettings, sources: list[ModelSource], problem_sets: list[ProblemSet]) -> EvalReport:
        """A report with its protocol filled in and no results yet."""
        protocol = {
            "k": settings.k if settings.temperature > 0 else 1,
            "temperature": settings.temperature,
            "top_p": settings.top_p if settings.temperature > 0 else 1.0,
            "max_new_tokens": settings.max_new_tokens,  # None: each benchmark's own, recorded below
            "greedy_pass": settings.temperature == 0 or settings.greedy,
            "seed": settings.seed,
            "limit": settings.limit,
            "thinking": settings.thinking,
            "dtype": settings.dtype,
            "backend": settings.backend,
            "batch_size": settings.batch_size,
            "grading_timeout_s": settings.grading_timeout_s,
            "tropd_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        models = [{"label": label, **asdict(source)} for label, source in zip(settings.labels, sources)]
        benchmarks = {
            ps.benchmark.name: {
                "source": ps.source,
                "fingerprint": ps.fingerprint,
                "problems": len(ps.problems),
                "graders": sorted({p.grader for p in ps.problems}),
                "instruction": ps.benchmark.instruction,
                "max_new_tokens": settings.max_new_tokens or ps.benchmark.max_new_tokens,
                "results": {},
            }
            for ps in problem_sets
        }
        return cls(protocol, models, benchmarks)

    def add(self, benchmark: str, label: str, metrics: dict, samples: list[dict]) -> None:
        """Record one model's metrics and samples on one benchmark."""
        self.benchmarks[benchmark]["results"][label] = metrics
        self.samples.extend(samples)

    def to_json(self) -> dict:
        return {"protocol": self.protocol, "models": self.models, "benchmarks": self.benchmarks}


def table_rows(report: EvalReport) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: benchmark, metric, one column per model, then deltas.

    Values are percentages with their standard error; deltas are points against the first model.
    """
    labels = [model["label"] for model in report.models]
    header = ["benchmark", "metric", *labels, *(f"Δ {label}" for label in labels[1:])]
    rows = []
    for name, entry in report.benchmarks.items():
        results = entry["results"]
        first = results.get(labels[0], {})
        metric_names = [m for m in first if m.startswith(TABLE_PREFIXES) and not m.endswith("_stderr")]
        for metric in metric_names:
            cells = [_percent(results.get(label, {}), metric) for label in labels]
            deltas = [_delta(first.get(metric), results.get(label, {}).get(metric)) for label in labels[1:]]
            rows.append([name, metric, *cells, *deltas])
    return header, rows


def _percent(metrics: dict, metric: str) -> str:
    value, stderr = metrics.get(metric), metrics.get(f"{metric}_stderr")
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


def _delta(base: float | None, value: float | None) -> str:
    return "-" if base is None or value is None else f"{100 * (value - base):+.1f}"


def print_table(console: Console, report: EvalReport) -> None:
    """The side-by-side Rich table."""
    header, rows = table_rows(report)
    protocol = report.protocol
    title = (f"evaluation (%, ± standard error): k {protocol['k']}, temperature {protocol['temperature']}, "
             f"top_p {protocol['top_p']}, seed {protocol['seed']}")
    table = Table(title=title)
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def markdown_table(report: EvalReport) -> str:
    """The side-by-side table in GitHub markdown, with the protocol on one line above it."""
    header, rows = table_rows(report)
    protocol = report.protocol
    lines = [f"k {protocol['k']}, temperature {protocol['temperature']}, top_p {protocol['top_p']}, "
             f"seed {protocol['seed']}; values in %, ± standard error across problems; Δ in points vs "
             f"{report.models[0]['label']}.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, settings: EvalSettings) -> None:
    """report.json, samples.jsonl and (with `markdown`) report.md, each written atomically."""
    atomic_write_json(settings.out / "report.json", report.to_json())
    atomic_write_text(settings.out / "samples.jsonl",
                      "".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in report.samples))
    if settings.markdown:
        atomic_write_text(settings.out / "report.md", markdown_table(report))
