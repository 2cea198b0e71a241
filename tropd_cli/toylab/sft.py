"""Supervised fine-tuning on reference scratchpads: how the toy lab makes its teacher and student."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from tropd_cli.toylab.accuracy import prompt_token_ids
from tropd_cli.toylab.tasks import Difficulty, Problem, random_problem, is_held_out


def sft_batch(tokenizer: PreTrainedTokenizerBase, problems: list[Problem]) -> dict[str, torch.Tensor]:
    """Right-padded prompt + solution + EOS, with labels only on the response tokens."""
    rows = []
    for problem in problems:
        prompt = prompt_token_ids(tokenizer, problem)
        response = tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
        rows.append((prompt, response + [tokenizer.eos_token_id]))
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        sequence = torch.tensor(prompt + response)
        input_ids[i, : len(sequence)] = sequence
        labels[i, len(prompt): len(sequence)] = torch.tensor(response)
        attention[i, : len(sequence)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def train_sft(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, difficulty: Difficulty,
              steps: int, batch_size: int, lr: float, seed: int, warmup: int = 50,
              on_step: Callable[[int, float], None] | None = None) -> None:
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
        batch = sft_batch(tokenizer, problems)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step(step, loss.item())
