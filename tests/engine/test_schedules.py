"""Learning-rate schedules: the constant default is the warm-up every pinned number was made with; linear
and cosine decay to their floor; a resumed run continues the same sequence."""

import io
import json
import math

import pytest
import torch
from rich.console import Console

from tropd_cli.config import load_config
from tropd_cli.distill import distill, resume
from tropd_cli.engine.schedules import make_scheduler


def sequence(schedule: str, warmup: int, steps: int, min_ratio: float = 0.0, lr: float = 1e-4) -> list[float]:
    """The lr each of `steps` optimizer steps trains at."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=lr)
    scheduler = make_scheduler(optimizer, schedule, warmup, steps, min_ratio)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_constant_is_exactly_the_warmup_the_pinned_runs_used(warmup):
    expected = [1e-4 * (min(1.0, (step + 1) / warmup) if warmup else 1.0) for step in range(100)]
    assert sequence("constant", warmup, 100) == expected  # bit for bit


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decays_reach_the_floor_at_the_last_step(schedule):
    lrs = sequence(schedule, 4, 20, min_ratio=0.1)
    assert lrs[:4] == pytest.approx([1e-4 * (0.1 + 0.9 * i / 4) for i in range(1, 5)])  # warm-up from the floor
    assert lrs[3] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-5)
    assert all(later < earlier for earlier, later in zip(lrs[3:], lrs[4:]))
    middle = 0.1 + 0.9 * (0.5 if schedule == "linear" else (1 + math.cos(math.pi * 0.5)) / 2)
    assert lrs[3 + 8] == pytest.approx(1e-4 * middle)


def test_floor_zero_decays_to_zero():
    assert sequence("linear", 0, 10)[-1] == 0.0 and sequence("cosine", 0, 10)[0] == pytest.approx(
        1e-4 * (1 + math.cos(math.pi / 10)) / 2)


def test_unknown_schedule_is_refused_by_the_schema():
    from tropd_cli.errors import TropdError

    with pytest.raises(TropdError, match="train.lr_schedule: 'step'"):
        load_config("toylab", ["train.lr_schedule=step"])


def test_resumed_run_continues_the_same_lr_sequence(random_pair_dir, tmp_path):
    settings = [f"teacher.model={random_pair_dir / 'teacher'}", f"student.model={random_pair_dir / 'student'}",
                "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=6", "eval.problems=0",
                "train.checkpoint_every=2", "train.checkpoint_keep=0", "train.threads=1", "train.lr=1e-3",
                "train.lr_schedule=cosine", "train.warmup_steps=2", "train.lr_min_ratio=0.2", "train.steps=6"]
    console = Console(file=io.StringIO())

    def lrs(run) -> list[float]:
        return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    whole = tmp_path / "whole"
    distill(load_config("toylab", settings), "toylab", out=str(whole), console=console)
    part = tmp_path / "part"
    distill(load_config("toylab", [*settings[:-1], "train.steps=6"]), "toylab", out=str(part), console=console)
    resume(part, console=console, from_step=2)
    assert lrs(part) == lrs(whole) == sequence("cosine", 2, 6, 0.2, lr=1e-3)
