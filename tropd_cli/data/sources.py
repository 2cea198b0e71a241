"""Where `distill` gets its prompts and its teacher responses.

`prompt_batches(config, tokenizer, start_step)` yields the token ids of `rollout.prompts_per_step`
chat-formatted prompts per step, starting at step `start_step` (a resumed run continues where it stopped),
reproducibly from `train.seed`. `teacher_response_source` answers guidance's and `sft`'s one teacher
response per prompt.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from tropd_cli.config import RunConfig
from tropd_cli.engine.guidance import InRunTeacherResponses, TeacherResponses
from tropd_cli.engine.rollout import RolloutBackend, SamplingParams
from tropd_cli.toylab.accuracy import prompt_token_ids
from tropd_cli.toylab.tasks import is_held_out, random_problem


def prompt_batches(config: RunConfig, tokenizer, start_step: int = 0) -> Iterator[list[list[int]]]:
    """Endless batches of prompt token ids, one per step, from step `start_step` on."""
    batches = toylab_prompts(config, tokenizer)
    for _ in range(start_step):
        next(batches)
    return batches


def toylab_prompts(config: RunConfig, tokenizer) -> Iterator[list[list[int]]]:
    """Endless batches of chat-formatted training-split toy prompts, seeded by train.seed."""
    rng = random.Random(config.train.seed)
    while True:
        batch = []
        while len(batch) < config.rollout.prompts_per_step:
            problem = random_problem(rng, config.data.toylab)
            if not is_held_out(problem.expression):
                batch.append(prompt_token_ids(tokenizer, problem))
        yield batch


def teacher_response_source(config: RunConfig, teacher_backend: RolloutBackend) -> TeacherResponses:
    """Where guidance and `sft` get their one teacher response per prompt: sampled in the run and cached."""
    params = SamplingParams(config.rollout.max_new_tokens, config.rollout.temperature, config.rollout.top_p)
    return InRunTeacherResponses(teacher_backend, params, config.train.seed)
