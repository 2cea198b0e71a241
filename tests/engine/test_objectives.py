"""OPD and TrOPD against hand computations (values below were worked out by hand from DESIGN.md §1)."""

import math

import pytest
import torch

from tropd_cli.engine.objectives.base import ObjectiveOutput, TokenStats, topk_forward_kl, topk_forward_kl_advantage
from tropd_cli.engine.objectives.opd import opd
from tropd_cli.engine.objectives.tropd import tropd, trust_mask

LOG = math.log

# Three sampled tokens: student probs 0.5, 0.25, 0.8; teacher probs 0.25, 0.5, 0.01.
STUDENT = [LOG(0.5), LOG(0.25), LOG(0.8)]
TEACHER = [LOG(0.25), LOG(0.5), LOG(0.01)]
# r_t = tau_t - sbar_t = log(0.5), log(2), log(0.0125)
REWARD = [-0.6931471805599453, 0.6931471805599453, -4.382026634673881]
# Teacher top-2 probs per token and the student's probs at the same ids.
TEACHER_TOP2 = [[0.5, 0.25], [0.5, 0.25], [0.6, 0.3]]
STUDENT_AT_TOP2 = [[0.25, 0.5], [0.25, 0.5], [1e-12, 0.1]]
# A_1 = 2/3 (log .25 - log 2/3) + 1/3 (log .5 - log 1/3); A_3 clamps log 1e-12 to log 1e-8.
ADVANTAGE = [-0.5187311326384293, -0.5187311326384293, -12.411468025338113]


def stats(student=STUDENT, teacher=TEACHER, mask=(1.0, 1.0, 1.0)) -> TokenStats:
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    return TokenStats(
        student_logprobs=s,
        teacher_logprobs=torch.tensor(teacher, dtype=torch.float64),
        mask=torch.tensor(mask, dtype=torch.float64),
        teacher_topk_logprobs=torch.tensor(TEACHER_TOP2, dtype=torch.float64).log(),
        student_topk_logprobs=torch.tensor(STUDENT_AT_TOP2, dtype=torch.float64).log(),
    )


def loss_and_grad(output: ObjectiveOutput, token_stats: TokenStats):
    loss = output.mean_loss()
    loss.backward()
    return float(loss.detach()), token_stats.student_logprobs.grad.tolist()


def test_opd_loss_and_gradient_match_hand_computation():
    token_stats = stats()
    loss, grad = loss_and_grad(opd(token_stats), token_stats)
    assert loss == pytest.approx(1.4606755448912938, abs=1e-12)
    assert grad == pytest.approx([0.23104906018664842, -0.23104906018664842, 1.4606755448912938], abs=1e-12)


def test_opd_reward_goes_large_and_negative_when_teacher_probability_vanishes():
    token_stats = stats(teacher=[LOG(0.25), LOG(0.5), -60.0])
    output = opd(token_stats)
    num, den = output.metrics["reward_trusted"]
    assert den == 3.0 and num / den < -19
    assert float(output.mean_loss().detach()) > 19


def test_tropd_hard_trust_uses_fkl_advantage_on_outliers():
    token_stats = stats()
    output = tropd(token_stats, trust="hard")
    loss, grad = loss_and_grad(output, token_stats)
    # Only token 2 (teacher likes it more) is trusted: loss = -(A_1 + r_2 + A_3) / 3.
    assert loss == pytest.approx(4.079017325805532, abs=1e-12)
    assert grad == pytest.approx([0.1729103775461431, -0.23104906018664842, 4.137156008446038], abs=1e-12)
    assert output.metrics["trust_fraction"] == (1.0, 3.0)
    assert output.metrics["reward_outlier"][0] == pytest.approx(REWARD[0] + REWARD[2], abs=1e-12)


def test_fkl_advantage_renormalises_over_top_k_and_clamps_student_log_probs():
    advantage = topk_forward_kl_advantage(stats())
    assert advantage.tolist() == pytest.approx(ADVANTAGE, abs=1e-12)


def test_fkl_advantage_is_zero_when_student_matches_renormalised_teacher():
    token_stats = stats()
    token_stats.student_topk_logprobs = torch.tensor([[2 / 3, 1 / 3]] * 3, dtype=torch.float64).log()
    assert topk_forward_kl_advantage(token_stats).abs().max() < 1e-12


