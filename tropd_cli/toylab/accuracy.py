"""Toy-task accuracy: sample k answers per held-out problem (or one greedy answer) and grade them.

One function used by the toy-lab builder, the demo, and the trainer's periodic evaluation, so that
every number about the toy lab is measured the same way. Its two steps, `chat_prompt_ids` (data/chat.py)
and `generate_texts` (engine/generation.py), are the ones `tropd evaluate` takes, which must reproduce the
manifest's accuracies.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from tropd_cli.data.chat import chat_prompt_ids
from tropd_cli.engine.generation import Generator, generate_texts
from tropd_cli.engine.rollout import SamplingParams
from tropd_cli.toylab.tasks import Problem, ScratchpadProfile, Verdict, grade


@dataclass
class AccuracyReport:
    """avg@k accuracy (mean correctness over every sample) and what the samples looked like."""

    accuracy: float
    k: int
    problems: int
    correct_per_problem: list[int] = field(repr=False)
    verdicts: dict[str, int]
    mean_response_tokens: float
    slip_rate: float = 0.0  # scratchpad lines with the v2 students' slip token, over all lines
    format_coverage: float = 0.0  # exp(entropy of the line forms used) / 3 (see tasks.ScratchpadProfile)


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, problem: Problem) -> list[int]:
    """The chat-formatted prompt for a problem, ending with the assistant header."""
    return chat_prompt_ids(tokenizer, problem.prompt)


def toy_accuracy(model: Generator, tokenizer: PreTrainedTokenizerBase, problems: list[Problem],
                 k: int = 1, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
                 seed: int = 0, batch_size: int = 256) -> AccuracyReport:
    """Grade `k` samples per problem (temperature 0: one greedy sample counted k times) of `model` (a torch module
    or a sampler)."""
    n = 1 if temperature == 0 else k
    rollouts, texts = generate_texts(model, tokenizer, [prompt_token_ids(tokenizer, p) for p in problems], n,
                                     SamplingParams(max_new_tokens, temperature, top_p), seed, batch_size)
    verdicts = [grade(text, problems[i].answer) for text, i in zip(texts, rollouts.prompt_index)]
    correct = [0] * len(problems)
    for verdict, i in zip(verdicts, rollouts.prompt_index):
        correct[i] += verdict is Verdict.CORRECT
    counts = Counter(v.value for v in verdicts)
    profile = ScratchpadProfile()
    for text, i in zip(texts, rollouts.prompt_index):
        profile.add(text, problems[i].expression)
    return AccuracyReport(
        accuracy=sum(correct) / (n * len(problems)),
        k=n,
        problems=len(problems),
        correct_per_problem=correct,
        verdicts={v.value: counts.get(v.value, 0) for v in Verdict},
        mean_response_tokens=sum(len(r) for r in rollouts.response_ids) / len(rollouts.response_ids),
        slip_rate=profile.slip_rate,
        format_coverage=profile.format_coverage,
    )
