"""The distillation loop: rollouts, scoring, objective, update, telemetry. Objective-agnostic.

One step: draw `prompts_per_step` prompts, get the step's sequences as the objective's spec says (`n`
student rollouts per prompt through the rollout backend; fresh teacher samples; one cached teacher response
per prompt; with guidance, student rollouts from a teacher prefix, see `guidance.py`), score
prompt+response in micro-batches sorted by length (the teacher once, through its scorer, and the student
once per update, through the strategy's wrapped scorer module), compute the objective, accumulate
gradients over the micro-batches, divide them by the objective's normaliser summed over the whole rollout
batch (so one optimizer step sees the batch's token-mean loss), clip, and step AdamW; then `sync` the
rollout backend to the new weights. `updates_per_batch` such updates reuse the batch with
rho_t = exp(s_t - sbar_t), sbar_t fixed at the sampling policy (always the trainer's own forward pass; a
sampler's log-probs, from vLLM, are only compared with it and, with `rollout.importance_correction: tis`,
turned into a truncated importance weight). Objectives that select tokens by student
entropy over the batch get a no-grad student pass first. With `train.grad_norm_split` the outlier tokens
of each micro-batch get a backward of their own, so that the step reports the share of the gradient they
carry. Knows nothing about files, the command line, the backends' internals or the number of processes
(that is the strategy's).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from tropd_cli.config import RunConfig
from tropd_cli.engine import guidance
from tropd_cli.engine.objectives.base import (
    Metrics,
    ObjectiveOutput,
    ObjectiveSpec,
    StepContext,
    TokenStats,
    entropy_threshold,
    mean_pair,
    outlier_probability,
)
from tropd_cli.engine.precision import autocast, autocast_dtype
from tropd_cli.engine.rollout import RolloutBackend, Rollouts, SamplingParams
from tropd_cli.engine.schedules import make_scheduler
from tropd_cli.engine.scoring import (
    Divergence,
    SequenceBatch,
    StudentScorer,
    StudentStats,
    TeacherStats,
    build_sequences,
    chunk_positions,
    decoder_and_head,
    vocab_rows,
)
from tropd_cli.engine.seeds import Stream, rank_seed, step_seed
from tropd_cli.engine.strategy import SingleDevice
from tropd_cli.engine.teacher import TeacherScorer, backend_missing
from tropd_cli.errors import TeacherUnavailable, TropdError


@dataclass
class Models:
    teacher: torch.nn.Module | None  # None when the teacher is served
    student: torch.nn.Module
    pad_token_id: int
    device: torch.device


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward of `model` drops anything: a dropout module with p > 0 (LoRA's
    included), or a dropout probability in its configuration (attention dropout is functional)."""
    if any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in model.modules()):
        return True
    config = getattr(model, "config", None)
    settings = config.get_text_config().to_dict() if config is not None else {}
    return any(isinstance(value, float) and value > 0 and ("dropout" in key or key.endswith("pdrop"))
               for key, value in settings.items())


def check_wiring(config: RunConfig, spec: ObjectiveSpec, vocab_size: int, scorer: TeacherScorer,
                 has_teacher_backend: bool, has_teacher_responses: bool, world_size: int = 1) -> None:
    """What the configuration cannot know: the sources the objective needs were given, its top-k fits the
    vocabulary, the teacher's scorer returns what it needs, and the number of processes suits the options.
    One line each, before the first step."""
    objective = config.objective
    if config.train.grad_norm_split and world_size > 1:
        raise TropdError(f"train.grad_norm_split needs one process (its outlier gradient is not summed over "
                         f"ranks), but {world_size} are training; set train.grad_norm_split=false")
    if spec.needs_teacher_responses(objective) and not has_teacher_responses:
        setting = "objective.guidance=true" if objective.guidance else f"objective.name={spec.name}"
        raise TropdError(f"{setting} needs teacher responses, but no teacher-response source was given")
    if spec.sequences == "teacher_samples" and not has_teacher_backend:
        raise TropdError(f"objective.name={spec.name} needs teacher responses, but no teacher sampler was given")
    top_k = spec.top_k(objective)
    if top_k > vocab_size:
        raise TropdError(f"objective.{spec.top_k_option}={top_k} is larger than the vocabulary "
                         f"({vocab_size} tokens)")
    if spec.on_policy_fraction is not None and spec.on_policy_fraction(objective) < 1 and not has_teacher_backend:
        raise TropdError(f"objective.name={spec.name} trains on teacher samples on some steps, but no teacher "
                         "sampler was given; set its on-policy fraction to 1")
    missing = backend_missing(spec.teacher_needs(), scorer.provides)
    if missing:
        raise TropdError(f"objective.name={spec.name} needs the teacher's {', '.join(missing)}, which its "
                         f"scorer cannot return")


