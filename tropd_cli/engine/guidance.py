"""Off-policy guidance (DESIGN.md §1 item 4) and the teacher responses it, `sft` and `seqkd` train on.

Each prompt has one teacher response y. At step i of N the student's rollouts start from prompt + y[:l_i],
l_i = floor(|y| (1 + cos(pi i / N)) / 2), so early rollouts only finish the teacher's solution and late
ones are fully on-policy. The objective's terms apply to the tokens the student generates; the prefix
tokens get only the imitation term beta * CE(pi_S, y[:l_i]).

Where y comes from is a seam: a `TeacherResponses` callable maps prompt token ids to one
`TeacherResponse` each. `InRunTeacherResponses` samples them through the teacher's rollout backend on
first use and caches them in memory for the run; a cache of drafts written by `prepare` only has to honour
the same call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from tropd_cli.engine.objectives.base import ObjectiveOutput, mean_pair
from tropd_cli.engine.rollout import RolloutBackend, Rollouts, SamplingParams
from tropd_cli.engine.seeds import Stream, step_seed


@dataclass(frozen=True)
class TeacherResponse:
    """A teacher response y: its token ids (ending with the EOS token when `finished`)."""

    token_ids: list[int]
    finished: bool

    def content(self) -> list[int]:
        """y without its final EOS token: what a guidance prefix may be cut from.

        A prefix never holds the teacher's EOS, so the student always has at least that token to
        generate and every rollout carries on-policy loss tokens. A truncated response (no EOS) is kept
        whole.
        """
        return self.token_ids[:-1] if self.finished and self.token_ids else list(self.token_ids)


class TeacherResponses(Protocol):
    """The source of teacher responses: one per prompt, the same one every time a prompt comes back."""

    def __call__(self, prompt_ids: list[list[int]]) -> list[TeacherResponse]: ...


class InRunTeacherResponses:
    """Teacher responses sampled through the teacher's rollout backend when a prompt is first seen, then
    cached in memory for the run, keyed by the prompt's token ids.

    They are sampled at the rollout temperature and top_p (1.0 and 1.0 in the paper), not greedily: the
    imitation term is the K1 estimate of KL(pi_T || pi_S) on teacher samples, which needs y ~ pi_T, and
    greedy decoding of reasoning models is prone to repetition loops. Each call samples its new prompts in
    one generate call, seeded from `seed` and the number of calls so far, so a run is reproducible.
    """

    def __init__(self, backend: RolloutBackend, params: SamplingParams, seed: int) -> None:
        self.backend = backend
        self.params = params
        self.seed = seed
        self.calls = 0
        self.cache: dict[tuple[int, ...], TeacherResponse] = {}

    def __call__(self, prompt_ids: list[list[int]]) -> list[TeacherResponse]:
        missing = list(dict.fromkeys(tuple(ids) for ids in prompt_ids if tuple(ids) not in self.cache))
        if missing:
            seed = step_seed(self.seed, self.calls, Stream.TEACHER_RESPONSE)
            sampled = self.backend.generate([list(ids) for ids in missing], 1, self.params, seed)
            for ids, response, finished in zip(missing, sampled.response_ids, sampled.finished):
                self.cache[ids] = TeacherResponse(response, finished)
            self.calls += 1
        return [self.cache[tuple(ids)] for ids in prompt_ids]

    def state_dict(self) -> dict:
        """The cache and call count, as plain lists (a checkpoint restores them exactly)."""
        return {"calls": self.calls, "prompts": [list(ids) for ids in self.cache],
                "responses": [r.token_ids for r in self.cache.values()],
                "finished": [r.finished for r in self.cache.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]
        self.cache = {tuple(ids): TeacherResponse(list(response), bool(done)) for ids, response, done
                      in zip(state["prompts"], state["responses"], state["finished"])}


def prefix_length(response_length: int, step: int, total_steps: int) -> int:
    """l_i = floor(|y| (1 + cos(pi i / N)) / 2), the cosine prefix schedule.

    `step` is i, 0-based, and N = total_steps - 1, so i runs 0..N: the first step gets the whole response,
    the middle step (i = N/2) half of it and the last step (i = N) nothing. A run of one step (N = 0) gets
    the whole response. `response_length` is |y| without the final EOS (`TeacherResponse.content`).
    """
    last = total_steps - 1
    if last <= 0:
        return response_length
    return math.floor(response_length * (1 + math.cos(math.pi * min(step, last) / last)) / 2)


def guided_rollouts(backend: RolloutBackend, prompt_ids: list[list[int]], responses: list[TeacherResponse],
                    step: int, total_steps: int, n: int, params: SamplingParams, seed: int
                    ) -> tuple[Rollouts, list[int]]:
    """Student rollouts from prompt + y[:l_i], n per prompt, and each rollout's prefix length l_i.

    The returned `Rollouts` keep the original prompts; each response is y[:l_i] followed by what the
    student generated (at most `params.max_new_tokens` tokens after the prefix).
    """
    prefixes = [r.content()[:prefix_length(len(r.content()), step, total_steps)] for r in responses]
    sampled = backend.generate([p + x for p, x in zip(prompt_ids, prefixes)], n, params, seed)
    response_ids = [prefixes[i] + generated for i, generated in zip(sampled.prompt_index, sampled.response_ids)]
    logprobs = None
    if sampled.logprobs is not None:  # the prefix was not sampled: no sampler log-prob there
        logprobs = [[math.nan] * len(prefixes[i]) + row for i, row in zip(sampled.prompt_index, sampled.logprobs)]
    rollouts = Rollouts(prompt_ids=list(prompt_ids), prompt_index=list(sampled.prompt_index),
                        response_ids=response_ids, finished=list(sampled.finished), logprobs=logprobs)
    return rollouts, [len(prefixes[i]) for i in sampled.prompt_index]


def reference_rollouts(prompt_ids: list[list[int]], responses: list[TeacherResponse]) -> Rollouts:
    """The teacher responses as a rollout batch, one per prompt, EOS included (`sft` learns to stop)."""
    return Rollouts(prompt_ids=list(prompt_ids), prompt_index=list(range(len(prompt_ids))),
                    response_ids=[list(r.token_ids) for r in responses], finished=[r.finished for r in responses])


def prefix_token_mask(prefix_lengths: list[int], response_lengths: list[int]) -> torch.Tensor:
    """1 on the prefix tokens of each response, flattened in scoring order (row by row): [tokens]."""
    return torch.tensor([float(position < prefix) for prefix, length in zip(prefix_lengths, response_lengths)
                         for position in range(length)])


def imitation(student_logprobs: torch.Tensor, prefix_mask: torch.Tensor, beta: float) -> ObjectiveOutput:
    """The imitation term on the teacher prefix: loss_t = -beta s_t on prefix tokens (beta CE(pi_S, y[:l])),

    token-mean over the prefix tokens (`normaliser`). Metrics: `prefix_loss` (beta CE) and `prefix_ce` (CE).
    """
    keep = prefix_mask.bool()
    cross_entropy = torch.where(keep, -student_logprobs, torch.zeros_like(student_logprobs))
    return ObjectiveOutput(beta * cross_entropy, float(prefix_mask.sum()), {
        "prefix_loss": mean_pair(beta * cross_entropy, prefix_mask),
        "prefix_ce": mean_pair(cross_entropy, prefix_mask),
    })