def test_bernoulli_trust_mask_follows_the_generator_draws():
    token_stats = stats()
    # Acceptance p_t = min(pi_T / pi_S, 1) = 0.5, 1, 0.0125.
    draws = torch.rand(3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = (draws < torch.tensor([0.5, 1.0, 0.0125], dtype=torch.float64)).double()
    mask = trust_mask(token_stats, "bernoulli", torch.Generator().manual_seed(7))
    assert mask.tolist() == expected.tolist()
    assert mask[1] == 1.0


def test_bernoulli_trust_rate_equals_acceptance_probability():
    n = 200_000
    token_stats = TokenStats(student_logprobs=torch.full((n,), LOG(0.5)),
                             teacher_logprobs=torch.full((n,), LOG(0.15)), mask=torch.ones(n))
    mask = trust_mask(token_stats, "bernoulli", torch.Generator().manual_seed(0))
    assert float(mask.mean()) == pytest.approx(0.3, abs=0.005)


def test_tropd_with_everything_trusted_equals_opd():
    token_stats = stats(teacher=[LOG(0.6), LOG(0.5), LOG(0.9)])
    tropd_loss, tropd_grad = loss_and_grad(tropd(token_stats), token_stats)
    token_stats = stats(teacher=[LOG(0.6), LOG(0.5), LOG(0.9)])
    opd_loss, opd_grad = loss_and_grad(opd(token_stats), token_stats)
    assert tropd_loss == pytest.approx(opd_loss, abs=1e-12)
    assert tropd_grad == pytest.approx(opd_grad, abs=1e-12)


def test_identical_teacher_and_student_give_zero_loss_and_full_trust():
    token_stats = stats(teacher=STUDENT)
    output = tropd(token_stats, generator=torch.Generator().manual_seed(0))
    assert float(output.mean_loss().detach()) == 0.0
    assert output.metrics["trust_fraction"] == (3.0, 3.0)


def test_teacher_probability_near_zero_gives_finite_tropd_loss():
    token_stats = stats(teacher=[LOG(0.25), LOG(0.5), -1e4])
    output = tropd(token_stats, trust="hard")
    loss, grad = loss_and_grad(output, token_stats)
    assert math.isfinite(loss) and all(math.isfinite(g) for g in grad)
    assert loss == pytest.approx(4.079017325805532, abs=1e-12)


def test_masked_positions_carry_no_loss_and_no_gradient():
    token_stats = stats(mask=(1.0, 0.0, 1.0))
    output = opd(token_stats)
    loss, grad = loss_and_grad(output, token_stats)
    assert loss == pytest.approx(-(REWARD[0] + REWARD[2]) / 2, abs=1e-12)
    assert grad[1] == 0.0
    assert output.metrics["trust_fraction"] == (2.0, 2.0)


def test_empty_response_gives_zero_loss():
    empty = TokenStats(student_logprobs=torch.zeros(0, requires_grad=True), teacher_logprobs=torch.zeros(0),
                       mask=torch.zeros(0), teacher_topk_logprobs=torch.zeros(0, 2),
                       student_topk_logprobs=torch.zeros(0, 2))
    output = tropd(empty, generator=torch.Generator().manual_seed(0))
    assert float(output.mean_loss().detach()) == 0.0


def test_unknown_trust_or_outlier_is_rejected():
    with pytest.raises(ValueError, match="trust test"):
        trust_mask(stats(), "soft", None)
    with pytest.raises(ValueError, match="outlier strategy"):
        tropd(stats(), outlier="drop")


# Top-2 forward KL per token, sum q (log q - log p_S): token 1 (and 2) 0.5187..., token 3 unclamped (p_S 1e-12).
FKL = [0.5187311326384293, 0.5187311326384293, 18.5516949399889]
Q = [2 / 3, 1 / 3]


def stats_with_topk_grad(**kwargs) -> TokenStats:
    token_stats = stats(**kwargs)
    token_stats.student_topk_logprobs.requires_grad_(True)
    return token_stats


def test_tropd_mask_outliers_carry_no_signal_but_count_in_the_mean():
    token_stats = stats()
    output = tropd(token_stats, trust="hard", outlier="mask")
    loss, grad = loss_and_grad(output, token_stats)
    # Only token 2 is trusted: loss = -r_2 / 3 = -log 2 / 3.
    assert loss == pytest.approx(-0.23104906018664842, abs=1e-12)
    assert grad == pytest.approx([0.0, -0.23104906018664842, 0.0], abs=1e-12)
    assert output.metrics["outlier_fraction"] == (2.0, 3.0)
    assert output.metrics["loss_token_fraction"] == (1.0, 3.0)


def test_tropd_clip_outliers_floor_the_reward_at_log_lambda_over_one_minus_lambda():
    token_stats = stats()
    output = tropd(token_stats, trust="hard", outlier="clip", clip_lambda=0.2)
    loss, grad = loss_and_grad(output, token_stats)
    # c = log(0.2 / 0.8) = log 0.25; outliers: max(log .5, c) = log .5, max(log .0125, c) = log .25.
    assert loss == pytest.approx(0.46209812037329684, abs=1e-12)
    assert grad == pytest.approx([0.23104906018664842, -0.23104906018664842, 0.46209812037329684], abs=1e-12)


def test_tropd_fkl_grad_differentiates_through_the_student_top_k():
    token_stats = stats_with_topk_grad()
    output = tropd(token_stats, trust="hard", outlier="fkl_grad")
    loss, grad = loss_and_grad(output, token_stats)
    # loss = (FKL_1 - log 2 + FKL_3) / 3; d/d log p_S(v) = -q(v) / 3 on the outliers only.
    assert loss == pytest.approx(6.125759630689128, abs=1e-12)
    assert grad == pytest.approx([0.0, -0.23104906018664842, 0.0], abs=1e-12)
    topk_grad = token_stats.student_topk_logprobs.grad.flatten().tolist()
    assert topk_grad == pytest.approx([-Q[0] / 3, -Q[1] / 3, 0.0, 0.0, -Q[0] / 3, -Q[1] / 3], abs=1e-12)


@pytest.mark.parametrize("outlier", ["fkl", "fkl_grad", "mask", "clip"])
def test_teacher_probability_near_zero_gives_finite_loss_for_every_outlier_strategy(outlier):
    token_stats = stats_with_topk_grad(teacher=[LOG(0.25), LOG(0.5), -1e4])
    loss, grad = loss_and_grad(tropd(token_stats, trust="hard", outlier=outlier), token_stats)
    assert math.isfinite(loss) and all(math.isfinite(g) for g in grad)
    assert abs(loss) < 10 or outlier in ("fkl", "fkl_grad")


@pytest.mark.parametrize("outlier", ["fkl", "fkl_grad", "mask", "clip"])
def test_every_token_an_outlier(outlier):
    token_stats = stats(teacher=[LOG(0.25), LOG(0.1), LOG(0.01)])
    output = tropd(token_stats, trust="hard", outlier=outlier)
    loss, grad = loss_and_grad(output, token_stats)
    assert output.metrics["trust_fraction"] == (0.0, 3.0) and output.metrics["outlier_fraction"] == (3.0, 3.0)
    # fkl: -(A_1 + A_2 + A_3) / 3 with A_t = -FKL_t (token 3 clamped, hence ADVANTAGE); fkl_grad: unclamped FKL.
    expected = {"fkl": -sum(ADVANTAGE) / 3, "fkl_grad": sum(FKL) / 3, "mask": 0.0,
                "clip": -(LOG(0.5) + LOG(0.4) + LOG(0.25)) / 3}[outlier]
    assert loss == pytest.approx(expected, abs=1e-12)
    if outlier == "mask":
        assert grad == [0.0, 0.0, 0.0] and output.metrics["loss_token_fraction"] == (0.0, 3.0)


@pytest.mark.parametrize("outlier", ["fkl", "fkl_grad", "mask", "clip"])
def test_identical_teacher_and_student_give_zero_loss_for_every_outlier_strategy(outlier):
    token_stats = stats(teacher=STUDENT)
    output = tropd(token_stats, outlier=outlier, generator=torch.Generator().manual_seed(0))
    assert float(output.mean_loss().detach()) == 0.0
    assert output.metrics["trust_fraction"] == (3.0, 3.0)


def test_top_k_equal_to_the_vocabulary_is_the_full_forward_kl():
    # Vocabulary of 3: teacher (0.5, 0.3, 0.2), student (0.2, 0.3, 0.5); KL(T || S) = .5 log 2.5 + .2 log .4.
    teacher = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64).log()
    student = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64).log()
    token_stats = TokenStats(student_logprobs=torch.tensor([LOG(0.2)], dtype=torch.float64),
                             teacher_logprobs=torch.tensor([LOG(0.5)], dtype=torch.float64),
                             mask=torch.ones(1, dtype=torch.float64), teacher_topk_logprobs=teacher,
                             student_topk_logprobs=student)
    assert float(topk_forward_kl(token_stats)[0]) == pytest.approx(0.27488721956224654, abs=1e-12)
    assert float(topk_forward_kl_advantage(token_stats)[0]) == pytest.approx(-0.27488721956224654)


