"""Supervised fine-tuning on reference scratchpads: how the toy lab makes its teacher and student."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from tropd_cli.toylab.accuracy import prompt_token_ids
from tropd_cli.toylab.tasks import (
    FORM_SETS,
    Difficulty,
    Problem,
    is_held_out,
    noisy_scratchpad,
    random_problem,
    varied_scratchpad,
)


def sft_batch(tokenizer: PreTrainedTokenizerBase, problems: list[Problem], error_rate: float = 0.0,
              rng: random.Random | None = None, shortcut_rate: float = 0.0, forms: str | None = None,
              slip_rate: float = 0.0) -> dict[str, torch.Tensor]:
    """Right-padded prompt + solution + EOS, with labels only on supervised response tokens.

    With `error_rate` > 0 the solution is a `noisy_scratchpad`: injected mistakes carry no label. With
    `shortcut_rate` > 0 that fraction of solutions skips the scratchpad and gives only the answer line.
    With `forms` (a key of FORM_SETS: "varied" or "canonical" for toy lab v2, "shared" for v3) the solution
    is a `varied_scratchpad` in those line forms, with `error_rate` and `slip_rate`.
    """
    rng = rng or random.Random(0)
    rows = []
    for problem in problems:
        prompt = prompt_token_ids(tokenizer, problem)
        if forms is not None:
            pieces = varied_scratchpad(problem, rng, forms != "canonical", error_rate, slip_rate, FORM_SETS[forms])
        elif shortcut_rate > 0 and rng.random() < shortcut_rate:
            pieces = [(problem.solution.split("\n")[-1], True)]
        elif error_rate > 0:
            pieces = noisy_scratchpad(problem, rng, error_rate)
        else:
            pieces = [(problem.solution, True)]
        response: list[int] = []
        labels: list[int] = []
        for text, supervised in pieces:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            response += ids
            labels += ids if supervised else [-100] * len(ids)
        rows.append((prompt, response + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]))
    width = max(len(p) + len(r) for p, r, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response, response_labels) in enumerate(rows):
        sequence = torch.tensor(prompt + response)
        input_ids[i, : len(sequence)] = sequence
        labels[i, len(prompt): len(sequence)] = torch.tensor(response_labels)
        attention[i, : len(sequence)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def train_sft(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, difficulty: Difficulty,
              steps: int, batch_size: int, lr: float, seed: int, warmup: int = 50, error_rate: float = 0.0,
              shortcut_rate: float = 0.0, on_step: Callable[[int, float], None] | None = None,
              forms: str | None = None, slip_rate: float = 0.0) -> None:
    """AdamW with linear warmup and cosine decay on freshly drawn training-split problems."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    for step in range(steps):
        problems = []
        while len(problems) < batch_size:
            problem = random_problem(rng, difficulty)
            if not is_held_out(problem.expression):
                problems.append(problem)
        batch = sft_batch(tokenizer, problems, error_rate, rng, shortcut_rate, forms, slip_rate)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(step, loss.item())
