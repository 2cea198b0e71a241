"""The distillation loop: rollouts, scoring, objective, update, telemetry.

One step: draw `prompts_per_step` prompts, sample `n` student rollouts per prompt through the rollout
backend (gkd: teacher-sampled responses on a seeded 1 - gkd_lambda fraction of steps; seqkd: fresh
teacher samples; sft: the cached teacher response per prompt; guidance: student rollouts from a teacher
prefix, see `guidance.py`), score
prompt+response in micro-batches sorted by length (one teacher forward, cached, and one student forward
per update),
compute the objective, accumulate gradients over the micro-batches, divide them by the objective's
normaliser summed over the whole rollout batch (so one optimizer step sees the batch's token-mean loss),
clip, and step AdamW; `updates_per_batch` such updates reuse the batch with rho_t = exp(s_t - sbar_t),
sbar_t fixed at the sampling policy. Objectives that select tokens by student entropy over the batch get
a no-grad student pass first. Knows nothing about files except the metrics stream it is handed, and
nothing about the command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tropd_cli.config import RunConfig
from tropd_cli.engine import baselines, guidance, objectives
from tropd_cli.engine.precision import autocast, autocast_dtype
from tropd_cli.engine.rollout import RolloutBackend, Rollouts, SamplingParams
from tropd_cli.engine.scoring import (
    Divergence,
    SequenceBatch,
    StudentStats,
    TeacherStats,
    build_sequences,
    chunk_positions,
    decoder_and_head,
    score_student,
    score_teacher,
    vocab_rows,
)
from tropd_cli.engine.seeds import Stream, step_seed
from tropd_cli.errors import TropdError


@dataclass
class Models:
    teacher: torch.nn.Module
    student: torch.nn.Module
    pad_token_id: int
    device: torch.device


def scored_top_k(config: RunConfig) -> int:
    """How many teacher top-k ids scoring gathers for the configured objective."""
    objective = config.objective
    return objective.eopd_top_k if objective.name == "eopd" else objective.top_k


def entropy_selection(config: RunConfig, step: int) -> float | None:
    """The top fraction of tokens by student entropy that the objective keeps at `step`, if any."""
    objective = config.objective
    if objective.name == "entropy_opd":
        return objective.entropy_top_fraction
    if objective.name == "reopold" and step >= objective.reopold_switch_step:
        return objective.reopold_beta
    return None


def check_objective(config: RunConfig, vocab_size: int, has_teacher_backend: bool,
                    has_teacher_responses: bool = False) -> None:
    """Reject invalid combinations before the first step, in one line."""
    objective = config.objective
    if objective.guidance and objective.name != "tropd":
        raise TropdError(f"objective.guidance applies to objective.name=tropd, not {objective.name}; "
                         "set objective.guidance=false")
    for wanted, setting in ((objective.guidance, "objective.guidance=true"),
                            (objective.name == "sft", "objective.name=sft")):
        if wanted and not has_teacher_responses:
            raise TropdError(f"{setting} needs teacher responses, but no teacher-response source was given")
    if objective.name == "seqkd" and not has_teacher_backend:
        raise TropdError("objective.name=seqkd needs teacher responses, but no teacher sampler was given")
    top_k = scored_top_k(config)
    if top_k > vocab_size:
        field = "eopd_top_k" if config.objective.name == "eopd" else "top_k"
        raise TropdError(f"objective.{field}={top_k} is larger than the vocabulary ({vocab_size} tokens)")
    if config.objective.name == "gkd" and config.objective.gkd_lambda < 1 and not has_teacher_backend:
        raise TropdError("objective.gkd_lambda < 1 needs teacher responses, but no teacher sampler was given; "
                         "set objective.gkd_lambda=1")


def compute_objective(config: RunConfig, stats: objectives.TokenStats, generator: torch.Generator,
                      step: int, threshold: float | None, divergence: torch.Tensor | None
                      ) -> objectives.ObjectiveOutput:
    """Dispatch to the configured objective with its options."""
    objective, epsilon = config.objective, config.train.clip_epsilon
    name = objective.name
    if name == "opd":
        return objectives.opd(stats, clip_epsilon=epsilon)
    if name == "eopd":
        return baselines.eopd(stats, entropy_min=objective.eopd_entropy_min, clip_epsilon=epsilon)
    if name == "reopold":
        return baselines.reopold(stats, lam=objective.clip_lambda, beta=objective.reopold_beta,
                                 after_switch=step >= objective.reopold_switch_step, threshold=threshold,
                                 clip_epsilon=epsilon)
    if name == "entropy_opd":
        return baselines.entropy_opd(stats, top_fraction=objective.entropy_top_fraction, threshold=threshold,
                                     clip_epsilon=epsilon)
    if name == "fkl_topk":
        return baselines.fkl_topk(stats)
    if name in ("sft", "seqkd"):
        return baselines.teacher_cross_entropy(stats)
    if name == "gkd":
        assert divergence is not None
        return baselines.gkd(stats, divergence)
    return objectives.tropd(stats, trust=objective.trust, outlier=objective.outlier,
                            clip_lambda=objective.clip_lambda, generator=generator, clip_epsilon=epsilon)


@dataclass
class MicroBatch:
    """One micro-batch of a rollout batch, with what stays fixed across its updates."""

    sequences: SequenceBatch
    teacher: TeacherStats | None = None
    sampled: StudentStats | None = None  # detached student stats of the sampling policy (sbar_t, entropy)
    prefix_mask: torch.Tensor | None = None  # [tokens] 1 on guidance-prefix tokens (guidance only)


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
        micro.append(item)
    return micro


class Trainer:
    """Runs optimizer steps on a student against a frozen teacher."""

    def __init__(self, config: RunConfig, models: Models, backend: RolloutBackend,
                 prompts: Iterator[list[list[int]]], teacher_backend: RolloutBackend | None = None,
                 teacher_responses: guidance.TeacherResponses | None = None) -> None:
        self.config = config
        self.models = models
        self.backend = backend
        self.teacher_backend = teacher_backend
        self.teacher_responses = teacher_responses
        self.prompts = prompts
        _, head = decoder_and_head(models.student)
        chunk = config.train.logit_chunk_size
        self.teacher_chunk = chunk_positions(chunk, vocab_rows(models.teacher))
        self.student_chunk = chunk_positions(chunk, vocab_rows(models.student))
        check_objective(config, head.weight.shape[0], teacher_backend is not None, teacher_responses is not None)
        self.trainable = [p for p in models.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.train.lr,
                                           weight_decay=config.train.weight_decay, fused=True)
        warmup = config.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        self.step = 0
        dtype = autocast_dtype(config.train.autocast, models.device)
        self.autocast = lambda: autocast(models.device, dtype)
        if config.train.gradient_checkpointing:
            if hasattr(models.student, "activation_checkpointing_enable"):  # transformers >= 5.x
                models.student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                models.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def state_dict(self) -> dict:
        """What a resumed run needs besides the student's weights: step, optimizer, scheduler, and the
        teacher-response cache when its source keeps one."""
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if hasattr(self.teacher_responses, "state_dict"):
            state["teacher_responses"] = self.teacher_responses.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "teacher_responses" in state and hasattr(self.teacher_responses, "load_state_dict"):
            self.teacher_responses.load_state_dict(state["teacher_responses"])

    def _rollouts(self, prompt_ids: list[list[int]]) -> tuple[Rollouts, bool, list[int] | None]:
        """Student rollouts, or teacher responses (sft, seqkd, gkd's off-policy steps); also whether
        on-policy and, with guidance, each rollout's prefix length."""
        config = self.config
        params = SamplingParams(config.rollout.max_new_tokens, config.rollout.temperature, config.rollout.top_p)
        seed = step_seed(config.train.seed, self.step, Stream.ROLLOUT)
        name = config.objective.name
        if name == "sft":
            assert self.teacher_responses is not None
            return guidance.reference_rollouts(prompt_ids, self.teacher_responses(prompt_ids)), False, None
        if name == "seqkd":
            assert self.teacher_backend is not None
            return self.teacher_backend.generate(prompt_ids, config.rollout.n, params, seed), False, None
        if config.objective.guidance:
            assert self.teacher_responses is not None
            rollouts, prefix_lengths = guidance.guided_rollouts(
                self.backend, prompt_ids, self.teacher_responses(prompt_ids), self.step, config.train.steps,
                config.rollout.n, params, seed)
            return rollouts, True, prefix_lengths
        on_policy = True
        if config.objective.name == "gkd":
            coin = torch.Generator().manual_seed(step_seed(config.train.seed, self.step, Stream.GKD_COIN))
            on_policy = float(torch.rand((), generator=coin)) < config.objective.gkd_lambda
        backend = self.backend if on_policy else self.teacher_backend
        assert backend is not None
        return backend.generate(prompt_ids, config.rollout.n, params, seed), on_policy, None

    def train_step(self) -> dict[str, float]:
        """One rollout batch and `updates_per_batch` optimizer steps; returns the step's telemetry."""
        config, models = self.config, self.models
        started = time.perf_counter()
        rollouts, on_policy, prefix_lengths = self._rollouts(next(self.prompts))
        rollout_s = time.perf_counter() - started

        started = time.perf_counter()
        micro = micro_batches(rollouts, prefix_lengths, config.train.micro_batch_size, models.pad_token_id,
                              models.device)
        fraction = entropy_selection(config, self.step)
        threshold = self._entropy_threshold(micro, fraction) if fraction is not None else None
        metrics: objectives.Metrics = {}
        minimums: dict[str, float] = {}
        losses, grad_norms, lr, score_s = [], [], self.scheduler.get_last_lr()[0], 0.0
        for _ in range(config.train.updates_per_batch):
            loss_value, seconds = self._accumulate(micro, threshold, metrics, minimums, prefix_lengths)
            score_s += seconds
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.train.max_grad_norm)
            if torch.isfinite(grad_norm):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss_value)
            grad_norms.append(float(grad_norm))
        self.scheduler.step()
        update_s = time.perf_counter() - started - score_s

        prefixes = prefix_lengths or [0] * len(rollouts.response_ids)
        lengths = [len(r) - prefix for r, prefix in zip(rollouts.response_ids, prefixes)]
        guided: dict[str, float] = {}
        if prefix_lengths is not None:
            guided["prefix_length"] = sum(prefix_lengths) / len(prefix_lengths)
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
            "lr": lr,
            "response_length": sum(lengths) / len(lengths),
            "truncation_rate": 1 - sum(rollouts.finished) / len(rollouts.finished),
            "rollout_s": rollout_s,
            "score_s": score_s,
            "update_s": update_s,
            "tokens_per_s": sum(len(r) for r in rollouts.response_ids) / max(rollout_s + score_s + update_s, 1e-9),
        }
        if models.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(models.device) / 2**30
        if config.objective.name == "gkd":
            record["on_policy"] = float(on_policy)
        self.step += 1
        return record

    def _score_teacher(self, item: MicroBatch) -> TeacherStats:
        if item.teacher is None:
            config = self.config
            with self.autocast():
                item.teacher = score_teacher(self.models.teacher, item.sequences, scored_top_k(config),
                                             self.teacher_chunk,
                                             keep_hidden=config.objective.name == "gkd")
        return item.teacher

    @torch.no_grad()
    def _entropy_threshold(self, micro: list[MicroBatch], fraction: float) -> float:
        """Score the sampling policy without gradients; the batch-wide student-entropy threshold."""
        entropies = []
        self.models.student.train()
        for item in micro:
            teacher = self._score_teacher(item)
            with self.autocast():
                item.sampled = score_student(self.models.student, item.sequences, teacher.topk_ids,
                                             self.student_chunk)
            entropies.append(item.sampled.entropy)
        entropy = torch.cat(entropies)
        return baselines.entropy_threshold(entropy, torch.ones_like(entropy), fraction)

    def _accumulate(self, micro: list[MicroBatch], threshold: float | None, metrics: objectives.Metrics,
                    minimums: dict[str, float], prefix_lengths: list[int] | None = None) -> tuple[float, float]:
        """One update's gradients: backpropagate each micro-batch's summed loss, then divide by the
        batch's normaliser. Adds the metrics to `metrics`/`minimums`; returns (loss, scoring seconds).

        With guidance the objective sees only the student's generated tokens (its normaliser G is their
        count over the batch) and the imitation term is a token-mean over the batch's P prefix tokens; its
        sum is scaled by G / P before the shared division by G, so the step loss is
        objective mean + beta * mean CE on prefix tokens.
        """
        config, models = self.config, self.models
        imitation_scale = 0.0
        if prefix_lengths is not None:
            prefix_total = sum(prefix_lengths)
            generated_total = sum(float(item.prefix_mask.numel() - item.prefix_mask.sum()) for item in micro)
            imitation_scale = generated_total / max(prefix_total, 1)
        generator = torch.Generator().manual_seed(step_seed(config.train.seed, self.step, Stream.TRUST_MASK))
        jsd = None
        if config.objective.name == "gkd":
            beta = config.objective.gkd_beta
            jsd = lambda student, teacher: baselines.generalized_jsd(student, teacher, beta)  # noqa: E731
        loss_sum, normaliser, score_s = 0.0, 0.0, 0.0
        models.student.train()
        for item in micro:
            began = time.perf_counter()
            teacher = self._score_teacher(item)
            divergence = None
            if jsd is not None:
                divergence = Divergence(jsd, teacher.hidden, decoder_and_head(models.teacher)[1])
            with self.autocast():
                student = score_student(models.student, item.sequences, teacher.topk_ids,
                                        self.student_chunk, divergence)
            if item.sampled is None:
                item.sampled = StudentStats(student.logprobs.detach(), student.topk_logprobs.detach(),
                                            student.entropy)
            stats = objectives.TokenStats(
                student_logprobs=student.logprobs, teacher_logprobs=teacher.logprobs,
                mask=torch.ones_like(teacher.logprobs) if item.prefix_mask is None else 1 - item.prefix_mask,
                teacher_topk_logprobs=teacher.topk_logprobs,
                student_topk_logprobs=student.topk_logprobs, old_logprobs=item.sampled.logprobs,
                teacher_entropy=teacher.entropy, student_entropy=item.sampled.entropy,
            )
            output = compute_objective(config, stats, generator, self.step, threshold, student.divergence)
            loss = output.per_token_loss.sum()
            if item.prefix_mask is not None:
                imitated = guidance.imitation(student.logprobs, item.prefix_mask, config.objective.guidance_beta)
                loss = loss + imitated.per_token_loss.sum() * imitation_scale
                output.metrics.update(imitated.metrics)
            score_s += time.perf_counter() - began
            if loss.requires_grad:
                loss.backward()
            loss_sum += float(loss.detach())
            normaliser += output.normaliser
            for name, (num, den) in output.metrics.items():
                old_num, old_den = metrics.get(name, (0.0, 0.0))
                metrics[name] = (old_num + num, old_den + den)
            for name, value in output.minimums.items():
                minimums[name] = min(value, minimums.get(name, value))
        scale = 1.0 / max(normaliser, 1.0)
        for parameter in self.trainable:
            if parameter.grad is not None:
                parameter.grad.mul_(scale)
        return loss_sum * scale, score_s


def run_steps(trainer: Trainer, steps: int, on_step: Callable[[dict[str, float]], None]) -> None:
    """Run `steps` optimizer steps, handing each step's telemetry to `on_step`."""
    for _ in range(steps):
        on_step(trainer.train_step())
