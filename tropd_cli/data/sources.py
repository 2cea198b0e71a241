"""Where `distill` gets its prompts and its teacher responses.

`prompt_batches(config, tokenizer, start_step)` yields the token ids of `rollout.prompts_per_step`
chat-formatted prompts per step, starting at step `start_step` (a resumed run continues where it stopped):
from a prompt generator (`data.prompts: NAME`, see `generators.py`; by default the toy lab's, seeded by
train.seed) or from a folder written by `tropd prepare` (`data.prompts: PATH`; see `prepared.py` for the
order). Either way the batches are a pure function of the configuration and the step; under torchrun each
rank takes its slice of every step's prompts (`rank`, `world_size`), so that N ranks together see the
one-process batch.
`teacher_response_source` answers guidance's and `sft`'s one teacher response per prompt: the prepared
folder's teacher drafts when it has them, else responses sampled in the run and cached.
"""

from __future__ import annotations

from collections.abc import Iterator

from tropd_cli.config import RunConfig
from tropd_cli.data import is_generator
from tropd_cli.data.drafts import PreparedTeacherResponses
from tropd_cli.data.generators import get_generator
from tropd_cli.data.prepared import PreparedFolder, prepared_batches
from tropd_cli.engine.guidance import InRunTeacherResponses, TeacherResponses
from tropd_cli.engine.objectives import get_objective
from tropd_cli.engine.rollout import RolloutBackend, SamplingParams


def prompt_batches(config: RunConfig, tokenizer, start_step: int = 0, prepared: PreparedFolder | None = None,
                   rank: int = 0, world_size: int = 1) -> Iterator[list[list[int]]]:
    """Endless batches of prompt token ids, one per step, from step `start_step` on. `prepared` is
    data.prompts already opened and checked against the tokenizer (by the preflight), if at hand. With
    `world_size` processes, this one (`rank`) gets the rank-th of world_size equal slices of each step's
    prompts (the strategy checks that rollout.prompts_per_step divides)."""
    if not is_generator(config.data.prompts):
        if prepared is None:
            prepared = PreparedFolder.open(config.data.prompts)
            prepared.check_tokenizer(tokenizer, config.student.model)
        batches = prepared_batches(prepared.train_prompt_ids(), config.rollout.prompts_per_step, config.train.seed,
                                   start_step)
    else:
        batches = get_generator(config.data.prompts).training_prompts(config, tokenizer, start_step)
    return batches if world_size == 1 else rank_slices(batches, rank, world_size)


def rank_slices(batches: Iterator[list[list[int]]], rank: int, world_size: int) -> Iterator[list[list[int]]]:
    """Rank `rank`'s contiguous slice of each batch: the prompts [rank * P / N, (rank + 1) * P / N)."""
    for batch in batches:
        yield batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]


def needs_teacher_responses(config: RunConfig) -> bool:
    """Whether the objective trains on one teacher response per prompt (guidance, sft)."""
    return get_objective(config.objective.name).needs_teacher_responses(config.objective)


def teacher_response_source(config: RunConfig, teacher_backend: RolloutBackend,
                            prepared: PreparedFolder | None = None) -> TeacherResponses:
    """Where guidance and `sft` get their one teacher response per prompt: a prepared folder's teacher
    drafts when it has them, else sampled in the run and cached. `prepared` is data.prompts, if opened."""
    if not is_generator(config.data.prompts) and needs_teacher_responses(config):
        folder = prepared or PreparedFolder.open(config.data.prompts)
        if folder.drafts is not None:
            return PreparedTeacherResponses.from_folder(folder, config.teacher.model)
    params = SamplingParams(config.rollout.max_new_tokens, config.rollout.temperature, config.rollout.top_p)
    return InRunTeacherResponses(teacher_backend, params, config.train.seed)
