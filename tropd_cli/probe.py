"""`tropd probe`: what a teacher-student pair looks like to on-policy distillation, before a step is taken.

On the first `prompts` problems of the preset's held-out benchmark (its `eval.benchmark`, at the run's knobs;
every benchmark has a grader), the probe samples `rollout.n` responses per problem from each model at the
rollout temperature and grades them with the benchmark's grader (avg@n accuracy). On the student's samples it
scores every response token with both models (temperature 1, as training does) and reads, in the notation of
DESIGN.md §1:

- the trust test's rejection rate by position: line starts (a response's first token, or one after a newline),
  sentence starts (after `.`, `!` or `?`) and the rest, over all tokens and over those of correct responses
  (where a rejection is style, not error). With `objective.trust: bernoulli` a token's rejection is its
  expected one, 1 - p_t = 1 - min(exp(r_t), 1) (`outlier_probability`); with `hard` it is [tau_t < sbar_t];
- the quantiles of the K1 reward r_t = tau_t - sbar_t;
- the share of the tokens with r_t < OUTLIER_REWARD, the share of sum |r_t| they carry, and how many of the
  responses holding one are wrong.

From these `recommend` draws a recommendation (`opd` or `tropd`, and which outlier form) and warnings, with the
evidence README reports for its two toy-lab comparisons. The pure pieces (`position_classes`,
`batch_statistics`, `recommend`) work on plain tensors; the toy lab's build gates its v3 pair with
`sampled_batch` and `batch_statistics`, so its manifest and this command measure the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tropd_cli.engine.objectives.base import TokenStats, outlier_probability
from tropd_cli.engine.objectives.tropd import trust_mask
from tropd_cli.engine.rollout import SamplingParams, make_rollout_backend
from tropd_cli.engine.scoring import build_sequences, chunk_positions, score_teacher, vocab_rows
from tropd_cli.errors import TropdError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

    from tropd_cli.config import RunConfig

OUTLIER_REWARD = -5.0  # r_t below this: a token the teacher finds e^5 (~150) times less likely than the student
POSITIONS = ("line_start", "sentence_start", "other")
SENTENCE_ENDS = (".", "!", "?")
QUANTILES = {"p01": 0.01, "p10": 0.1, "p50": 0.5, "p90": 0.9, "p99": 0.99}
DEFAULT_PROMPTS = 128

# The recommendation's thresholds (see `recommend`).
TEACHER_MARGIN = 0.10  # the teacher's accuracy must exceed the student's by this much to be "clearly above"
OUTLIER_ABS_SHARE = 0.50  # outliers that carry at least this share of sum |r| dominate OPD's signal
WRONG_SHARE = 0.80  # outliers concentrated on errors: at least this share of the responses holding one are wrong
STYLE_REJECTION = 0.10  # a line-start rejection rate above this (and twice the rest's) reads as style mismatch


@dataclass
class TokenBatch:
    """One batch of the student's samples as both models score them, flat over response tokens."""

    reward: torch.Tensor  # [tokens] r_t = tau_t - sbar_t
    position: torch.Tensor  # [tokens] index into POSITIONS
    response: torch.Tensor  # [tokens] the response each token belongs to
    wrong: list[bool] | None  # per response: graded wrong; None without a grader


def position_classes(response_ids: list[list[int]], token_text: Callable[[int], str]) -> torch.Tensor:
    """Each response token's position class (an index into POSITIONS), flat over the responses.

    A line start is a response's first token or one whose previous token's text ends with a newline; a
    sentence start follows a token whose text, trailing spaces and tabs removed, ends with `.`, `!` or `?`.
    """
    classes: list[int] = []
    for response in response_ids:
        for index, _ in enumerate(response):
            previous = token_text(response[index - 1]) if index else "\n"
            if previous.endswith("\n"):
                classes.append(0)
            elif previous.rstrip(" \t").endswith(SENTENCE_ENDS):
                classes.append(1)
            else:
                classes.append(2)
    return torch.tensor(classes, dtype=torch.long)


def rejection_rate(reward: torch.Tensor, trust: str) -> torch.Tensor:
    """Per token, the trust test's rejection: expected (1 - p_t) for `bernoulli`, realised [r_t < 0] for `hard`."""
    stats = TokenStats(student_logprobs=torch.zeros_like(reward), teacher_logprobs=reward,
                       mask=torch.ones_like(reward))
    if trust == "hard":
        return 1.0 - trust_mask(stats, "hard", None)
    return outlier_probability(stats)


def _rate(values: torch.Tensor) -> float | None:
    return round(float(values.double().mean()), 6) if values.numel() else None


