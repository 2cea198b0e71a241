"""What every objective shares: the gathered per-token tensors, the output, the spec, common pieces.

Notation of DESIGN.md §1, for one sampled token x_t:
    s_t    = log pi_S(x_t | c_t), with gradient        (`student_logprobs`)
    sbar_t = log-prob under the policy that sampled, no gradient (`old_logprobs`; s_t detached when None,
             i.e. on the first update of a rollout batch)
    tau_t  = log pi_T(x_t | c_t), temperature 1         (`teacher_logprobs`)
    r_t    = tau_t - sbar_t                             (K1 reward)
    rho_t  = exp(s_t - sbar_t)                          (importance ratio: 1 on the first update)

Every tensor shares one shape (any leading dims, e.g. [batch, tokens] or a flat [tokens]) with `mask`,
which is 1 on response tokens and 0 on padding; top-k tensors add a trailing k dimension. An objective
returns the per-token loss (zero where masked), the number of tokens its loss is averaged over
(`normaliser`: the response tokens unless the objective says otherwise) and metrics: means as
(numerator, denominator) pairs and minimums, so that micro-batches aggregate exactly. The step loss is
sum of per-token losses / sum of normalisers over the whole rollout batch.

Each objective is one module of this package with its loss as a pure function and a `SPEC`
(`ObjectiveSpec`): the options it reads, what it needs from scoring and data, and its own rules. The
trainer, the preflight, the data sources and export read those traits; no other module compares objective
names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from tropd_cli.config import ObjectiveConfig

LOG_PROB_FLOOR = math.log(1e-8)

Metrics = dict[str, tuple[float, float]]



@dataclass
class TokenStats:
    """Per-token quantities gathered by scoring; shapes: [...] or [..., k] for top-k."""

    student_logprobs: torch.Tensor  # s_t, with gradient
    teacher_logprobs: torch.Tensor  # tau_t
    mask: torch.Tensor  # 1 on response tokens, 0 on padding
    teacher_topk_logprobs: torch.Tensor | None = None  # [..., k] log pi_T over the teacher's top-k ids
    student_topk_logprobs: torch.Tensor | None = None  # [..., k] log pi_S at the same ids, with gradient
    old_logprobs: torch.Tensor | None = None  # sbar_t from the sampling policy; None: s_t detached
    old_topk_logprobs: torch.Tensor | None = None  # [..., k] the sampling policy's, for A_t; None: current detached
    teacher_entropy: torch.Tensor | None = None  # H(pi_T(. | c_t)), full vocabulary
    student_entropy: torch.Tensor | None = None  # H(pi_S(. | c_t)), full vocabulary, no gradient
    divergence: torch.Tensor | None = None  # a full-vocabulary divergence from the teacher, with gradient (gkd)


@dataclass
class ObjectiveOutput:
    per_token_loss: torch.Tensor
    normaliser: float
    metrics: Metrics = field(default_factory=dict)
    minimums: dict[str, float] = field(default_factory=dict)
    # 1 on the tokens the objective itself treats as outliers (tropd's realised M_t = 0), 0 elsewhere;
    # None: the trainer's `train.grad_norm_split` uses the expected trust test, `outlier_probability`
    outlier_weight: torch.Tensor | None = None

    def mean_loss(self) -> torch.Tensor:
        """The loss averaged over `normaliser` tokens (0 when there are none)."""
        return self.per_token_loss.sum() / max(self.normaliser, 1.0)


def float_mask(stats: TokenStats) -> torch.Tensor:
    """The response-token mask in the dtype of the log-probs."""
    return stats.mask.to(stats.student_logprobs.dtype)


def sampled_logprobs(stats: TokenStats) -> torch.Tensor:
    """sbar_t: the sampling policy's log-prob of x_t, no gradient."""
    old = stats.old_logprobs if stats.old_logprobs is not None else stats.student_logprobs
    return old.detach()


def k1_reward(stats: TokenStats) -> torch.Tensor:
    """r_t = tau_t - sbar_t (no gradient)."""
    return stats.teacher_logprobs.detach() - sampled_logprobs(stats)


def trust_probability(stats: TokenStats) -> torch.Tensor:
    """p_t = min(exp(tau_t - sbar_t), 1), the trust test's acceptance probability (no gradient)."""
    return torch.exp(k1_reward(stats).clamp(max=0.0))


def outlier_probability(stats: TokenStats) -> torch.Tensor:
    """(1 - p_t) on response tokens, 0 elsewhere: the chance that the trust test calls a token an outlier,
    the outlier share of an objective that draws no trust mask of its own (`train.grad_norm_split`)."""
    return (1.0 - trust_probability(stats)) * float_mask(stats)


