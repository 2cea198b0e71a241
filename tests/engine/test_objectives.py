"""OPD and TrOPD against hand computations (values below were worked out by hand from DESIGN.md §1)."""

import math

import pytest
import torch

from tropd_cli.engine import objectives
from tropd_cli.engine.objectives import TokenStats

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


def loss_and_grad(output: objectives.ObjectiveOutput, token_stats: TokenStats):
    loss = output.mean_loss(token_stats.mask)
    loss.backward()
    return float(loss.detach()), token_stats.student_logprobs.grad.tolist()


def test_opd_loss_and_gradient_match_hand_computation():
    token_stats = stats()
    loss, grad = loss_and_grad(objectives.opd(token_stats), token_stats)
    assert loss == pytest.approx(1.4606755448912938, abs=1e-12)
    assert grad == pytest.approx([0.23104906018664842, -0.23104906018664842, 1.4606755448912938], abs=1e-12)


def test_opd_reward_goes_large_and_negative_when_teacher_probability_vanishes():
    token_stats = stats(teacher=[LOG(0.25), LOG(0.5), -60.0])
    output = objectives.opd(token_stats)
    num, den = output.metrics["reward_trusted"]
    assert den == 3.0 and num / den < -19
    assert float(output.mean_loss(token_stats.mask)) > 19


def test_tropd_hard_trust_uses_fkl_advantage_on_outliers():
    token_stats = stats()
    output = objectives.tropd(token_stats, trust="hard")
    loss, grad = loss_and_grad(output, token_stats)
    # Only token 2 (teacher likes it more) is trusted: loss = -(A_1 + r_2 + A_3) / 3.
    assert loss == pytest.approx(4.079017325805532, abs=1e-12)
    assert grad == pytest.approx([0.1729103775461431, -0.23104906018664842, 4.137156008446038], abs=1e-12)
    assert output.metrics["trust_fraction"] == (1.0, 3.0)
    assert output.metrics["reward_outlier"][0] == pytest.approx(REWARD[0] + REWARD[2], abs=1e-12)


def test_fkl_advantage_renormalises_over_top_k_and_clamps_student_log_probs():
    advantage = objectives.topk_forward_kl_advantage(stats())
    assert advantage.tolist() == pytest.approx(ADVANTAGE, abs=1e-12)


def test_fkl_advantage_is_zero_when_student_matches_renormalised_teacher():
    token_stats = stats()
    token_stats.student_topk_logprobs = torch.tensor([[2 / 3, 1 / 3]] * 3, dtype=torch.float64).log()
    assert objectives.topk_forward_kl_advantage(token_stats).abs().max() < 1e-12


def test_bernoulli_trust_mask_follows_the_generator_draws():
    token_stats = stats()
    # Acceptance p_t = min(pi_T / pi_S, 1) = 0.5, 1, 0.0125.
    draws = torch.rand(3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    expected = (draws < torch.tensor([0.5, 1.0, 0.0125], dtype=torch.float64)).double()
    mask = objectives.trust_mask(token_stats, "bernoulli", torch.Generator().manual_seed(7))
    assert mask.tolist() == expected.tolist()
    assert mask[1] == 1.0


def test_bernoulli_trust_rate_equals_acceptance_probability():
    n = 200_000
    token_stats = TokenStats(student_logprobs=torch.full((n,), LOG(0.5)),
                             teacher_logprobs=torch.full((n,), LOG(0.15)), mask=torch.ones(n))
    mask = objectives.trust_mask(token_stats, "bernoulli", torch.Generator().manual_seed(0))
    assert float(mask.mean()) == pytest.approx(0.3, abs=0.005)


def test_tropd_with_everything_trusted_equals_opd():
    token_stats = stats(teacher=[LOG(0.6), LOG(0.5), LOG(0.9)])
    tropd_loss, tropd_grad = loss_and_grad(objectives.tropd(token_stats), token_stats)
    token_stats = stats(teacher=[LOG(0.6), LOG(0.5), LOG(0.9)])
    opd_loss, opd_grad = loss_and_grad(objectives.opd(token_stats), token_stats)
    assert tropd_loss == pytest.approx(opd_loss, abs=1e-12)
    assert tropd_grad == pytest.approx(opd_grad, abs=1e-12)


def test_identical_teacher_and_student_give_zero_loss_and_full_trust():
    token_stats = stats(teacher=STUDENT)
    output = objectives.tropd(token_stats, generator=torch.Generator().manual_seed(0))
    assert float(output.mean_loss(token_stats.mask)) == 0.0
    assert output.metrics["trust_fraction"] == (3.0, 3.0)


def test_teacher_probability_near_zero_gives_finite_tropd_loss():
    token_stats = stats(teacher=[LOG(0.25), LOG(0.5), -1e4])
    output = objectives.tropd(token_stats, trust="hard")
    loss, grad = loss_and_grad(output, token_stats)
    assert math.isfinite(loss) and all(math.isfinite(g) for g in grad)
    assert loss == pytest.approx(4.079017325805532, abs=1e-12)


def test_masked_positions_carry_no_loss_and_no_gradient():
    token_stats = stats(mask=(1.0, 0.0, 1.0))
    output = objectives.opd(token_stats)
    loss, grad = loss_and_grad(output, token_stats)
    assert loss == pytest.approx(-(REWARD[0] + REWARD[2]) / 2, abs=1e-12)
    assert grad[1] == 0.0
    assert output.metrics["trust_fraction"] == (2.0, 2.0)


def test_empty_response_gives_zero_loss():
    empty = TokenStats(student_logprobs=torch.zeros(0, requires_grad=True), teacher_logprobs=torch.zeros(0),
                       mask=torch.zeros(0), teacher_topk_logprobs=torch.zeros(0, 2),
                       student_topk_logprobs=torch.zeros(0, 2))
    output = objectives.tropd(empty, generator=torch.Generator().manual_seed(0))
    assert float(output.mean_loss(empty.mask)) == 0.0


def test_unknown_trust_or_outlier_is_rejected():
    with pytest.raises(ValueError, match="trust test"):
        objectives.trust_mask(stats(), "soft", None)
    with pytest.raises(ValueError, match="outlier strategy"):
        objectives.tropd(stats(), outlier="drop")
