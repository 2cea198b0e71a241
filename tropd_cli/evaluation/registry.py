"""The benchmark registry (benchmarks.yaml) and the problems of one benchmark, from the hub or a local file.

A benchmark is data: where its problems live, which record fields hold the question and the gold answer,
its grader and its instruction. A benchmark whose source is a prompt generator (`data/generators.py`)
takes its problems from the generator's held-out split and, with the generator's name as its grader, is
graded by the generator. `load_problems` turns records into `EvalProblem`s whose gold answers are
already in the grader's form (the gsm8k number after `####`, the letter of a shuffled option), and
fingerprints them so that a report says exactly which problems were asked.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from tropd_cli.data import is_generator
from tropd_cli.data.generators import get_generator
from tropd_cli.errors import TropdError, first_line
from tropd_cli.evaluation import REGISTRY_PATH

SOURCES = ("hub", "local")  # besides prompt generators
GRADERS = ("math", "gsm8k", "choice")  # besides prompt generators' own
# A gsm8k final answer (`#### 1,434`): the gold answer's form, and what the strict grader reads in a response.
GSM8K_STRICT = re.compile(r"####\s*(-?[$]?[0-9][0-9,]*(?:\.[0-9]+)?)")


class HubSource(BaseModel):
    """A Hugging Face dataset: id, configuration and split."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Hub dataset id, e.g. openai/gsm8k.")
    config: str | None = Field(None, description="Dataset configuration name, if the dataset has several.")
    split: str = Field(description="Split holding the evaluation problems.")


class Fields(BaseModel):
    """Which record keys hold what."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="Key of the question text.")
    answer: str = Field(description="Key of the gold answer (the correct option's text or letter for choices).")
    choices: str | None = Field(None, description="Key of a list of options (multiple choice), if any.")
    incorrect: list[str] = Field(default_factory=list, description="Keys of wrong options (GPQA style).")


class Benchmark(BaseModel):
    """One registry entry (see the header of benchmarks.yaml for every key)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    source: str  # hub, local or a prompt generator's name
    hub: HubSource | None = None
    fields: Fields
    grader: str  # math, gsm8k, choice or a prompt generator's name
    instruction: str
    choice_instruction: str | None = None
    shuffle_choices: bool = False
    max_new_tokens: int = Field(ge=1)
    problems: int | None = Field(None, ge=1)

    @field_validator("source", "grader")
    @classmethod
    def _known(cls, value: str, info: ValidationInfo) -> str:
        names = SOURCES if info.field_name == "source" else GRADERS
        if value not in names and not is_generator(value):
            raise ValueError(f"{info.field_name} should be {', '.join(names)} or a prompt generator, not {value!r}")
        return value


@dataclass(frozen=True)
class EvalProblem:
    """A question as asked (options lettered, instruction applied) and its gold answer in grader form."""

    index: int
    question: str
    message: str
    answer: str
    grader: str  # a Benchmark's grader, or choice for a problem with options
    choices: tuple[str, ...] | None = None


@dataclass
class ProblemSet:
    """The problems of one benchmark, where they came from and a fingerprint of their content."""

    benchmark: Benchmark
    problems: list[EvalProblem]
    source: str
    fingerprint: str


@cache
def load_registry() -> dict[str, Benchmark]:
    """Every benchmark of benchmarks.yaml, by name."""
    raw = yaml.safe_load(REGISTRY_PATH.read_text())
    return {name: Benchmark(name=name, **entry) for name, entry in raw.items()}


def get_benchmark(name: str) -> Benchmark:
    """A registry entry by name; unknown names list the known ones."""
    registry = load_registry()
    if name not in registry:
        raise TropdError(f"unknown benchmark '{name}'; known benchmarks: {', '.join(registry)}")
    return registry[name]


def letters(count: int) -> str:
    """The option letters A, B, C, ... for `count` options."""
    if count > len(string.ascii_uppercase):
        raise TropdError(f"at most {len(string.ascii_uppercase)} options are supported, got {count}")
    return string.ascii_uppercase[:count]


def gsm8k_gold(answer_field: str) -> str:
    """The gold number of a gsm8k answer field (the text after `####`), normalised; the field itself if none."""
    match = GSM8K_STRICT.search(answer_field)
    return normalise_number(match.group(1)) if match else answer_field.strip()


def normalise_number(text: str) -> str:
    """A number as the gsm8k gold answers and graders write it: no thousands commas, no `$`, no final period."""
    return text.replace(",", "").replace("$", "").rstrip(".")