@pytest.mark.parametrize("outlier", ["fkl", "fkl_grad", "mask", "clip"])
def test_padded_positions_are_ignored_even_when_they_hold_garbage(outlier):
    clean = stats_with_topk_grad(mask=(1.0, 0.0, 1.0))
    dirty = stats_with_topk_grad(mask=(1.0, 0.0, 1.0))
    with torch.no_grad():
        dirty.teacher_logprobs[1] = -math.inf
        dirty.teacher_topk_logprobs[1] = torch.tensor([math.nan, -math.inf])
    clean_loss, clean_grad = loss_and_grad(tropd(clean, trust="hard", outlier=outlier), clean)
    dirty_loss, dirty_grad = loss_and_grad(tropd(dirty, trust="hard", outlier=outlier), dirty)
    assert dirty_loss == pytest.approx(clean_loss, abs=1e-12) and math.isfinite(dirty_loss)
    assert dirty_grad == pytest.approx(clean_grad, abs=1e-12) and dirty_grad[1] == 0.0


def ppo_stats() -> TokenStats:
    # sbar from the sampling policy; s from the current one: rho = 1.25, 0.7, 1.1; r = log 2, log .5, log .5.
    return TokenStats(
        student_logprobs=torch.tensor([LOG(0.5), LOG(0.35), LOG(0.55)], dtype=torch.float64, requires_grad=True),
        teacher_logprobs=torch.tensor([LOG(0.8), LOG(0.25), LOG(0.25)], dtype=torch.float64),
        mask=torch.ones(3, dtype=torch.float64),
        old_logprobs=torch.tensor([LOG(0.4), LOG(0.5), LOG(0.5)], dtype=torch.float64),
    )


