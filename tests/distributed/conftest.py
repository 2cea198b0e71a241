"""Two real ranks on gloo: `tropd distill --nproc 2` (torchrun's launcher) in a subprocess, one thread each.

Fixtures start the processes with the repository on PYTHONPATH and the environment the suite runs in, and
compare a two-rank run with the same run in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import quiet

ROOT = Path(__file__).resolve().parents[2]

# Two prompts of two rollouts a step, one prompt per rank. Near-greedy sampling (temperature 1e-6) makes the
# rollouts the same tokens whatever the rank's seed, so that two ranks and one process see one batch.
PARITY = ["teacher.model=toylab:teacher", "student.model=toylab:student", "train.steps=3",
          "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8", "rollout.temperature=1e-6",
          "eval.problems=0", "train.lr=1e-3", "train.warmup_steps=0", "train.threads=1", "train.device=cpu",
          "objective.name=opd", "train.checkpoint_every=0"]


def rank_env() -> dict[str, str]:
    """The environment of the launched ranks: this checkout importable, one thread, offline."""
    # A short collective timeout: ranks left behind by a failed test (torchrun starts them in their own
    # sessions) end within a minute instead of ten.
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TROPD_DIST_TIMEOUT="60")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def tropd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tropd_cli", *args]


def run_tropd(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m tropd_cli *args` in a subprocess, its output captured."""
    return subprocess.run(tropd_command(*args), env=rank_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def metrics(run: Path, names: tuple[str, ...] = ("loss", "grad_norm")) -> list[dict[str, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{name: json.loads(line)[name] for name in names} for line in lines]


@pytest.fixture(scope="session")
def single_process_runs(tmp_path_factory) -> Callable[[tuple[str, ...]], Path]:
    """The one-process run of PARITY + settings, made once per settings."""
    from tropd_cli.config import load_config
    from tropd_cli.distill import distill

    made: dict[tuple[str, ...], Path] = {}

    def run(settings: tuple[str, ...]) -> Path:
        if settings not in made:
            out = tmp_path_factory.mktemp("one") / "run"
            distill(load_config("toylab", [*PARITY, *settings]), "toylab", out=str(out),
                    console=quiet())
            made[settings] = out
        return made[settings]

    return run
