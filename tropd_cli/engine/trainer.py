"""The distillation loop: rollouts, scoring, objective, update, telemetry.

One step: draw `prompts_per_step` prompts, sample `n` student rollouts per prompt through the rollout
backend, score prompt+response in micro-batches (one teacher and one student forward each), compute the
objective, accumulate gradients over the micro-batches so that one optimizer step sees the whole rollout
batch with a token-mean loss, clip, and step AdamW. Knows nothing about files except the metrics
stream it is handed, and nothing about the command line.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tropd_cli.config import RunConfig
from tropd_cli.engine import objectives
from tropd_cli.engine.rollout import RolloutBackend, Rollouts, SamplingParams
from tropd_cli.engine.scoring import build_sequences, score_student, score_teacher


@dataclass
class Models:
    teacher: torch.nn.Module
    student: torch.nn.Module
    pad_token_id: int
    device: torch.device


def step_seed(seed: int, step: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, step, stream)."""
    return (seed * 1_000_003 + step * 7919 + stream) % (2**63 - 1)


def compute_objective(config: RunConfig, stats: objectives.TokenStats,
                      generator: torch.Generator) -> objectives.ObjectiveOutput:
    """Dispatch to the configured objective."""
    objective = config.objective
    if objective.name == "opd":
        return objectives.opd(stats)
    return objectives.tropd(stats, trust=objective.trust, outlier=objective.outlier, generator=generator)


class Trainer:
    """Runs optimizer steps on a student against a frozen teacher."""

    def __init__(self, config: RunConfig, models: Models, backend: RolloutBackend,
                 prompts: Iterator[list[list[int]]]) -> None:
        self.config = config
        self.models = models
        self.backend = backend
        self.prompts = prompts
        self.optimizer = torch.optim.AdamW(
            [p for p in models.student.parameters() if p.requires_grad],
            lr=config.train.lr, weight_decay=config.train.weight_decay,
        )
        warmup = config.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        self.step = 0

    def train_step(self) -> dict[str, float]:
        """One rollout batch and one optimizer step; returns the step's telemetry."""
        config, models = self.config, self.models
        started = time.perf_counter()
        prompt_ids = next(self.prompts)
        rollouts = self.backend.generate(
            prompt_ids, config.rollout.n,
            SamplingParams(config.rollout.max_new_tokens, config.rollout.temperature, config.rollout.top_p),
            step_seed(config.train.seed, self.step, 0),
        )
        rollout_s = time.perf_counter() - started

        started = time.perf_counter()
        metrics, loss_value, score_s = self._accumulate(rollouts)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in models.student.parameters() if p.requires_grad], config.train.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        update_s = time.perf_counter() - started - score_s

        lengths = [len(r) for r in rollouts.response_ids]
        record = {
            "step": self.step + 1,
            "loss": loss_value,
            **{name: (num / den if den else float("nan")) for name, (num, den) in metrics.items()},
            "grad_norm": float(grad_norm),
            "lr": lr,
            "response_length": sum(lengths) / len(lengths),
            "truncation_rate": 1 - sum(rollouts.finished) / len(rollouts.finished),
            "rollout_s": rollout_s,
            "score_s": score_s,
            "update_s": update_s,
        }
        self.step += 1
        return record

    def _accumulate(self, rollouts: Rollouts) -> tuple[objectives.Metrics, float, float]:
        """Score and backpropagate micro-batches; gradients sum to those of the token-mean loss."""
        config, models = self.config, self.models
        prompts = [rollouts.prompt_ids[i] for i in rollouts.prompt_index]
        total_tokens = sum(len(r) for r in rollouts.response_ids)
        generator = torch.Generator().manual_seed(step_seed(config.train.seed, self.step, 1))
        metrics: objectives.Metrics = {}
        loss_value = 0.0
        score_s = 0.0
        models.student.train()
        size = config.train.micro_batch_size
        for start in range(0, len(prompts), size):
            began = time.perf_counter()
            batch = build_sequences(prompts[start:start + size], rollouts.response_ids[start:start + size],
                                    models.pad_token_id).to(models.device)
            teacher = score_teacher(models.teacher, batch, config.objective.top_k,
                                    config.train.logit_chunk_size)
            student = score_student(models.student, batch, teacher.topk_ids, config.train.logit_chunk_size)
            stats = objectives.TokenStats(
                student_logprobs=student.logprobs, teacher_logprobs=teacher.logprobs,
                mask=torch.ones_like(teacher.logprobs), teacher_topk_logprobs=teacher.topk_logprobs,
                student_topk_logprobs=student.topk_logprobs,
            )
            output = compute_objective(config, stats, generator)
            loss = output.per_token_loss.sum() / max(total_tokens, 1)
            score_s += time.perf_counter() - began
            loss.backward()
            loss_value += float(loss.detach())
            for name, (num, den) in output.metrics.items():
                old_num, old_den = metrics.get(name, (0.0, 0.0))
                metrics[name] = (old_num + num, old_den + den)
            metrics.setdefault("teacher_entropy", (0.0, 0.0))
            metrics["teacher_entropy"] = (metrics["teacher_entropy"][0] + float(teacher.entropy.sum()),
                                          metrics["teacher_entropy"][1] + teacher.entropy.numel())
        return metrics, loss_value, score_s


def run_steps(trainer: Trainer, steps: int, on_step: Callable[[dict[str, float]], None]) -> None:
    """Run `steps` optimizer steps, handing each step's telemetry to `on_step`."""
    for _ in range(steps):
        on_step(trainer.train_step())