def test_ppo_clip_freezes_tokens_whose_ratio_left_the_trust_interval():
    token_stats = ppo_stats()
    output = opd(token_stats, clip_epsilon=0.2)
    loss, grad = loss_and_grad(output, token_stats)
    # Token 1: A > 0, rho 1.25 > 1.2 -> -1.2 log 2; token 2: A < 0, rho .7 < .8 -> .8 log 2; token 3 free.
    assert loss == pytest.approx(0.7 * LOG(2) / 3, abs=1e-12)
    assert grad == pytest.approx([0.0, 0.0, 1.1 * LOG(2) / 3], abs=1e-12)
    assert output.metrics["clip_fraction"] == (2.0, 3.0)


def test_without_clip_the_ratio_weights_the_reward():
    token_stats = ppo_stats()
    loss, grad = loss_and_grad(opd(token_stats, clip_epsilon=None), token_stats)
    assert loss == pytest.approx(0.55 * LOG(2) / 3, abs=1e-12)
    assert grad == pytest.approx([-1.25 * LOG(2) / 3, 0.7 * LOG(2) / 3, 1.1 * LOG(2) / 3], abs=1e-12)


def test_clip_is_inactive_on_the_first_update():
    token_stats = stats()
    clipped_loss, clipped_grad = loss_and_grad(tropd(token_stats, trust="hard", clip_epsilon=0.2),
                                               token_stats)
    assert clipped_loss == pytest.approx(4.079017325805532, abs=1e-12)
    assert clipped_grad == pytest.approx([0.1729103775461431, -0.23104906018664842, 4.137156008446038], abs=1e-12)


def test_telemetry_names_and_values():
    token_stats = stats()
    token_stats.teacher_entropy = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    token_stats.student_entropy = torch.tensor([0.3, 1.2, 0.9], dtype=torch.float64)
    output = tropd(token_stats, trust="hard")
    means = {name: num / den for name, (num, den) in output.metrics.items()}
    assert means["reward_mean"] == pytest.approx(sum(REWARD) / 3, abs=1e-12)
    assert means["kl_k1"] == pytest.approx(-sum(REWARD) / 3, abs=1e-12)
    assert means["fkl_topk"] == pytest.approx(sum(FKL) / 3, abs=1e-12)  # unclamped, like the losses
    assert means["teacher_entropy"] == pytest.approx(3.5 / 3) and means["student_entropy"] == pytest.approx(2.4 / 3)
    assert means["trust_fraction"] == pytest.approx(1 / 3) and means["outlier_fraction"] == pytest.approx(2 / 3)
    assert means["clip_fraction"] == 0.0 and means["loss_token_fraction"] == 1.0
    assert output.minimums["reward_min"] == pytest.approx(REWARD[2], abs=1e-12)


