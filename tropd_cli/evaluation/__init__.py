"""`tropd evaluate`: benchmarks as data, graders, metrics (avg@k, pass@k, maj@k) and side-by-side reports.

Listing the benchmarks' names reads only the keys of benchmarks.yaml (so the configuration validates
`eval.benchmark` without importing the registry); `registry.py` loads and checks the entries.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

REGISTRY_PATH = Path(__file__).resolve().parent / "benchmarks.yaml"


@cache
def benchmark_names() -> tuple[str, ...]:
    """Every benchmark's name, in the order of benchmarks.yaml."""
    return tuple(yaml.safe_load(REGISTRY_PATH.read_text()))