def importance_ratio(stats: TokenStats) -> torch.Tensor:
    """rho_t = exp(s_t - sbar_t): 1 on the first update, with gradient grad s_t."""
    return torch.exp(stats.student_logprobs - sampled_logprobs(stats))


def reward_floor(lam: float) -> float:
    """c = log(lambda / (1 - lambda)), the reward floor of `clip` outliers and of REOPOLD."""
    return math.log(lam / (1.0 - lam))


def policy_gradient(advantage: torch.Tensor, stats: TokenStats, weight: torch.Tensor,
                    clip_epsilon: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """loss_t = -A_t rho_t on tokens with weight 1, PPO-clipped; returns (loss, clipped tokens).

    With epsilon: loss_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t); a clipped token
    (A_t > 0 and rho_t > 1 + eps, or A_t < 0 and rho_t < 1 - eps) carries its value and no gradient.
    `advantage` is zeroed where `weight` is 0 first, so that a non-finite value there cannot leak NaN
    into the gradient.
    """
    keep = weight.bool()
    advantage = torch.where(keep, advantage.detach(), torch.zeros_like(advantage))
    rho = importance_ratio(stats)
    clipped = torch.zeros_like(keep)
    if clip_epsilon is not None:
        ratio = rho.detach()
        clipped = keep & (((advantage > 0) & (ratio > 1 + clip_epsilon))
                          | ((advantage < 0) & (ratio < 1 - clip_epsilon)))
        rho = torch.where(clipped, ratio.clamp(1 - clip_epsilon, 1 + clip_epsilon), rho)
    return torch.where(keep, -advantage * rho, torch.zeros_like(rho)), clipped.to(weight.dtype)


def _topk_logq(stats: TokenStats) -> tuple[torch.Tensor, torch.Tensor]:
    if stats.teacher_topk_logprobs is None or stats.student_topk_logprobs is None:
        raise ValueError("this objective needs teacher and student top-k log-probs")
    teacher_topk = stats.teacher_topk_logprobs.detach()
    return teacher_topk - torch.logsumexp(teacher_topk, dim=-1, keepdim=True), stats.student_topk_logprobs


def topk_forward_kl_advantage(stats: TokenStats) -> torch.Tensor:
    """A_t = sum_{v in K_t} q(v) (max(log pi_S(v), log 1e-8) - log q(v)), no gradient.

    q is the teacher's distribution renormalised over its top-k ids K_t; A_t = -KL(q || pi_S) on K_t
    (with the student's log-probs from its full softmax), so A_t <= 0 up to the clamp. pi_S is the sampling
    policy (`old_topk_logprobs` when given), so that the advantage of a token stays fixed across the updates
    of one rollout batch, as r_t does.
    """
    log_q, student_topk = _topk_logq(stats)
    if stats.old_topk_logprobs is not None:
        student_topk = stats.old_topk_logprobs
    student_topk = student_topk.detach().clamp(min=LOG_PROB_FLOOR)
    return (log_q.exp() * (student_topk - log_q)).sum(dim=-1)


def topk_forward_kl(stats: TokenStats) -> torch.Tensor:
    """sum_{v in K_t} q(v) (log q(v) - log pi_S(v)): top-k forward KL, differentiable through log pi_S."""
    log_q, student_topk = _topk_logq(stats)
    return (log_q.exp() * (log_q - student_topk)).sum(dim=-1)


def mean_pair(numerator: torch.Tensor, denominator: torch.Tensor) -> tuple[float, float]:
    """A mean as (sum of numerator, sum of denominator), so that micro-batches add up exactly."""
    return float(numerator.detach().sum()), float(denominator.detach().sum())


def telemetry(stats: TokenStats, output: ObjectiveOutput, loss_tokens: torch.Tensor) -> ObjectiveOutput:
    """Add the metrics every objective reports to `output` (names are stable; see the README).

    reward_mean / reward_min: r_t over response tokens; kl_k1: mean of sbar_t - tau_t (the K1 estimate of
    KL(pi_S || pi_T)); fkl_topk: mean KL(q || pi_S) on K_t, unclamped like the top-k forward-KL losses, when
    top-k is gathered;
    teacher_entropy / student_entropy: mean full-vocabulary entropies; loss_token_fraction: tokens that
    carry loss over response tokens.
    """
    mask = float_mask(stats)
    reward = torch.where(mask.bool(), k1_reward(stats), torch.zeros_like(mask))
    metrics = output.metrics
    metrics["reward_mean"] = mean_pair(reward, mask)
    metrics["kl_k1"] = mean_pair(-reward, mask)
    metrics["loss_token_fraction"] = mean_pair(loss_tokens * mask, mask)
    if stats.teacher_topk_logprobs is not None and stats.student_topk_logprobs is not None:
        fkl = torch.where(mask.bool(), topk_forward_kl(stats).detach(), torch.zeros_like(mask))
        metrics["fkl_topk"] = mean_pair(fkl, mask)
    for name, entropy in (("teacher_entropy", stats.teacher_entropy),
                          ("student_entropy", stats.student_entropy)):
        if entropy is not None:
            metrics[name] = mean_pair(torch.where(mask.bool(), entropy.detach(), torch.zeros_like(mask)), mask)
    if mask.sum() > 0:
        output.minimums["reward_min"] = float(k1_reward(stats)[mask.bool()].min())
    return output


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, fraction: float) -> float:
    """The smallest entropy among the top ceil(fraction * n) of the n masked tokens (inf when n = 0)."""
    values = entropy.detach()[mask.bool()].flatten()
    if values.numel() == 0:
        return math.inf
    count = min(values.numel(), max(1, math.ceil(fraction * values.numel())))
    return float(values.topk(count).values[-1])