def batch_statistics(batch: TokenBatch, trust: str = "bernoulli", threshold: float = OUTLIER_REWARD) -> dict:
    """The trust test's rejection by position, the reward's quantiles and the outliers (r_t < `threshold`) of
    `batch`; rates over no tokens (and the wrong share without a grader) are None."""
    reward = batch.reward.double()
    rejection = rejection_rate(reward, trust)
    by_position = {name: {"tokens": int((batch.position == index).sum()),
                          "rejection": _rate(rejection[batch.position == index])}
                   for index, name in enumerate(POSITIONS)}
    by_position["all"] = {"tokens": reward.numel(), "rejection": _rate(rejection)}
    in_correct = None  # the same on the tokens of correct responses: disagreement that is style, not error
    if batch.wrong is not None:
        correct = ~torch.tensor(batch.wrong, dtype=torch.bool)[batch.response] if reward.numel() else \
            torch.zeros(0, dtype=torch.bool)
        in_correct = {name: {"tokens": int((correct & (batch.position == index)).sum()),
                             "rejection": _rate(rejection[correct & (batch.position == index)])}
                      for index, name in enumerate(POSITIONS)}
        in_correct["all"] = {"tokens": int(correct.sum()), "rejection": _rate(rejection[correct])}
    quantiles = {"min": None, **dict.fromkeys(QUANTILES), "max": None}
    if reward.numel():
        values = torch.quantile(reward, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
        quantiles = {"min": round(float(reward.min()), 4),
                     **{name: round(float(v), 4) for name, v in zip(QUANTILES, values)},
                     "max": round(float(reward.max()), 4)}
    outlier = reward < threshold
    total = float(reward.abs().sum())
    holding = sorted(set(batch.response[outlier].tolist()))
    wrong_share = None
    if batch.wrong is not None and holding:
        wrong_share = round(sum(batch.wrong[i] for i in holding) / len(holding), 6)
    responses = len(batch.wrong) if batch.wrong is not None else int(batch.response.max()) + 1 if reward.numel() else 0
    return {
        "tokens": reward.numel(), "responses": responses, "trust": trust, "rejection": by_position,
        "rejection_in_correct_responses": in_correct,
        "reward_quantiles": quantiles,
        "outliers": {"threshold": threshold, "fraction": _rate(outlier.double()),
                     "abs_reward_share": round(float(reward[outlier].abs().sum()) / total, 6) if total else None,
                     "responses_holding": len(holding), "wrong_share": wrong_share},
        "wrong_responses": (round(sum(batch.wrong) / len(batch.wrong), 6)
                            if batch.wrong is not None and batch.wrong else None),
    }


@dataclass
class Recommendation:
    """What to distill with, why, and what to watch."""

    objective: str  # opd or tropd
    outlier: str | None  # tropd's objective.outlier, None for opd
    worth_it: bool  # False: the teacher is not clearly above the student
    reason: str
    warnings: list[str]


def recommend(teacher_accuracy: float | None, student_accuracy: float | None, statistics: dict) -> Recommendation:
    """A recommendation from the probe's numbers and README's two toy-lab comparisons.

    1. Teacher not clearly above the student (by TEACHER_MARGIN): `opd`, not worth it (toy lab v2: with a teacher
       below its students every objective lost accuracy and OPD lost least).
    2. Outliers (r < -5) that carry at least OUTLIER_ABS_SHARE of sum |r| and sit on wrong responses (at least
       WRONG_SHARE of the responses holding one; without a grader, on the rewards alone, with a warning): `tropd`
       with masked outliers (toy lab v1: a teacher at 100% against a student at 37%, masking beat OPD by
       +11.6 +- 2.2 points).
    3. Otherwise `opd`: outliers too few to dominate, or spread over correct responses (style, not error).
    Warnings: line starts rejected at more than STYLE_REJECTION and twice the rest's rate (the teacher writes
    lines differently: toy lab v2's line forms), read on correct responses when graded (so that errors, which the
    test should reject, do not count), and no grader.
    """
    warnings: list[str] = []
    correct = statistics.get("rejection_in_correct_responses")
    rejection = correct if correct is not None else statistics["rejection"]
    line, rest = rejection["line_start"]["rejection"], rejection["other"]["rejection"]
    where = " of correct responses" if correct is not None else ""
    if line is not None and line > STYLE_REJECTION and (rest is None or line > 2 * rest):
        warnings.append(f"the trust test rejects {line:.0%} of the line-start tokens{where} ({_percent(rest)} "
                        f"elsewhere): teacher and student start lines differently (style, not error)")
    graded = teacher_accuracy is not None and student_accuracy is not None
    if not graded:
        warnings.append("no grader: accuracies and the wrong share are unknown; the recommendation reads rewards "
                        "alone")
    if graded and teacher_accuracy - student_accuracy < TEACHER_MARGIN:
        return Recommendation("opd", None, False, f"teacher {teacher_accuracy:.0%} is not clearly above student "
                              f"{student_accuracy:.0%}: distillation is unlikely to pay (toy lab v2, a teacher below "
                              f"its students: every objective lost accuracy, OPD least)", warnings)
    outliers = statistics["outliers"]
    share, wrong = outliers["abs_reward_share"], outliers["wrong_share"]
    fraction = outliers["fraction"] or 0.0
    described = (f"tokens with r < {outliers['threshold']:g} are {fraction:.1%} of the sample and carry "
                 f"{_percent(share)} of sum |r|")
    on_errors = wrong is not None and wrong >= WRONG_SHARE
    if fraction > 0 and share is not None and share >= OUTLIER_ABS_SHARE and (on_errors or not graded):
        where = f"; {wrong:.0%} of the responses holding one are wrong" if wrong is not None else ""
        return Recommendation("tropd", "mask", True, f"{described}{where}: the teacher marks errors; masking them "
                              f"beat OPD by +11.6 +- 2.2 points on toy lab v1 (teacher 100%, student 37%)", warnings)
    if fraction > 0 and share is not None and share >= OUTLIER_ABS_SHARE:
        return Recommendation("opd", None, True, f"{described}, but only {_percent(wrong)} of the responses holding "
                              f"one are wrong: the teacher rejects correct work too (style); masking would hide it",
                              warnings)
    return Recommendation("opd", None, True, f"{described}: too few to dominate the reward, so the trust test "
                          f"changes little; OPD is the simpler choice", warnings)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


@torch.no_grad()
def sampled_batch(teacher: torch.nn.Module, student: torch.nn.Module, tokenizer, prompt_ids: list[list[int]],
                  samples: int, params: SamplingParams, seed: int, stop_ids: list[int],
                  correct: Callable[[int, str], bool] | None, batch_size: int = 256, score_batch_size: int = 64,
                  progress: Progress | None = None) -> TokenBatch:
    """The student's `samples` responses per prompt (`params`, `seed`; `batch_size` sequences per generate call),
    both models' log-probs of every response token (temperature 1, `score_batch_size` sequences per forward pass),
    each token's position class, and each response graded with `correct(prompt index, text)` when given."""
    device = next(student.parameters()).device
    rollouts = make_rollout_backend("hf", student, tokenizer.pad_token_id, stop_ids, batch_size).generate(
        prompt_ids, samples, params, seed)
    rewards = []
    task = progress.add_task("score", total=len(rollouts.response_ids)) if progress is not None else None
    for start in range(0, len(rollouts.response_ids), score_batch_size):
        rows = range(start, min(start + score_batch_size, len(rollouts.response_ids)))
        sequences = build_sequences([prompt_ids[rollouts.prompt_index[i]] for i in rows],
                                    [rollouts.response_ids[i] for i in rows], tokenizer.pad_token_id).to(device)
        teacher_logprobs = score_teacher(teacher, sequences, top_k=1,
                                         chunk_size=chunk_positions("auto", vocab_rows(teacher))).logprobs
        student_logprobs = score_teacher(student, sequences, top_k=1,
                                         chunk_size=chunk_positions("auto", vocab_rows(student))).logprobs
        rewards.append((teacher_logprobs - student_logprobs).float().cpu())
        if task is not None:
            progress.update(task, advance=len(rows))
    texts: dict[int, str] = {}

    def token_text(token_id: int) -> str:
        if token_id not in texts:
            texts[token_id] = tokenizer.decode([token_id])
        return texts[token_id]

    lengths = torch.tensor([len(r) for r in rollouts.response_ids])
    wrong = None
    if correct is not None:
        decoded = tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
        wrong = [not correct(index, text) for index, text in zip(rollouts.prompt_index, decoded)]
    return TokenBatch(reward=torch.cat(rewards) if rewards else torch.zeros(0),
                      position=position_classes(rollouts.response_ids, token_text),
                      response=torch.repeat_interleave(torch.arange(len(lengths)), lengths), wrong=wrong)


def avg_accuracy(model: torch.nn.Module, tokenizer, prompt_ids: list[list[int]], samples: int,
                 params: SamplingParams, seed: int, stop_ids: list[int], correct: Callable[[int, str], bool],
                 batch_size: int = 64) -> float:
    """avg@`samples` of `model` on the prompts: the mean of `correct` over every sampled response."""
    rollouts = make_rollout_backend("hf", model, tokenizer.pad_token_id, stop_ids, batch_size).generate(
        prompt_ids, samples, params, seed)
    texts = tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
    return sum(correct(index, text) for index, text in zip(rollouts.prompt_index, texts)) / max(1, len(texts))


def probe(config: RunConfig, prompts: int | None = None, out: Path | None = None,
          console: Console | None = None) -> dict:
    """Probe the pair of `config` on `prompts` held-out problems (default DEFAULT_PROMPTS); write the report as
    JSON to `out` when given, and return it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tropd_cli.engine.run import load_models
    from tropd_cli.evaluation.heldout import HeldOut
    from tropd_cli.files import atomic_write_json
    from tropd_cli.models import load_tokenizer, pick_device, stop_token_ids

    console = console or Console()
    prompts = DEFAULT_PROMPTS if prompts is None else prompts
    if prompts < 1:
        raise TropdError(f"--prompts must be at least 1, got {prompts}")
    if config.teacher.backend != "hf":
        raise TropdError(f"tropd probe scores with the teacher loaded here; teacher.backend={config.teacher.backend} "
                         f"is not supported (set teacher.backend=hf)")
    tokenizer = load_tokenizer(config.student.model, config.student.trust_remote_code)
    stop_ids = stop_token_ids(config.student.model, tokenizer)
    graded = config.eval.model_copy(update={"problems": prompts})
    held = HeldOut(config.model_copy(update={"eval": graded}), tokenizer, stop_ids)
    prompt_ids, correct = held.prompt_ids(), held.correct
    teacher, student = load_models(config, pick_device(config.train.device), None)
    student.eval()
    rollout = config.rollout
    params = SamplingParams(rollout.max_new_tokens, rollout.temperature, rollout.top_p)
    seed = config.train.seed
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        accuracy = {}
        task = progress.add_task("sample to grade", total=2)
        for name, model in (("teacher", teacher), ("student", student)):
            accuracy[name] = avg_accuracy(model, tokenizer, prompt_ids, rollout.n, params, seed, stop_ids, correct,
                                          rollout.batch_size)
            progress.update(task, advance=1)
        batch = sampled_batch(teacher, student, tokenizer, prompt_ids, rollout.n, params, seed, stop_ids, correct,
                              rollout.batch_size, config.train.micro_batch_size, progress)
    statistics = batch_statistics(batch, config.objective.trust)
    advice = recommend(accuracy["teacher"], accuracy["student"], statistics)
    report = {
        "teacher": config.teacher.model, "student": config.student.model,
        "benchmark": {"name": config.eval.benchmark, "source": held.source, "problems": len(prompt_ids)},
        "sampling": {"samples_per_prompt": rollout.n, "temperature": rollout.temperature, "top_p": rollout.top_p,
                     "max_new_tokens": rollout.max_new_tokens, "seed": seed},
        "accuracy": {name: round(value, 6) for name, value in accuracy.items()},
        **statistics,
        "recommendation": asdict(advice),
    }
    if out is not None:
        atomic_write_json(out, report)
    return report


def report_tables(report: dict) -> list:
    """The probe's report as rich tables: accuracies and outliers, rejection by position, reward quantiles."""
    from rich.table import Table

    def cell(value: float | None, percent: bool = True) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{100 * value:.1f}%" if percent else f"{value:.3g}"

    sampling = report["sampling"]
    pair = Table(title=f"probe: {report['teacher']} (teacher) vs {report['student']} (student)")
    pair.add_column("measure")
    pair.add_column("value", justify="right")
    at = (f"avg@{sampling['samples_per_prompt']}, T={sampling['temperature']:g}, "
          f"{report['benchmark']['problems']} problems")
    pair.add_row(f"teacher accuracy ({at})", cell(report["accuracy"]["teacher"]))
    pair.add_row(f"student accuracy ({at})", cell(report["accuracy"]["student"]))
    outliers = report["outliers"]
    pair.add_row(f"tokens with r < {outliers['threshold']:g}", cell(outliers["fraction"]))
    pair.add_row("their share of sum |r|", cell(outliers["abs_reward_share"]))
    pair.add_row("responses holding one", str(outliers["responses_holding"]))
    pair.add_row("... of which wrong", cell(outliers["wrong_share"]))
    positions = Table(title=f"trust test ({report['trust']}): rejection by position, "
                            f"{report['tokens']} tokens of {report['responses']} student responses")
    for column in ("position", "tokens", "rejected", "in correct responses"):
        positions.add_column(column, justify="left" if column == "position" else "right")
    correct = report["rejection_in_correct_responses"] or {}
    for name, row in report["rejection"].items():
        positions.add_row(name.replace("_", " "), str(row["tokens"]), cell(row["rejection"]),
                          cell(correct.get(name, {}).get("rejection")))
    quantiles = Table(title="reward r = log p_teacher - log p_student, quantiles")
    for name in report["reward_quantiles"]:
        quantiles.add_column(name, justify="right")
    quantiles.add_row(*(cell(v, percent=False) for v in report["reward_quantiles"].values()))
    return [pair, positions, quantiles]
