"""Toy-task accuracy: sample k answers per held-out problem (or one greedy answer) and grade them.

One function used by the toy-lab builder, the demo, and the trainer's periodic evaluation, so that
every number about the toy lab is measured the same way. `chat_prompt_ids` and `generate_texts` are
the two steps it shares with `tropd evaluate`, which must reproduce the manifest's accuracies.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tropd_cli.engine.rollout import HFGenerateBackend, Rollouts, SamplingParams
from tropd_cli.toylab.tasks import Problem, Verdict, grade


@dataclass
class AccuracyReport:
    """avg@k accuracy (mean correctness over every sample) and what the samples looked like."""

    accuracy: float
    k: int
    problems: int
    correct_per_problem: list[int] = field(repr=False)
    verdicts: dict[str, int]
    mean_response_tokens: float


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, content: str, **template_kwargs: Any) -> list[int]:
    """One user message in the tokenizer's chat template, ending with the assistant header; the plain
    text, tokenized as the tokenizer does by default, when it has no template.

    `template_kwargs` reach the template (e.g. `enable_thinking`); templates ignore unknown ones.
    """
    if not tokenizer.chat_template:
        return list(tokenizer(content)["input_ids"])
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, **template_kwargs
    )
    return list(encoded["input_ids"])


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, problem: Problem) -> list[int]:
    """The chat-formatted prompt for a problem, ending with the assistant header."""
    return chat_prompt_ids(tokenizer, problem.prompt)


def generate_texts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
                   n: int, params: SamplingParams, seed: int, batch_size: int = 256,
                   stop_ids: list[int] | None = None) -> tuple[Rollouts, list[str]]:
    """`n` responses per prompt through the batched backend, and their decoded texts (special tokens dropped).
    Responses end at any of `stop_ids` (default: the tokenizer's EOS)."""
    stop_ids = [tokenizer.eos_token_id] if stop_ids is None else stop_ids
    backend = HFGenerateBackend(model, tokenizer.pad_token_id, stop_ids, batch_size)
    rollouts = backend.generate(prompt_ids, n, params, seed)
    return rollouts, tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)


def toy_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, problems: list[Problem],
                 k: int = 1, temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 64,
                 seed: int = 0, batch_size: int = 256) -> AccuracyReport:
    """Grade `k` samples per problem (temperature 0: one greedy sample counted k times)."""
    n = 1 if temperature == 0 else k
    rollouts, texts = generate_texts(model, tokenizer, [prompt_token_ids(tokenizer, p) for p in problems], n,
                                     SamplingParams(max_new_tokens, temperature, top_p), seed, batch_size)
    verdicts = [grade(text, problems[i].answer) for text, i in zip(texts, rollouts.prompt_index)]
    correct = [0] * len(problems)
    for verdict, i in zip(verdicts, rollouts.prompt_index):
        correct[i] += verdict is Verdict.CORRECT
    counts = Counter(v.value for v in verdicts)
    return AccuracyReport(
        accuracy=sum(correct) / (n * len(problems)),
        k=n,
        problems=len(problems),
        correct_per_problem=correct,
        verdicts={v.value: counts.get(v.value, 0) for v in Verdict},
        mean_response_tokens=sum(len(r) for r in rollouts.response_ids) / len(rollouts.response_ids),
    )