@dataclass
class MicroBatch:
    """One micro-batch of a rollout batch, with what stays fixed across its updates."""

    sequences: SequenceBatch
    teacher: TeacherStats | None = None
    sampled: StudentStats | None = None  # detached student stats of the sampling policy (sbar_t, entropy)
    prefix_mask: torch.Tensor | None = None  # [tokens] 1 on guidance-prefix tokens (guidance only)
    sampler_logprobs: torch.Tensor | None = None  # [tokens] the sampler's log p (NaN: not sampled), vllm only


def micro_batches(rollouts: Rollouts, prefix_lengths: list[int] | None, size: int, pad_token_id: int,
                  device: torch.device) -> list[MicroBatch]:
    """The rollout batch in micro-batches of `size` sequences, longest prompt+response first.

    Sorting by length keeps the right-padding of each micro-batch small when response lengths vary (a
    micro-batch costs its longest sequence times its size), and puts the largest micro-batch first, so
    an out-of-memory error comes at once. The step's loss is a sum over tokens divided by the batch's
    normaliser, so the grouping changes no value beyond floating-point rounding.
    """
    prompts = [rollouts.prompt_ids[i] for i in rollouts.prompt_index]
    order = sorted(range(len(prompts)), key=lambda row: -(len(prompts[row]) + len(rollouts.response_ids[row])))
    micro = []
    for start in range(0, len(order), size):
        rows = order[start:start + size]
        responses = [rollouts.response_ids[row] for row in rows]
        item = MicroBatch(build_sequences([prompts[row] for row in rows], responses, pad_token_id).to(device))
        if prefix_lengths is not None:
            item.prefix_mask = guidance.prefix_token_mask([prefix_lengths[row] for row in rows],
                                                          [len(r) for r in responses]).to(device)
        if rollouts.logprobs is not None:
            item.sampler_logprobs = torch.tensor([lp for row in rows for lp in rollouts.logprobs[row]],
                                                 dtype=torch.float32, device=device)
        micro.append(item)
    return micro


