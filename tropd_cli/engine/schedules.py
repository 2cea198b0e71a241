"""Learning-rate schedules (`train.lr_schedule`), built from transformers' scheduler library.

Step i (1-based, i = 1..N with N = train.steps) trains at lr * f(i), where with W = train.warmup_steps and
r = train.lr_min_ratio:

    constant  f(i) = min(1, i / W)                            (transformers' constant_with_warmup)
    linear    f(i) = i/W (1 - r) + r during warm-up, then 1 - (1 - r) (i - W) / (N - W)
    cosine    f(i) = i/W (1 - r) + r during warm-up, then r + (1 - r) (1 + cos(pi (i - W) / (N - W))) / 2
                                                              (both: transformers' warmup_stable_decay)

so the warm-up's last step reaches lr and the last step trains at r * lr. The schedule is a LambdaLR whose
state (its step count) is all a resumed run needs to continue the same sequence.
"""

from __future__ import annotations

import warnings

import torch

SCHEDULES = ("constant", "linear", "cosine")


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
                   min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The LambdaLR of `schedule`, already at step 1 (see the module docstring)."""
    from transformers import get_scheduler  # imports bitsandbytes where installed: only when a run starts

    if schedule == "constant":
        scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    elif schedule in SCHEDULES:
        scheduler = get_scheduler("warmup_stable_decay", optimizer, num_warmup_steps=warmup_steps,
                                  scheduler_specific_kwargs={"num_stable_steps": 0, "decay_type": schedule,
                                                             "num_decay_steps": max(1, total_steps - warmup_steps),
                                                             "min_lr_ratio": min_ratio})
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    with warnings.catch_warnings():  # torch warns of a scheduler step before any optimizer step: intended
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()  # transformers' schedules start at 0; step i trains at f(i)
    return scheduler
