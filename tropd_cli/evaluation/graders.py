"""Graders: a response and a gold answer in, the extracted answer and its correctness out.

- math: math-verify, gold first. Its own timeouts use SIGALRM, which only works in the main thread,
  so they are switched off (`parsing_timeout=None`, `timeout_seconds=None`) and `grade_all` enforces
  a deadline per response from daemon worker threads instead.
- gsm8k: lm-evaluation-harness conventions: strict reads the number after `####`, flexible the last
  number in the text. Benchmarks use flexible; strict is offered for comparisons.
- choice: the option letter, from the last `\\boxed{X}`, else the last "answer is X" / "Answer: X",
  else a response that is only a letter.
- a prompt generator's name (toylab): the generator's own grader (`GeneratorSpec.grade`), its module imported
  only when one of its answers is graded.

Gold answers arrive already in grader form (`registry.load_problems`; e.g. `registry.gsm8k_gold`), so this
module reads responses only; it uses the registry's gsm8k number forms, and the registry never imports it.
"""

from __future__ import annotations

import logging
import queue
import re
import string
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

from math_verify import parse, verify

from tropd_cli.data.generators import get_generator
from tropd_cli.evaluation.registry import GSM8K_STRICT, EvalProblem, normalise_number

# math-verify warns once that its timeouts are off; grade_all provides them.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@dataclass(frozen=True)
class Grade:
    """What was read from a response (None: nothing) and whether it matches the gold answer."""

    extracted: str | None
    correct: bool
    timed_out: bool = False


def grade_math(response: str, gold: str) -> Grade:
    """math-verify equivalence of the response's final answer with the gold answer (gold parsed first).

    Several different `\\boxed{}` answers are read as one set, as math-verify does, so hedging is wrong.
    """
    gold_parsed = parse(f"${gold}$", parsing_timeout=None) or parse(gold, parsing_timeout=None)
    predicted = parse(response, parsing_timeout=None)
    if not predicted:
        return Grade(None, False)
    extracted = str(predicted[1] if len(predicted) > 1 else predicted[0])
    if not gold_parsed:  # a gold answer math-verify cannot read: compare the texts
        return Grade(extracted, extracted.strip() == gold.strip())
    return Grade(extracted, bool(verify(gold_parsed, predicted, timeout_seconds=None)))


_NUMBER = re.compile(r"-?[$]?[0-9][0-9,]*(?:\.[0-9]+)?")


def extract_gsm8k(response: str, mode: Literal["strict", "flexible"] = "flexible") -> str | None:
    """The answer number: after the last `####` (strict) or the last number anywhere (flexible)."""
    matches = (GSM8K_STRICT if mode == "strict" else _NUMBER).findall(response)
    return normalise_number(matches[-1]) if matches else None


def grade_gsm8k(response: str, gold: str, mode: Literal["strict", "flexible"] = "flexible") -> Grade:
    """Numeric equality of the extracted number with the gold one (commas, `$` and `12.00` forms agree)."""
    extracted = extract_gsm8k(response, mode)
    if extracted is None:
        return Grade(None, False)
    try:
        return Grade(extracted, Decimal(extracted) == Decimal(normalise_number(gold)))
    except InvalidOperation:
        return Grade(extracted, extracted == gold)


def extract_choice(response: str, options: int) -> str | None:
    """The chosen option letter among the first `options` letters, or None."""
    labels = string.ascii_uppercase[:options]
    letter = rf"([{labels}])"
    patterns = [
        rf"\\boxed\{{\s*(?:\\text\{{)?\s*\(?{letter}\)?\s*\}}?\s*\}}",
        rf"[Aa]nswer(?:\s+is)?\s*:?\s*\**\s*\(?{letter}\)?(?![A-Za-z])",
    ]
    for pattern in patterns:
        found = re.findall(pattern, response)
        if found:
            return found[-1]
    alone = re.fullmatch(rf"\s*\(?{letter}[).]?\s*", response)
    return alone.group(1) if alone else None


def grade_choice(response: str, gold: str, options: int) -> Grade:
    """The chosen letter against the gold letter."""
    extracted = extract_choice(response, options)
    return Grade(extracted, extracted == gold)


def grade_response(problem: EvalProblem, response: str) -> Grade:
    """Grade one response with its problem's grader."""
    if problem.grader == "math":
        return grade_math(response, problem.answer)
    if problem.grader == "gsm8k":
        return grade_gsm8k(response, problem.answer)
    if problem.grader == "choice":
        assert problem.choices is not None, "a choice problem without choices"
        return grade_choice(response, problem.answer, len(problem.choices))
    return Grade(*get_generator(problem.grader).grade(response, problem.answer))  # a generator's own


def grade_all(items: list[tuple[EvalProblem, str]], timeout_s: float = 10.0, workers: int = 4) -> list[Grade]:
    """Grade (problem, response) pairs on daemon worker threads, in order.

    A response not graded within `timeout_s` of the moment we start waiting for it counts as wrong
    (`timed_out`); its worker is abandoned (daemon threads never block exit) and the others go on.
    Exceptions in a grader are bugs and are re-raised here.
    """
    pending: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(items)):
        pending.put(index)
    results: list[Grade | BaseException | None] = [None] * len(items)
    done = [threading.Event() for _ in items]

    def work() -> None:
        while True:
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            try:
                results[index] = grade_response(*items[index])
            except BaseException as error:  # handed to the caller's thread
                results[index] = error
            done[index].set()

    for _ in range(min(workers, len(items))):
        threading.Thread(target=work, daemon=True, name="tropd-grader").start()
    grades = []
    for index, event in enumerate(done):
        if not event.wait(timeout_s):
            grades.append(Grade(None, False, timed_out=True))
            continue
        result = results[index]
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        grades.append(result)
    return grades
