"""Prompt generators: prompt sources that are code, not files.

A run's prompts (`data.prompts`, `tropd prepare --data`) come from a folder written by `tropd prepare` or
from a generator listed by name in `tropd_cli/data/__init__.py`. A generator also offers its held-out split
as a benchmark (a benchmarks.yaml entry whose `source` and `grader` are the generator's name), its own
grader, export's verification prompts and preflight's prompt probe: everything of it the rest of tropd uses
is its `SPEC` (`GeneratorSpec`), so no other module names it. Naming a generator (`is_generator`, the
configuration's checks) imports nothing; `get_generator` imports the one asked for, the way
`engine/objectives` lists objectives. The toy lab is the one built in.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from tropd_cli.data import GENERATORS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tropd_cli.config import RunConfig
    from tropd_cli.data.rows import PromptRow
    from tropd_cli.engine.generation import Generator


class GeneratedProblem(Protocol):
    """A generated problem as benchmarks see it: the user prompt and the gold answer."""

    @property
    def prompt(self) -> str: ...

    @property
    def answer(self) -> int | str: ...


@dataclass(frozen=True)
class GeneratorSpec:
    """One prompt generator as the rest of tropd sees it.

    `held_out` draws with the run's knobs when given a configuration, else with the generator's defaults
    (`tropd evaluate`); every draw is seeded, so a smaller count's problems are a prefix of a larger one's.
    """

    name: str
    # distill: endless batches of chat-formatted prompt ids (config, tokenizer, start_step), one per step
    training_prompts: Callable[[RunConfig, PreTrainedTokenizerBase, int], Iterator[list[list[int]]]]
    # prepare --data NAME: (config, seed) -> rows in draw order, meta["held_out"] saying each one's split,
    # and the manifest's source entry
    prepare_rows: Callable[[RunConfig, int], tuple[list[PromptRow], dict[str, Any]]]
    # benchmark and export verification: (seed, count, config or None) -> held-out problems
    held_out: Callable[[int, int, RunConfig | None], list[GeneratedProblem]]
    # the benchmark's grader: (response, gold answer) -> (the answer read, correct)
    grade: Callable[[str, str], tuple[str | None, bool]]
    # a run's held-out evaluation: (model or sampler, tokenizer, problems, config, k, temperature) -> accuracy and
    # more
    measure: Callable[[Generator, PreTrainedTokenizerBase, list[Any], RunConfig, int, float], dict[str, float]]
    # preflight's memory probe: (config, count) -> a seeded sample of prompt texts like training's
    probe_prompts: Callable[[RunConfig, int], list[str]]


@cache
def get_generator(name: str) -> GeneratorSpec:
    """The spec of generator `name` (a key of `GENERATORS`), its module imported on first use."""
    if name not in GENERATORS:
        raise KeyError(f"unknown prompt generator {name!r}; known: {', '.join(GENERATORS)}")
    spec = importlib.import_module(GENERATORS[name]).SPEC
    assert spec.name == name, f"{GENERATORS[name]} declares SPEC.name={spec.name!r}"
    return spec