# A later update of the batch: the sampling policy (sbar) gave the tokens probs .2, .6, .8 and the current
# policy (s, STUDENT) gives .5, .25, .8, so rho = 2.5, 5/12, 1 and r = tau - sbar = log 1.25, log(5/6),
# log .0125. The hard trust test on sbar trusts token 1 only; on s it would trust token 2 only.
OLD = [LOG(0.2), LOG(0.6), LOG(0.8)]
RHO = [2.5, 0.25 / 0.6, 1.0]
OLD_REWARD = [LOG(1.25), LOG(0.5 / 0.6), LOG(0.0125)]


def later_update_stats() -> TokenStats:
    token_stats = stats_with_topk_grad()
    token_stats.old_logprobs = torch.tensor(OLD, dtype=torch.float64)
    return token_stats


def test_tropd_trust_test_and_ratio_use_the_sampling_policy():
    token_stats = later_update_stats()
    output = tropd(token_stats, trust="hard", outlier="mask")
    loss, grad = loss_and_grad(output, token_stats)
    # loss = -r_1 rho_1 / 3, d/ds_1 = -r_1 rho_1 / 3
    assert loss == pytest.approx(-OLD_REWARD[0] * RHO[0] / 3, abs=1e-12)
    assert grad == pytest.approx([-OLD_REWARD[0] * RHO[0] / 3, 0.0, 0.0], abs=1e-12)
    assert output.metrics["trust_fraction"] == (1.0, 3.0)
    assert output.metrics["reward_trusted"][0] == pytest.approx(OLD_REWARD[0], abs=1e-12)


def test_tropd_fkl_outliers_weight_the_detached_advantage_by_rho_and_leave_the_top_k_without_gradient():
    token_stats = later_update_stats()
    output = tropd(token_stats, trust="hard", outlier="fkl")
    loss, grad = loss_and_grad(output, token_stats)
    terms = [-OLD_REWARD[0] * RHO[0], -ADVANTAGE[1] * RHO[1], -ADVANTAGE[2] * RHO[2]]
    assert loss == pytest.approx(sum(terms) / 3, abs=1e-12)
    assert grad == pytest.approx([t / 3 for t in terms], abs=1e-12)  # d(-A rho)/ds = -A rho
    topk_grad = token_stats.student_topk_logprobs.grad
    assert topk_grad is None or not topk_grad.any()


def test_tropd_fkl_grad_differentiates_the_top_k_of_the_sampling_policy_outliers():
    token_stats = later_update_stats()
    output = tropd(token_stats, trust="hard", outlier="fkl_grad")
    loss, grad = loss_and_grad(output, token_stats)
    assert loss == pytest.approx((-OLD_REWARD[0] * RHO[0] + FKL[1] + FKL[2]) / 3, abs=1e-12)
    assert grad == pytest.approx([-OLD_REWARD[0] * RHO[0] / 3, 0.0, 0.0], abs=1e-12)
    topk_grad = token_stats.student_topk_logprobs.grad.flatten().tolist()
    assert topk_grad == pytest.approx([0.0, 0.0, -Q[0] / 3, -Q[1] / 3, -Q[0] / 3, -Q[1] / 3], abs=1e-12)


def test_opd_clip_on_a_later_update_uses_the_sampling_policy():
    token_stats = later_update_stats()
    output = opd(token_stats, clip_epsilon=0.2)
    loss, grad = loss_and_grad(output, token_stats)
    # token 1: A > 0, rho 2.5 > 1.2, clipped to 1.2; token 2: A < 0, rho 5/12 < .8, clipped to .8; token 3 free
    assert loss == pytest.approx(-(OLD_REWARD[0] * 1.2 + OLD_REWARD[1] * 0.8 + OLD_REWARD[2]) / 3, abs=1e-12)
    assert grad == pytest.approx([0.0, 0.0, -OLD_REWARD[2] / 3], abs=1e-12)
    assert output.metrics["clip_fraction"] == (2.0, 3.0)
