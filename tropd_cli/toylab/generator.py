"""The toy lab as a prompt generator: the `SPEC` that `tropd_cli/data/generators.py` lists as `toylab`.

Through it the toy tasks are `distill`'s built-in prompt source (`data.prompts: toylab`, seeded by
train.seed), a data source of `tropd prepare --data toylab` (the same stream, held-out draws kept apart),
a benchmark (`eval.benchmark: toylab`, `tropd evaluate -b toylab`: held-out problems graded on the final
`answer:` line, measured by `toy_accuracy` exactly as the manifest and the demo are), export's verification
prompts and preflight's prompt probe. The generator's knobs are `data.toylab`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from typing import Any

from transformers import PreTrainedTokenizerBase

from tropd_cli.config import RunConfig
from tropd_cli.data.generators import GeneratorSpec
from tropd_cli.data.rows import PromptRow
from tropd_cli.engine.generation import Generator
from tropd_cli.toylab.accuracy import prompt_token_ids, toy_accuracy
from tropd_cli.toylab.tasks import (
    Difficulty,
    Problem,
    Verdict,
    extract_answer,
    grade,
    is_held_out,
    random_problem,
    sample_problems,
)

NAME = "toylab"


def training_prompts(config: RunConfig, tokenizer: PreTrainedTokenizerBase, start_step: int = 0
                     ) -> Iterator[list[list[int]]]:
    """Endless batches of chat-formatted training-split toy prompts, seeded by train.seed, from step
    `start_step` on (earlier steps only replay the random draws)."""
    rng = random.Random(config.train.seed)
    step = 0
    while True:
        problems = []
        while len(problems) < config.rollout.prompts_per_step:
            problem = random_problem(rng, config.data.toylab)
            if not is_held_out(problem.expression):
                problems.append(problem)
        if step >= start_step:
            yield [prompt_token_ids(tokenizer, problem) for problem in problems]
        step += 1


def prepare_rows(config: RunConfig, seed: int) -> tuple[list[PromptRow], dict[str, Any]]:
    """The toy generator's draws, in order, until it has produced the training prompts asked for.

    The draw is the one `training_prompts` makes for `distill` (same rng, same held-out test), so a folder
    prepared with seed s starts with the prompts a built-in run with train.seed s trains on.
    """
    count = config.data.toylab_prompts or config.train.steps * config.rollout.prompts_per_step
    rng = random.Random(seed)
    rows: list[PromptRow] = []
    training = 0
    while training < count:
        problem = random_problem(rng, config.data.toylab)
        held_out = is_held_out(problem.expression)
        training += not held_out
        rows.append(PromptRow(problem.prompt, None, str(problem.answer), NAME,
                              {"draw": len(rows) + 1, "held_out": held_out}))
    parameters = {"generator": NAME, "seed": seed, "training_prompts": count,
                  "difficulty": config.data.toylab.model_dump()}
    fingerprint = hashlib.sha256(json.dumps(parameters, sort_keys=True).encode()).hexdigest()
    return rows, {"data": NAME, "kind": NAME, **parameters, "fingerprint": fingerprint}


def held_out(seed: int, count: int, config: RunConfig | None) -> list[Problem]:
    """`count` distinct held-out problems drawn with `seed`, at the run's difficulty (data.toylab) or the
    default one."""
    return sample_problems(seed, count, config.data.toylab if config is not None else Difficulty(), held_out=True)


def grade_answer(response: str, gold: str) -> tuple[str | None, bool]:
    """The last `answer:` line's text, and whether it holds the gold integer."""
    return extract_answer(response), grade(response, int(gold)) is Verdict.CORRECT


def measure(model: Generator, tokenizer: PreTrainedTokenizerBase, problems: list[Problem],
            config: RunConfig, k: int, temperature: float) -> dict[str, float]:
    """avg@k of `model` (a torch module or a sampler) on `problems` as the toy lab measures it, with the samples'
    slip rate and format coverage."""
    report = toy_accuracy(model, tokenizer, problems, k=k, temperature=temperature,
                          max_new_tokens=config.rollout.max_new_tokens, seed=config.eval.seed,
                          batch_size=config.rollout.batch_size)
    return {"accuracy": report.accuracy, "slip_rate": report.slip_rate, "format_coverage": report.format_coverage}


def probe_prompts(config: RunConfig, count: int) -> list[str]:
    """`count` toy prompts drawn with train.seed (either split), for preflight's longest-prompt estimate."""
    rng = random.Random(config.train.seed)
    return [random_problem(rng, config.data.toylab).prompt for _ in range(count)]


SPEC = GeneratorSpec(name=NAME, training_prompts=training_prompts, prepare_rows=prepare_rows, held_out=held_out,
                     grade=grade_answer, measure=measure, probe_prompts=probe_prompts)
