"""The objectives TrOPD is compared against, in the same harness (DESIGN.md §1, "Baselines").

Each is a pure function of the gathered `TokenStats` (notation in `objectives.py`), returning an
`ObjectiveOutput` with the shared telemetry. Selections "by student entropy" use a threshold computed
over the whole rollout batch by the caller (`entropy_threshold`), or over the tokens given when none is
passed. `generalized_jsd` works on full-vocabulary logits of one chunk of positions at a time; scoring
applies it chunk by chunk and the `gkd` objective only sees its per-token values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tropd_cli.engine.objectives import (
    ObjectiveOutput,
    TokenStats,
    float_mask,
    k1_reward,
    mean_pair,
    policy_gradient,
    reward_floor,
    telemetry,
    topk_forward_kl,
)


def entropy_threshold(entropy: torch.Tensor, mask: torch.Tensor, fraction: float) -> float:
    """The smallest entropy among the top ceil(fraction * n) of the n masked tokens (inf when n = 0)."""
    values = entropy.detach()[mask.bool()].flatten()
    if values.numel() == 0:
        return math.inf
    count = min(values.numel(), max(1, math.ceil(fraction * values.numel())))
    return float(values.topk(count).values[-1])


def _student_entropy(stats: TokenStats) -> torch.Tensor:
    if stats.student_entropy is None:
        raise ValueError("this objective needs the student's entropy")
    return stats.student_entropy.detach()


def _high_entropy(stats: TokenStats, fraction: float, threshold: float | None) -> torch.Tensor:
    """1 on the response tokens whose student entropy is in the top `fraction`."""
    mask = float_mask(stats)
    entropy = _student_entropy(stats)
    if threshold is None:
        threshold = entropy_threshold(entropy, mask, fraction)
    return (entropy >= threshold).to(mask.dtype) * mask


def eopd(stats: TokenStats, entropy_min: float = 0.8, clip_epsilon: float | None = None) -> ObjectiveOutput:
    """Entropy-aware OPD (arXiv 2603.07079): loss_t = -r_t rho_t (PPO-clipped)
    + [H(pi_T(. | c_t)) > entropy_min] * sum_{v in K_t} q(v) (log q(v) - log pi_S(v)),

    with K_t the teacher's top-k ids (k = 16 in the paper) and q renormalised over them.
    """
    if stats.teacher_entropy is None:
        raise ValueError("eopd needs the teacher's entropy")
    mask = float_mask(stats)
    loss, clipped = policy_gradient(k1_reward(stats), stats, mask, clip_epsilon)
    uncertain = (stats.teacher_entropy.detach() > entropy_min).to(mask.dtype) * mask
    fkl = topk_forward_kl(stats)
    loss = loss + torch.where(uncertain.bool(), fkl, torch.zeros_like(fkl))
    output = ObjectiveOutput(loss, float(mask.sum()), {
        "fkl_token_fraction": mean_pair(uncertain, mask),
        "clip_fraction": mean_pair(clipped, mask),
    })
    return telemetry(stats, output, mask)


def reopold(stats: TokenStats, lam: float = 0.2, beta: float = 0.5, after_switch: bool = False,
            threshold: float | None = None, clip_epsilon: float | None = None) -> ObjectiveOutput:
    """REOPOLD (arXiv 2603.11137): rhat_t = max(r_t, c), c = log(lambda / (1 - lambda));
    M_t = [r_t >= c] before step T_switch, the top `beta` fraction by student entropy after it;
    loss = -sum_t M_t rhat_t rho_t / sum_t M_t (normalised by the kept tokens, not all tokens).
    """
    mask = float_mask(stats)
    floor = reward_floor(lam)
    reward = k1_reward(stats)
    if after_switch:
        kept = _high_entropy(stats, beta, threshold)
    else:
        kept = (reward >= floor).to(mask.dtype) * mask
    loss, clipped = policy_gradient(reward.clamp(min=floor), stats, kept, clip_epsilon)
    output = ObjectiveOutput(loss, float(kept.sum()), {"clip_fraction": mean_pair(clipped, kept)})
    return telemetry(stats, output, kept)


def entropy_opd(stats: TokenStats, top_fraction: float = 0.2, threshold: float | None = None,
                clip_epsilon: float | None = None) -> ObjectiveOutput:
    """OPD on the high-entropy tokens: M_t = [H(pi_S(. | c_t)) in the top `top_fraction`],
    loss = -sum_t M_t r_t rho_t / sum_t M_t (normalised by the selected tokens).
    """
    selected = _high_entropy(stats, top_fraction, threshold)
    loss, clipped = policy_gradient(k1_reward(stats), stats, selected, clip_epsilon)
    output = ObjectiveOutput(loss, float(selected.sum()), {"clip_fraction": mean_pair(clipped, selected)})
    return telemetry(stats, output, selected)


def fkl_topk(stats: TokenStats) -> ObjectiveOutput:
    """Top-k forward KL alone (ablation): loss_t = sum_{v in K_t} q(v) (log q(v) - log pi_S(v))."""
    mask = float_mask(stats)
    fkl = topk_forward_kl(stats)
    loss = torch.where(mask.bool(), fkl, torch.zeros_like(fkl))
    return telemetry(stats, ObjectiveOutput(loss, float(mask.sum())), mask)


def teacher_cross_entropy(stats: TokenStats) -> ObjectiveOutput:
    """`sft` and `seqkd`: loss_t = -s_t, the cross-entropy of the student on teacher-generated tokens.

    Off-policy reference points: the tokens come from the teacher, not the student, so r_t and rho_t play
    no part (the shared telemetry is still reported, on teacher tokens). The objectives differ only in
    their data, which the trainer chooses: `seqkd` (sequence-level KD, Kim & Rush 2016, as TRL's
    `GKDTrainer(seq_kd=True)`) samples fresh teacher responses every step, n per prompt at the rollout
    temperature; `sft` trains on one fixed teacher response per prompt, a distillation data set of
    teacher traces (as DeepSeek-R1-Distill's SFT), sampled once and cached (`guidance.TeacherResponses`).
    """
    mask = float_mask(stats)
    loss = torch.where(mask.bool(), -stats.student_logprobs, torch.zeros_like(stats.student_logprobs))
    return telemetry(stats, ObjectiveOutput(loss, float(mask.sum())), mask)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position generalized JSD of GKD (arXiv 2306.13649, eq. 1), as TRL's `generalized_jsd_loss`:

    m = beta pi_T + (1 - beta) pi_S, JSD(beta) = beta KL(pi_T || m) + (1 - beta) KL(pi_S || m), summed
    over the vocabulary; beta = 0 is KL(pi_T || pi_S) (forward) and beta = 1 is KL(pi_S || pi_T)
    (reverse), as in TRL. Logits are [..., vocab]; returns [...].
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    if beta == 1:
        return F.kl_div(teacher, student, reduction="none", log_target=True).sum(-1)
    mixture = torch.logsumexp(torch.stack([student + math.log1p(-beta), teacher + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(mixture, teacher, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(mixture, student, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def gkd(stats: TokenStats, divergence: torch.Tensor) -> ObjectiveOutput:
    """GKD: loss_t = JSD(beta)_t, the per-token divergence that scoring computed chunk by chunk."""
    mask = float_mask(stats)
    loss = torch.where(mask.bool(), divergence, torch.zeros_like(divergence))
    output = ObjectiveOutput(loss, float(mask.sum()), {"gkd_divergence": mean_pair(loss, mask)})
    return telemetry(stats, output, mask)
