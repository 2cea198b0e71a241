"""A run's held-out evaluation (`eval.*`): the same problems, graded the same way, before, during
(`eval.every`) and after training, and again on an export.

A benchmark drawn by a prompt generator (`eval.benchmark: toylab`, the default) takes `eval.problems` of the
generator's held-out problems at the run's knobs and is measured by the generator itself (the toy lab's
`toy_accuracy`, exactly as its manifest and the demo measure). Any other benchmark of `tropd evaluate`
takes a seeded subset of `eval.problems` of its problems (from `eval.data`, or for `custom` by default the
prepared folder's `eval.jsonl`; hub benchmarks without `eval.data` need the hub) and grades them with the
benchmark's grader; `eval.k` samples per problem at `eval.temperature` (greedy at 0), responses of at most
`rollout.max_new_tokens`. The accuracy is avg@k, the mean correctness over every sample. With `eval.greedy`
and a sampling temperature, one greedy answer per problem is graded too (`greedy_accuracy`); a generator may
report more of its samples (the toy lab: `slip_rate`, `format_coverage`).
"""

from __future__ import annotations

import random
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from tropd_cli.config import RunConfig
from tropd_cli.data import is_generator
from tropd_cli.data.chat import chat_prompt_ids
from tropd_cli.data.generators import GeneratorSpec, get_generator
from tropd_cli.engine.generation import Generator, generate_texts
from tropd_cli.engine.rollout import SamplingParams
from tropd_cli.errors import TropdError
from tropd_cli.evaluation.graders import grade_all
from tropd_cli.evaluation.registry import EvalProblem, get_benchmark, load_problems


def eval_data_path(config: RunConfig) -> Path | None:
    """The local file of a run's benchmark: eval.data, else for a local-only benchmark (custom) the prepared
    folder's eval.jsonl; None for generated benchmarks and for hub benchmarks read from the hub."""
    if config.eval.data:
        return Path(config.eval.data)
    if get_benchmark(config.eval.benchmark).source == "local":
        return Path(config.data.prompts) / "eval.jsonl"
    return None


class HeldOut:
    """The run's held-out problems and how one model is graded on them (`accuracy`)."""

    def __init__(self, config: RunConfig, tokenizer: PreTrainedTokenizerBase,
                 stop_ids: list[int] | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.enabled = config.eval.problems > 0
        self.source = ""
        self.fingerprint: str | None = None
        source = get_benchmark(config.eval.benchmark).source
        # a generated benchmark is drawn and measured by its prompt generator
        self.generator: GeneratorSpec | None = get_generator(source) if is_generator(source) else None
        if not self.enabled:
            self.problems: list = []
        elif self.generator is not None:
            self.problems = self.generator.held_out(config.eval.seed, config.eval.problems, config)
            self.source = f"{source} held-out split, seed {config.eval.seed}"
        else:
            self.problems = self._benchmark_problems()

    def _benchmark_problems(self) -> list[EvalProblem]:
        config = self.config
        benchmark = get_benchmark(config.eval.benchmark)
        data = eval_data_path(config)
        if data is not None and not data.is_file():
            raise TropdError(f"eval.benchmark={benchmark.name} reads {data}, which does not exist; set eval.data "
                             f"to a local JSONL copy (or eval.problems=0 for no held-out evaluation)")
        problem_set = load_problems(benchmark, data, config.eval.seed, None)
        problems = problem_set.problems
        if len(problems) > config.eval.problems:  # a seeded subset, in the benchmark's order
            keep = sorted(random.Random(config.eval.seed).sample(range(len(problems)), config.eval.problems))
            problems = [problems[i] for i in keep]
        self.source, self.fingerprint = problem_set.source, problem_set.fingerprint
        return problems

    def protocol(self) -> dict:
        """What was asked and how, for summary.json and model cards."""
        eval_ = self.config.eval
        return {"benchmark": eval_.benchmark, "problems": len(self.problems), "k": eval_.k,
                "temperature": eval_.temperature, "seed": eval_.seed, "source": self.source,
                **({"greedy": True} if eval_.greedy and eval_.temperature > 0 else {}),
                **({"fingerprint": self.fingerprint} if self.fingerprint else {})}

    def accuracy(self, model: Generator) -> float:
        """avg@k of `model` (a torch module, or a sampler: a served or vLLM teacher) on the held-out problems."""
        return self._measure(model, self.config.eval.k, self.config.eval.temperature)["accuracy"]

    def measure(self, model: Generator) -> dict[str, float]:
        """avg@k of `model` on the held-out problems (`accuracy`), with `eval.greedy` also the greedy
        accuracy, and what a generator reports besides (the toy lab: slip rate and format coverage)."""
        eval_ = self.config.eval
        measured = self._measure(model, eval_.k, eval_.temperature)
        if eval_.greedy and eval_.temperature > 0:
            measured["greedy_accuracy"] = self._measure(model, 1, 0.0)["accuracy"]
        return measured

    def _measure(self, model: Generator, k: int, temperature: float) -> dict[str, float]:
        config = self.config
        if self.generator is not None:
            return self.generator.measure(model, self.tokenizer, self.problems, config, k, temperature)
        n = 1 if temperature == 0 else k
        prompts = self.prompt_ids()
        params = SamplingParams(config.rollout.max_new_tokens, temperature, 1.0)
        rollouts, texts = generate_texts(model, self.tokenizer, prompts, n, params, config.eval.seed,
                                         config.rollout.batch_size, self.stop_ids)
        grades = grade_all([(self.problems[i], text) for i, text in zip(rollouts.prompt_index, texts)])
        return {"accuracy": sum(grade.correct for grade in grades) / max(1, len(grades))}

    def prompt_ids(self) -> list[list[int]]:
        """The chat-formatted prompt of every held-out problem, as the model is asked it."""
        if self.generator is not None:
            return [chat_prompt_ids(self.tokenizer, problem.prompt) for problem in self.problems]
        thinking = {} if self.config.data.thinking is None else {"enable_thinking": self.config.data.thinking}
        return [chat_prompt_ids(self.tokenizer, problem.message, **thinking) for problem in self.problems]

    def correct(self, index: int, response: str) -> bool:
        """Whether `response` answers held-out problem `index` correctly, by the benchmark's grader."""
        if self.generator is not None:
            return self.generator.grade(response, str(self.problems[index].answer))[1]
        return grade_all([(self.problems[index], response)])[0].correct