def load_problems(benchmark: Benchmark, data: Path | None, seed: int, limit: int | None) -> ProblemSet:
    """The first `limit` problems of a benchmark, from `data` (JSONL) when given, else from its source."""
    if limit is not None and limit < 1:
        raise TropdError(f"--limit must be at least 1, got {limit}")
    if is_generator(benchmark.source):
        if data is not None:
            raise TropdError(f"the {benchmark.name} benchmark generates its problems; it takes no --data")
        # a generator draws a seeded sequence, so any count's problems are a prefix of a larger one's.
        drawn = get_generator(benchmark.source).held_out(seed, limit or benchmark.problems or 500, None)
        problems = [EvalProblem(i, p.prompt, benchmark.instruction.format(prompt=p.prompt), str(p.answer),
                                benchmark.grader) for i, p in enumerate(drawn)]
        return _problem_set(benchmark, problems, f"{benchmark.source} held-out split, seed {seed}")
    if data is not None:
        records, digest = _read_jsonl(data)
        source = f"file {data} (sha256 {digest[:16]})"
    elif benchmark.source == "local":
        raise TropdError(f"the {benchmark.name} benchmark reads a local file: pass --data PATH (JSONL with "
                         f"{benchmark.fields.prompt!r} and {benchmark.fields.answer!r})")
    else:
        records, source = _read_hub(benchmark), _hub_label(benchmark)
    problems = []
    for line, record in records:
        if limit is not None and len(problems) >= limit:
            break
        problems.append(_to_problem(benchmark, record, len(problems), seed, where=line))
    if not problems:
        raise TropdError(f"no problems found for {benchmark.name} in {source}")
    return _problem_set(benchmark, problems, source)


def _problem_set(benchmark: Benchmark, problems: list[EvalProblem], source: str) -> ProblemSet:
    content = json.dumps([[p.message, p.answer, p.choices] for p in problems], ensure_ascii=False)
    return ProblemSet(benchmark, problems, source, hashlib.sha256(content.encode()).hexdigest()[:16])


def _to_problem(benchmark: Benchmark, record: dict, index: int, seed: int, where: str) -> EvalProblem:
    """One record as a problem; malformed records are user errors located at `where` (file:line)."""
    fields = benchmark.fields
    if not isinstance(record, dict):
        raise TropdError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get(fields.prompt) in (None, "") and isinstance(record.get("messages"), list):
        record = {**record, fields.prompt: _last_user_turn(record["messages"])}  # a prepared conversation row
    for key in (fields.prompt, fields.answer, *fields.incorrect):
        if record.get(key) in (None, ""):
            raise TropdError(f"{where}: missing field {key!r}")
    question, answer = str(record[fields.prompt]), str(record[fields.answer]).strip()
    options: list[str] | None = None
    if fields.incorrect:
        options = [answer, *(str(record[key]).strip() for key in fields.incorrect)]
    elif fields.choices and record.get(fields.choices) is not None:
        options = record[fields.choices]
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise TropdError(f"{where}: field {fields.choices!r} must be a list of at least two strings")
    if options is None:
        grader = benchmark.grader
        return EvalProblem(index, question, benchmark.instruction.format(prompt=question),
                           gsm8k_gold(answer) if grader == "gsm8k" else answer, grader)
    correct = _correct_option(options, answer, where)
    order = list(range(len(options)))
    if benchmark.shuffle_choices:
        random.Random(f"{seed}/{index}").shuffle(order)
    shuffled = [options[i] for i in order]
    labels = letters(len(shuffled))
    lettered = question + "\n\n" + "\n".join(f"{label}) {text}" for label, text in zip(labels, shuffled))
    instruction = benchmark.choice_instruction or benchmark.instruction
    return EvalProblem(index, question, instruction.format(prompt=lettered), labels[order.index(correct)],
                       "choice", tuple(shuffled))


def _last_user_turn(messages: list) -> str | None:
    """The content of a conversation's last user turn (`tropd prepare` cuts conversations after it)."""
    users = [turn.get("content") for turn in messages if isinstance(turn, dict) and turn.get("role") == "user"]
    return users[-1] if users else None


def _correct_option(options: list[str], answer: str, where: str) -> int:
    """The index of the gold option: `answer` is an option's text or its letter."""
    stripped = [option.strip() for option in options]
    if answer in stripped:
        return stripped.index(answer)
    labels = letters(len(options))
    if len(answer) == 1 and answer.upper() in labels:
        return labels.index(answer.upper())
    raise TropdError(f"{where}: answer {answer!r} is neither one of the choices nor a letter {labels[0]}-{labels[-1]}")


def _read_jsonl(path: Path) -> tuple[list[tuple[str, dict]], str]:
    """(file:line, record) for every non-blank line, and the file's sha256, from one read; invalid JSON
    is a one-line user error."""
    if not path.is_file():
        raise TropdError(f"data file {path} does not exist")
    raw = path.read_bytes()
    records = []
    for number, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise TropdError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    return records, hashlib.sha256(raw).hexdigest()


def _hub_label(benchmark: Benchmark) -> str:
    hub = benchmark.hub
    assert hub is not None, f"registry entry {benchmark.name} has source hub but no hub section"
    return f"hub {hub.dataset}" + (f" ({hub.config})" if hub.config else "") + f" split {hub.split}"


def _read_hub(benchmark: Benchmark) -> Iterable[tuple[str, dict]]:
    """Records of the benchmark's hub dataset; an unreachable hub says how to use a local copy."""
    hub = benchmark.hub
    label = _hub_label(benchmark)
    try:
        from datasets import load_dataset

        dataset = load_dataset(hub.dataset, hub.config, split=hub.split)
    except Exception as error:  # datasets raises many types for offline, gated or missing data
        first = first_line(error)
        raise TropdError(f"cannot load {label}: {first}; pass --data PATH with a local JSONL copy") from None
    return ((f"{label} row {row}", record) for row, record in enumerate(dataset, start=1))