def high_entropy(stats: TokenStats, fraction: float, threshold: float | None) -> torch.Tensor:
    """1 on the response tokens whose student entropy is in the top `fraction` (of the whole rollout batch
    when the caller passes its `threshold`, else of the tokens given)."""
    if stats.student_entropy is None:
        raise ValueError("this objective needs the student's entropy")
    mask = float_mask(stats)
    entropy = stats.student_entropy.detach()
    if threshold is None:
        threshold = entropy_threshold(entropy, mask, fraction)
    return (entropy >= threshold).to(mask.dtype) * mask


@dataclass
class StepContext:
    """What an objective may read of the step besides the tokens."""

    step: int  # 0-based step of the run
    clip_epsilon: float | None  # train.clip_epsilon: PPO clip of rho_t (inactive on the first update)
    generator: torch.Generator | None = None  # seeded CPU generator of the trust test's draws
    entropy_threshold: float | None = None  # batch-wide student-entropy threshold (`entropy_fraction`)


Loss = Callable[[TokenStats, "ObjectiveConfig", StepContext], ObjectiveOutput]
# A per-position full-vocabulary divergence: (student logits, teacher logits) [chunk, vocab] -> [chunk].
DivergenceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sequences = Literal["student", "teacher_samples", "teacher_responses"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective as the rest of tropd sees it: its loss and its traits.

    `sequences` says what it trains on: student rollouts (with `on_policy_fraction`, that fraction of steps,
    the others on fresh teacher samples), fresh teacher samples every step, or one cached teacher response
    per prompt. `top_k_option` names the option that sets how many teacher top-k ids scoring gathers.
    """

    name: str
    loss: Loss
    summary: str  # one line: what it is and where it comes from
    options: tuple[str, ...] = ()  # ObjectiveConfig fields that change what it computes
    top_k_option: str = "top_k"  # scoring gathers the teacher's top-k for every objective (telemetry)
    sequences: Sequences = "student"
    on_policy_fraction: Callable[[ObjectiveConfig], float] | None = None
    teacher_entropy: bool = False  # needs the teacher's full-vocabulary entropy
    divergence: Callable[[ObjectiveConfig], DivergenceFn] | None = None  # full-vocabulary term (teacher logits)
    entropy_fraction: Callable[[ObjectiveConfig, int], float | None] | None = None  # batch-wide selection
    guidance: bool = False  # accepts objective.guidance

    def top_k(self, options: ObjectiveConfig) -> int:
        """How many teacher top-k ids scoring gathers."""
        return getattr(options, self.top_k_option)

    def selection_fraction(self, options: ObjectiveConfig, step: int) -> float | None:
        """The top fraction of tokens by student entropy, over the rollout batch, that it keeps at `step`."""
        return self.entropy_fraction(options, step) if self.entropy_fraction is not None else None

    def teacher_generates(self) -> bool:
        """Whether the teacher samples responses during a run for it (seqkd, gkd's off-policy steps)."""
        return self.sequences == "teacher_samples" or self.on_policy_fraction is not None

    def needs_teacher_responses(self, options: ObjectiveConfig) -> bool:
        """Whether it trains on one teacher response per prompt (sft, or guidance)."""
        return self.sequences == "teacher_responses" or (self.guidance and options.guidance)

    def teacher_needs(self) -> frozenset[str]:
        """What the teacher's scorer must return for it (see `engine/teacher.py`)."""
        needs = {"logprobs", "topk"}
        if self.teacher_entropy:
            needs.add("entropy")
        if self.divergence is not None:
            needs.add("full_logits")
        return frozenset(needs)