class Trainer:
    """Runs optimizer steps on a student against a frozen teacher, with parts built elsewhere (`run.py`).

    `objective` is the objective's spec; `backend` samples the student's rollouts; `teacher_scorer` scores
    with the teacher; `strategy` trains across devices; `teacher_backend` samples the teacher (seqkd, gkd's
    off-policy steps, in-run teacher responses) and `teacher_responses` gives one teacher response per prompt
    (guidance, sft), for the objectives that need them.
    """

    def __init__(self, config: RunConfig, models: Models, backend: RolloutBackend,
                 prompts: Iterator[list[list[int]]], *, objective: ObjectiveSpec, teacher_scorer: TeacherScorer,
                 strategy: SingleDevice, teacher_backend: RolloutBackend | None = None,
                 teacher_responses: guidance.TeacherResponses | None = None) -> None:
        self.config = config
        self.spec = objective
        self.models = models
        self.backend = backend
        self.teacher_backend = teacher_backend
        self.teacher_responses = teacher_responses
        self.prompts = prompts
        self.strategy = strategy
        self.teacher_scorer = teacher_scorer
        dtype = autocast_dtype(config.train.autocast, models.device)
        self.autocast = lambda: autocast(models.device, dtype)
        check_wiring(config, self.spec, decoder_and_head(models.student)[1].weight.shape[0], self.teacher_scorer,
                     teacher_backend is not None, teacher_responses is not None, self.strategy.world_size)
        if config.train.gradient_checkpointing:
            if hasattr(models.student, "activation_checkpointing_enable"):  # transformers >= 5.x
                models.student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                models.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student_chunk = chunk_positions(config.train.logit_chunk_size, vocab_rows(models.student))
        self.scorer = self.strategy.wrap(StudentScorer(models.student, student_chunk))
        self.dropout = has_dropout(models.student)
        self.trainable = [p for p in self.scorer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.train.lr,
                                           weight_decay=config.train.weight_decay, fused=True)
        train = config.train
        self.scheduler = make_scheduler(self.optimizer, train.lr_schedule, train.warmup_steps, train.steps,
                                        train.lr_min_ratio)
        self.step = 0
        self.updates_in_step = 0

    def state_dict(self) -> dict:
        """What a resumed run needs besides the student's weights: step, optimizer, scheduler, and the
        teacher-response cache when its source keeps one."""
        state = {"step": self.step, "optimizer": self.strategy.optimizer_state_dict(self.optimizer),
                 "scheduler": self.scheduler.state_dict(), "world_size": self.strategy.world_size}
        if hasattr(self.teacher_responses, "state_dict"):
            state["teacher_responses"] = self.teacher_responses.state_dict()
            if self.strategy.world_size > 1:  # each rank caches the responses of its own prompts
                state["teacher_responses_by_rank"] = self.strategy.gather_objects(state["teacher_responses"])
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.strategy.load_optimizer_state_dict(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "teacher_responses" in state and hasattr(self.teacher_responses, "load_state_dict"):
            by_rank = state.get("teacher_responses_by_rank", [state["teacher_responses"]])
            self.teacher_responses.load_state_dict(by_rank[self.strategy.rank])

    def _rollouts(self, prompt_ids: list[list[int]]) -> tuple[Rollouts, bool, list[int] | None]:
        """The step's sequences as the objective's spec says: student rollouts, or teacher responses (sft,
        seqkd, gkd's off-policy steps); also whether on-policy and, with guidance, each rollout's prefix
        length."""
        config, spec = self.config, self.spec
        params = SamplingParams(config.rollout.max_new_tokens, config.rollout.temperature, config.rollout.top_p)
        seed = rank_seed(step_seed(config.train.seed, self.step, Stream.ROLLOUT), self.strategy.rank)
        if spec.sequences == "teacher_responses":
            responses = self.from_teacher(lambda: self.teacher_responses(prompt_ids))
            return guidance.reference_rollouts(prompt_ids, responses), False, None
        if spec.sequences == "teacher_samples":
            return self.from_teacher(lambda: self._teacher_samples(prompt_ids, params, seed)), False, None
        if config.objective.guidance:
            responses = self.from_teacher(lambda: self.teacher_responses(prompt_ids))
            rollouts, prefix_lengths = guidance.guided_rollouts(
                self.backend, prompt_ids, responses, self.step, config.train.steps,
                config.rollout.n, params, seed)
            return rollouts, True, prefix_lengths
        on_policy = True
        if spec.on_policy_fraction is not None:
            coin = torch.Generator().manual_seed(step_seed(config.train.seed, self.step, Stream.GKD_COIN))
            on_policy = float(torch.rand((), generator=coin)) < spec.on_policy_fraction(config.objective)
        if not on_policy:
            return self.from_teacher(lambda: self._teacher_samples(prompt_ids, params, seed)), False, None
        return self.backend.generate(prompt_ids, config.rollout.n, params, seed), True, None

    def _teacher_samples(self, prompt_ids: list[list[int]], params: SamplingParams, seed: int) -> Rollouts:
        """The teacher's samples, without a sampler's log-probs: those compare the student's sampler with the
        student (a vLLM engine that samples the teacher reports the teacher's)."""
        rollouts = self.teacher_backend.generate(prompt_ids, self.config.rollout.n, params, seed)
        return dataclasses.replace(rollouts, logprobs=None)

    def train_step(self) -> dict[str, float]:
        """One rollout batch and `updates_per_batch` optimizer steps; returns the step's telemetry."""
        config, models, strategy = self.config, self.models, self.strategy
        self.updates_in_step = 0  # optimizer steps taken in this step so far (a failed step may have none)
        started = time.perf_counter()
        rollouts, on_policy, prefix_lengths = self._rollouts(next(self.prompts))
        rollout_s = time.perf_counter() - started

        started = time.perf_counter()
        micro = micro_batches(rollouts, prefix_lengths, config.train.micro_batch_size, models.pad_token_id,
                              models.device)
        fraction = self.spec.selection_fraction(config.objective, self.step)
        if fraction is not None or self.dropout:
            self._score_sampling_policy(micro)
        threshold = self._entropy_threshold(micro, fraction) if fraction is not None else None
        metrics: Metrics = {}
        minimums: dict[str, float] = {}
        losses, grad_norms, lr, score_s, sync_s = [], [], self.scheduler.get_last_lr()[0], 0.0, 0.0
        split_norms: list[tuple[float, float]] = []
        for _ in range(config.train.updates_per_batch):
            outlier_grads = [None] * len(self.trainable) if config.train.grad_norm_split else None
            loss_value, seconds = self._accumulate(micro, threshold, metrics, minimums, prefix_lengths,
                                                   outlier_grads)
            score_s += seconds
            if outlier_grads is not None:
                split_norms.append(self._split_grad_norms(outlier_grads))
            grad_norms.append(strategy.clip_and_step(self.trainable, self.optimizer, config.train.max_grad_norm))
            self.updates_in_step += 1
            synced = time.perf_counter()
            self.backend.sync(models.student)  # a sampler with its own weights takes the new ones
            sync_s += time.perf_counter() - synced
            losses.append(loss_value)
        self.scheduler.step()
        update_s = time.perf_counter() - started - score_s - sync_s

        names = strategy.union_keys(list(metrics))
        sums = strategy.all_reduce_sum([value for name in names for value in metrics.get(name, (0.0, 0.0))])
        metrics = {name: (sums[2 * i], sums[2 * i + 1]) for i, name in enumerate(names)}
        batch = self._batch_sums(rollouts, prefix_lengths)
        guided: dict[str, float] = {}
        if prefix_lengths is not None:
            guided["prefix_length"] = batch["prefix_tokens"] / batch["rollouts"]
            for name in ("prefix_loss", "prefix_ce"):
                num, den = metrics.pop(name)
                guided[name] = num / den if den else 0.0
        record = {
            "step": self.step + 1,
            "loss": sum(losses) / len(losses),
            **{name: (num / den if den else float("nan")) for name, (num, den) in metrics.items()},
            **minimums,
            **guided,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            **self._split_record(split_norms),
            "lr": lr,
            "response_length": batch["generated_tokens"] / batch["rollouts"],
            "truncation_rate": 1 - batch["finished"] / batch["rollouts"],
            "rollout_s": rollout_s,
            "score_s": score_s,
            "update_s": update_s,
            "sync_s": sync_s,
            "tokens_per_s": batch["response_tokens"] / max(rollout_s + score_s + update_s + sync_s, 1e-9),
        }
        if models.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(models.device) / 2**30
        if self.spec.on_policy_fraction is not None:
            record["on_policy"] = float(on_policy)
        self.step += 1
        return record

    def _split_grad_norms(self, outlier_grads: list[torch.Tensor | None]) -> tuple[float, float]:
        """(|g_T|, |g_O|) of the scaled gradient g = g_T + g_O before clipping, norms over every trainable
        parameter taken as `clip_grad_norm_` takes them (each tensor's norm, then the norm of those)."""
        trusted, outlier = [], []
        for parameter, outlier_grad in zip(self.trainable, outlier_grads):
            grad = parameter.grad
            if grad is None and outlier_grad is None:
                continue
            grad = torch.zeros_like(parameter) if grad is None else grad
            outlier_grad = torch.zeros_like(grad) if outlier_grad is None else outlier_grad
            trusted.append(torch.linalg.vector_norm(grad - outlier_grad))
            outlier.append(torch.linalg.vector_norm(outlier_grad))
        if not trusted:
            return 0.0, 0.0
        return tuple(float(torch.linalg.vector_norm(torch.stack(norms))) for norms in (trusted, outlier))

    @staticmethod
    def _split_record(split_norms: list[tuple[float, float]]) -> dict[str, float]:
        """grad_norm_trusted, grad_norm_outlier (means over the updates, like grad_norm) and
        outlier_grad_share = outlier / (trusted + outlier), 0 when both are 0; nothing without the split."""
        if not split_norms:
            return {}
        trusted = sum(norms[0] for norms in split_norms) / len(split_norms)
        outlier = sum(norms[1] for norms in split_norms) / len(split_norms)
        total = trusted + outlier
        return {"grad_norm_trusted": trusted, "grad_norm_outlier": outlier,
                "outlier_grad_share": outlier / total if total else 0.0}

    def _batch_sums(self, rollouts: Rollouts, prefix_lengths: list[int] | None) -> dict[str, float]:
        """Counts over the whole rollout batch (every process's share summed): rollouts, finished ones,
        response tokens, of which generated by the student, and guidance-prefix tokens."""
        prefixes = prefix_lengths or [0] * len(rollouts.response_ids)
        response_tokens = sum(len(r) for r in rollouts.response_ids)
        names = ("rollouts", "finished", "response_tokens", "generated_tokens", "prefix_tokens")
        local = [len(rollouts.response_ids), sum(rollouts.finished), response_tokens,
                 response_tokens - sum(prefixes), sum(prefixes)]
        return dict(zip(names, self.strategy.all_reduce_sum([float(value) for value in local])))

    def _score_teacher(self, item: MicroBatch) -> TeacherStats:
        if item.teacher is None:
            item.teacher = self.from_teacher(lambda: self.teacher_scorer.score(
                item.sequences, self.spec.top_k(self.config.objective), keep_hidden=self.spec.divergence is not None))
        return item.teacher

    def from_teacher(self, call: Callable[[], Any]) -> Any:
        """`call` to a served teacher, agreed on by every rank: when it fails on any rank, every rank raises
        TeacherUnavailable here, before the step's next collective, so that they stop (and checkpoint) together;
        each raises the first failing rank's line. On one process, or with a teacher loaded here, just `call`."""
        if self.strategy.world_size == 1 or self.config.teacher.backend != "server":
            return call()
        try:
            result, failure = call(), None
        except TeacherUnavailable as error:
            result, failure = None, error
        if self.strategy.any(failure is not None):
            lines = self.strategy.gather_objects(None if failure is None else str(failure))
            raise failure or TeacherUnavailable(next(line for line in lines if line))
        return result

    @torch.no_grad()
    def _score_sampling_policy(self, micro: list[MicroBatch]) -> None:
        """sbar_t, its top-k and the student's entropy of every micro-batch, without gradients, before the
        first update: for a batch-wide entropy selection, and whenever the student has dropout, which must
        not reach the sampling policy's log-probs (the trust test and rho_t). Without dropout the scoring
        runs in training mode, so that these values equal those of the first update's own forward."""
        self.scorer.train(not self.dropout)
        for item in micro:
            teacher = self._score_teacher(item)
            with self.autocast():
                item.sampled = self.scorer(item.sequences, teacher.topk_ids)
        self.scorer.train()

    def _entropy_threshold(self, micro: list[MicroBatch], fraction: float) -> float:
        """The batch-wide student-entropy threshold over the sampling policy's entropies (every process's)."""
        entropy = self.strategy.all_gather(torch.cat([item.sampled.entropy for item in micro]))
        return entropy_threshold(entropy, torch.ones_like(entropy), fraction)

    def _accumulate(self, micro: list[MicroBatch], threshold: float | None, metrics: Metrics,
                    minimums: dict[str, float], prefix_lengths: list[int] | None = None,
                    outlier_grads: list[torch.Tensor | None] | None = None) -> tuple[float, float]:
        """One update's gradients: backpropagate each micro-batch's summed loss, then divide by the
        batch's normaliser (summed over every process). Adds the metrics to `metrics`/`minimums`; returns
        (loss, scoring seconds).

        With `outlier_grads` (one slot per trainable parameter, `train.grad_norm_split`) also accumulates
        there g_O, the gradient of the outlier tokens' share of the loss, sum_t w_t loss_t, with w_t the
        objective's `outlier_weight` or else 1 - p_t (`outlier_probability`), scaled like the gradient;
        the imitation term is trusted. It comes from its own `autograd.grad` before the backward, which
        therefore sees the same graph and leaves the same gradient.

        With guidance the objective sees only the student's generated tokens (its normaliser G is their
        count over the batch) and the imitation term is a token-mean over the batch's P prefix tokens; its
        sum is scaled by G / P before the shared division by G, so the step loss is
        objective mean + beta * mean CE on prefix tokens.
        """
        config, spec, strategy = self.config, self.spec, self.strategy
        imitation_scale = 0.0
        if prefix_lengths is not None:
            prefix_total, generated_total = strategy.all_reduce_sum([
                float(sum(prefix_lengths)),
                sum(float(item.prefix_mask.numel() - item.prefix_mask.sum()) for item in micro)])
            imitation_scale = generated_total / max(prefix_total, 1)
        context = StepContext(
            step=self.step, clip_epsilon=config.train.clip_epsilon, entropy_threshold=threshold,
            generator=torch.Generator().manual_seed(
                rank_seed(step_seed(config.train.seed, self.step, Stream.TRUST_MASK), strategy.rank)))
        divergence_fn = spec.divergence(config.objective) if spec.divergence is not None else None
        loss_sum, normaliser, score_s = 0.0, 0.0, 0.0
        self.scorer.train()
        for index, item in enumerate(micro):
            began = time.perf_counter()
            teacher = self._score_teacher(item)
            divergence = None
            if divergence_fn is not None:
                divergence = Divergence(divergence_fn, teacher.hidden, self.teacher_scorer.head)
            with strategy.no_sync(self.scorer, last=index == len(micro) - 1):
                with self.autocast():
                    student = self.scorer(item.sequences, teacher.topk_ids, divergence)
                if item.sampled is None:
                    item.sampled = StudentStats(student.logprobs.detach(), student.topk_logprobs.detach(),
                                                student.entropy)
                stats = TokenStats(
                    student_logprobs=student.logprobs, teacher_logprobs=teacher.logprobs,
                    mask=torch.ones_like(teacher.logprobs) if item.prefix_mask is None else 1 - item.prefix_mask,
                    teacher_topk_logprobs=teacher.topk_logprobs,
                    student_topk_logprobs=student.topk_logprobs, old_logprobs=item.sampled.logprobs,
                    old_topk_logprobs=item.sampled.topk_logprobs,
                    teacher_entropy=teacher.entropy, student_entropy=item.sampled.entropy,
                    divergence=student.divergence,
                )
                output = spec.loss(stats, config.objective, context)
                if item.sampler_logprobs is not None:
                    self._correct_for_sampler(item, output)
                loss = output.per_token_loss.sum()
                if item.prefix_mask is not None:
                    imitated = guidance.imitation(student.logprobs, item.prefix_mask,
                                                  config.objective.guidance_beta)
                    loss = loss + imitated.per_token_loss.sum() * imitation_scale
                    output.metrics.update(imitated.metrics)
                score_s += time.perf_counter() - began
                if loss.requires_grad:
                    if outlier_grads is not None:
                        self._add_outlier_gradient(output, stats, outlier_grads)
                    strategy.backward(loss)
            loss_sum += float(loss.detach())
            normaliser += output.normaliser
            for name, (num, den) in output.metrics.items():
                old_num, old_den = metrics.get(name, (0.0, 0.0))
                metrics[name] = (old_num + num, old_den + den)
            for name, value in output.minimums.items():
                minimums[name] = min(value, minimums.get(name, value))
        names = strategy.union_keys(list(minimums))
        minimums.update(zip(names, strategy.all_reduce_min([minimums.get(name, math.inf) for name in names])))
        loss_sum, normaliser = strategy.all_reduce_sum([loss_sum, normaliser])
        scale = 1.0 / max(normaliser, 1.0)
        strategy.scale_gradients(self.trainable, scale)
        for outlier_grad in outlier_grads or []:
            if outlier_grad is not None:
                outlier_grad.mul_(scale)
        return loss_sum * scale, score_s

    def _add_outlier_gradient(self, output: ObjectiveOutput, stats: TokenStats,
                              outlier_grads: list[torch.Tensor | None]) -> None:
        """Add the gradient of sum_t w_t loss_t (w_t: the outlier weight) to `outlier_grads`, keeping the
        graph for the micro-batch's own backward."""
        weight = output.outlier_weight if output.outlier_weight is not None else outlier_probability(stats)
        outlier_loss = (output.per_token_loss * weight.detach().to(output.per_token_loss.dtype)).sum()
        if not outlier_loss.requires_grad:
            return
        grads = torch.autograd.grad(outlier_loss, self.trainable, retain_graph=True, allow_unused=True)
        for index, grad in enumerate(grads):
            if grad is not None:
                if outlier_grads[index] is None:
                    outlier_grads[index] = grad
                else:
                    outlier_grads[index].add_(grad)

    def _correct_for_sampler(self, item: MicroBatch, output: ObjectiveOutput) -> None:
        """Compare the sampler's log-probs with the trainer's sbar_t and, with `importance_correction: tis`,
        weight each sampled token's loss by w_t = min(exp(sbar_t - log p_sampler), tis_cap), detached.

        sampler_logprob_gap = mean |log p_sampler - sbar_t| over the sampled tokens (a guidance prefix was not
        sampled); tis_weight = mean w_t over them.
        """
        sampled = torch.isfinite(item.sampler_logprobs)
        delta = torch.where(sampled, item.sampled.logprobs.detach().float() - item.sampler_logprobs,
                            torch.zeros_like(item.sampler_logprobs))
        count = sampled.float()
        output.metrics["sampler_logprob_gap"] = mean_pair(delta.abs(), count)
        rollout = self.config.rollout
        if rollout.importance_correction == "tis":
            weight = torch.where(sampled, delta.exp().clamp(max=rollout.tis_cap), torch.ones_like(delta))
            output.per_token_loss = output.per_token_loss * weight.to(output.per_token_loss.dtype)
            output.metrics["tis_weight"] = mean_pair(weight * count, count)
