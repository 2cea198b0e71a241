"""The baselines against hand computations (values worked out by hand from DESIGN.md §1), and GKD
against TRL's `generalized_jsd_loss`."""

import math

import pytest
import torch

from tropd_cli.engine.objectives.base import TokenStats, entropy_threshold
from tropd_cli.engine.objectives.entropy_opd import entropy_opd
from tropd_cli.engine.objectives.eopd import eopd
from tropd_cli.engine.objectives.fkl_topk import fkl_topk
from tropd_cli.engine.objectives.gkd import generalized_jsd, gkd
from tropd_cli.engine.objectives.jsd_onpolicy import jsd_onpolicy
from tropd_cli.engine.objectives.opd import opd
from tropd_cli.engine.objectives.reopold import reopold

LOG = math.log

# The tokens of test_objectives: student probs .5, .25, .8; teacher probs .25, .5, .01.
STUDENT = [LOG(0.5), LOG(0.25), LOG(0.8)]
TEACHER = [LOG(0.25), LOG(0.5), LOG(0.01)]
REWARD = [LOG(0.5), LOG(2.0), LOG(0.0125)]
TEACHER_TOP2 = [[0.5, 0.25], [0.5, 0.25], [0.6, 0.3]]
STUDENT_AT_TOP2 = [[0.25, 0.5], [0.25, 0.5], [1e-12, 0.1]]
# sum q (log q - log p_S) over the renormalised top-2, q = (2/3, 1/3).
FKL = [0.5187311326384293, 0.5187311326384293, 18.5516949399889]
Q = [2 / 3, 1 / 3]
TEACHER_ENTROPY = [1.0, 0.5, 2.0]
STUDENT_ENTROPY = [0.3, 1.2, 0.9]


def stats(student=STUDENT, teacher=TEACHER, mask=(1.0, 1.0, 1.0)) -> TokenStats:
    return TokenStats(
        student_logprobs=torch.tensor(student, dtype=torch.float64, requires_grad=True),
        teacher_logprobs=torch.tensor(teacher, dtype=torch.float64),
        mask=torch.tensor(mask, dtype=torch.float64),
        teacher_topk_logprobs=torch.tensor(TEACHER_TOP2, dtype=torch.float64).log(),
        student_topk_logprobs=torch.tensor(STUDENT_AT_TOP2, dtype=torch.float64).log().requires_grad_(True),
        teacher_entropy=torch.tensor(TEACHER_ENTROPY, dtype=torch.float64),
        student_entropy=torch.tensor(STUDENT_ENTROPY, dtype=torch.float64),
    )


def loss_and_grads(output, token_stats):
    loss = output.mean_loss()
    loss.backward()
    grad, topk = token_stats.student_logprobs.grad, token_stats.student_topk_logprobs.grad
    return (float(loss.detach()), [0.0] * len(token_stats.mask) if grad is None else grad.tolist(),
            [0.0] * 6 if topk is None else topk.flatten().tolist())


def test_eopd_adds_top_k_forward_kl_on_uncertain_teacher_tokens():
    token_stats = stats()
    output = eopd(token_stats, entropy_min=0.8)
    loss, grad, topk_grad = loss_and_grads(output, token_stats)
    # Teacher entropy 1.0, 0.5, 2.0 > 0.8 on tokens 1 and 3: loss = (-r_1 - r_2 - r_3 + FKL_1 + FKL_3) / 3.
    assert loss == pytest.approx(7.817484235767069, abs=1e-12)
    assert grad == pytest.approx([-r / 3 for r in REWARD], abs=1e-12)
    assert topk_grad == pytest.approx([-Q[0] / 3, -Q[1] / 3, 0.0, 0.0, -Q[0] / 3, -Q[1] / 3], abs=1e-12)
    assert output.metrics["fkl_token_fraction"] == (2.0, 3.0)


def test_eopd_with_a_confident_teacher_is_opd():
    token_stats = stats()
    loss, grad, topk_grad = loss_and_grads(eopd(token_stats, entropy_min=5.0), token_stats)
    assert loss == pytest.approx(-sum(REWARD) / 3, abs=1e-12)
    assert topk_grad == [0.0] * 6


def test_reopold_before_switch_keeps_tokens_above_the_reward_floor():
    token_stats = stats()
    output = reopold(token_stats, lam=0.2, after_switch=False)
    loss, grad, _ = loss_and_grads(output, token_stats)
    # c = log .25: r_3 = log .0125 < c is dropped; loss = -(r_1 + r_2) / 2 = 0.
    assert loss == pytest.approx(0.0, abs=1e-12)
    assert grad == pytest.approx([LOG(2) / 2, -LOG(2) / 2, 0.0], abs=1e-12)
    assert output.normaliser == 2.0 and output.metrics["loss_token_fraction"] == (2.0, 3.0)


def test_reopold_after_switch_keeps_high_entropy_tokens_with_floored_reward():
    token_stats = stats()
    output = reopold(token_stats, lam=0.2, beta=0.5, after_switch=True)
    loss, grad, _ = loss_and_grads(output, token_stats)
    # Top ceil(.5 * 3) = 2 by student entropy: tokens 2 (1.2) and 3 (0.9); rhat_3 = log .25.
    assert loss == pytest.approx(-(LOG(2) + LOG(0.25)) / 2, abs=1e-12)
    assert grad == pytest.approx([0.0, -LOG(2) / 2, -LOG(0.25) / 2], abs=1e-12)


def test_reopold_uses_a_batch_wide_entropy_threshold_when_given():
    token_stats = stats()
    loss, grad, _ = loss_and_grads(reopold(token_stats, after_switch=True, threshold=0.25), token_stats)
    assert loss == pytest.approx(-(REWARD[0] + REWARD[1] + LOG(0.25)) / 3, abs=1e-12)


@pytest.mark.parametrize(("fraction", "loss", "grad"), [
    (0.2, -LOG(2), [0.0, -LOG(2), 0.0]),  # ceil(.6) = 1 token: token 2
    (0.5, 1.844439727056968, [0.0, -LOG(2) / 2, -LOG(0.0125) / 2]),  # tokens 2 and 3
    (1.0, -sum(REWARD) / 3, [-r / 3 for r in REWARD]),  # OPD
])
def test_entropy_opd_trains_only_on_high_entropy_tokens(fraction, loss, grad):
    token_stats = stats()
    output = entropy_opd(token_stats, top_fraction=fraction)
    got_loss, got_grad, _ = loss_and_grads(output, token_stats)
    assert got_loss == pytest.approx(loss, abs=1e-12)
    assert got_grad == pytest.approx(grad, abs=1e-12)


def test_fkl_topk_alone():
    token_stats = stats()
    loss, grad, topk_grad = loss_and_grads(fkl_topk(token_stats), token_stats)
    assert loss == pytest.approx(sum(FKL) / 3, abs=1e-12)
    assert grad == [0.0, 0.0, 0.0]
    assert topk_grad == pytest.approx([-Q[0] / 3, -Q[1] / 3] * 3, abs=1e-12)


BY_NAME = {"eopd": eopd, "reopold": reopold, "entropy_opd": entropy_opd, "fkl_topk": fkl_topk}


@pytest.mark.parametrize("objective", ["eopd", "reopold", "entropy_opd", "fkl_topk"])
def test_identical_teacher_and_student_give_zero_loss(objective):
    token_stats = stats(teacher=STUDENT)
    # The whole vocabulary in the top-2: q = pi_T = pi_S.
    token_stats.teacher_topk_logprobs = torch.tensor([Q] * 3, dtype=torch.float64).log()
    token_stats.student_topk_logprobs = torch.tensor([Q] * 3, dtype=torch.float64).log()
    output = BY_NAME[objective](token_stats)
    assert abs(float(output.mean_loss().detach())) < 1e-12


@pytest.mark.parametrize("objective", ["eopd", "reopold", "entropy_opd", "fkl_topk"])
def test_teacher_probability_near_zero_gives_finite_loss(objective):
    token_stats = stats(teacher=[LOG(0.25), LOG(0.5), -1e4])
    output = BY_NAME[objective](token_stats)
    loss, grad, _ = loss_and_grads(output, token_stats)
    assert math.isfinite(loss) and all(map(math.isfinite, grad))


@pytest.mark.parametrize("objective", ["eopd", "reopold", "entropy_opd", "fkl_topk"])
def test_padded_positions_and_empty_responses(objective):
    clean, dirty = stats(mask=(1.0, 0.0, 1.0)), stats(mask=(1.0, 0.0, 1.0))
    with torch.no_grad():
        dirty.teacher_logprobs[1] = -math.inf
        dirty.teacher_topk_logprobs[1] = torch.tensor([math.nan, -math.inf])
        dirty.student_entropy[1] = 50.0
    clean_result = loss_and_grads(BY_NAME[objective](clean), clean)
    dirty_result = loss_and_grads(BY_NAME[objective](dirty), dirty)
    assert dirty_result[0] == pytest.approx(clean_result[0], abs=1e-12)
    assert dirty_result[1] == pytest.approx(clean_result[1], abs=1e-12)
    empty = TokenStats(student_logprobs=torch.zeros(0, requires_grad=True), teacher_logprobs=torch.zeros(0),
                       mask=torch.zeros(0), teacher_topk_logprobs=torch.zeros(0, 2),
                       student_topk_logprobs=torch.zeros(0, 2), teacher_entropy=torch.zeros(0),
                       student_entropy=torch.zeros(0))
    assert float(BY_NAME[objective](empty).mean_loss().detach()) == 0.0


def test_entropy_threshold_counts_only_masked_tokens():
    entropy = torch.tensor([0.3, 9.0, 1.2, 0.9])
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert entropy_threshold(entropy, mask, 0.5) == pytest.approx(0.9)
    assert entropy_threshold(entropy, mask, 0.01) == pytest.approx(1.2)
    assert entropy_threshold(entropy, torch.zeros(4), 0.5) == math.inf


# Two-token vocabulary: student (0.5, 0.5), teacher (0.8, 0.2).
@pytest.mark.parametrize(("beta", "value", "grad"), [
    (0.0, 0.8 * LOG(1.6) + 0.2 * LOG(0.4), [-0.3, 0.3]),  # KL(T || S); d/dz = p_S - p_T
    (1.0, 0.5 * LOG(0.625) + 0.5 * LOG(2.5), [-0.3465735902799727, 0.3465735902799727]),  # KL(S || T)
    (0.5, 0.05067183698556589, None),  # m = (.65, .35)
])
def test_generalized_jsd_by_hand(beta, value, grad):
    student_logits = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.tensor([[0.8, 0.2]], dtype=torch.float64).log()
    divergence = generalized_jsd(student_logits.double(), teacher_logits, beta)
    assert float(divergence.detach()[0]) == pytest.approx(value, abs=1e-6)
    if grad is not None:
        divergence.sum().backward()
        assert student_logits.grad[0].tolist() == pytest.approx(grad, abs=1e-6)


def test_gkd_objective_averages_the_divergence_over_response_tokens():
    token_stats = stats(mask=(1.0, 0.0, 1.0))
    divergence = torch.tensor([0.2, math.nan, 0.4], dtype=torch.float64)
    output = gkd(token_stats, divergence)
    assert float(output.mean_loss()) == pytest.approx(0.3, abs=1e-12)
    assert output.metrics["gkd_divergence"] == pytest.approx((0.6, 2.0))


@pytest.fixture(scope="module")
def trl_jsd():
    gkd_trainer = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return gkd_trainer.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_matches_trl(trl_jsd, beta):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, 50, generator=generator) * 2
    teacher = torch.randn(3, 7, 50, generator=generator) * 2
    labels = torch.randint(0, 50, (3, 7), generator=generator)
    labels[0, 4:] = -100
    labels[2, :2] = -100
    mask = labels != -100
    expected = trl_jsd(student, teacher, labels=labels, beta=beta)
    ours = generalized_jsd(student, teacher, beta)[mask].mean()
    assert float(ours) == pytest.approx(float(expected), abs=1e-5)
    if beta in (0.0, 1.0):
        log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
        p, log_p, log_other = (log_t.exp(), log_t, log_s) if beta == 0 else (log_s.exp(), log_s, log_t)
        direct = (p * (log_p - log_other)).sum(-1)[mask].mean()
        assert float(ours) == pytest.approx(float(direct), abs=1e-5)


# A later update: sampling-policy probs .2, .6, .8 against current .5, .25, .8 (rho = 2.5, 5/12, 1).
OLD = [LOG(0.2), LOG(0.6), LOG(0.8)]
RHO = [2.5, 0.25 / 0.6, 1.0]
OLD_REWARD = [LOG(1.25), LOG(0.5 / 0.6), LOG(0.0125)]


def later_update_stats() -> TokenStats:
    token_stats = stats()
    token_stats.old_logprobs = torch.tensor(OLD, dtype=torch.float64)
    return token_stats


def test_eopd_on_a_later_update_weights_the_reward_by_rho_and_differentiates_the_top_k():
    token_stats = later_update_stats()
    loss, grad, topk_grad = loss_and_grads(eopd(token_stats, entropy_min=0.8), token_stats)
    pg = [-r * rho for r, rho in zip(OLD_REWARD, RHO)]
    assert loss == pytest.approx((sum(pg) + FKL[0] + FKL[2]) / 3, abs=1e-12)
    assert grad == pytest.approx([t / 3 for t in pg], abs=1e-12)
    assert topk_grad == pytest.approx([-Q[0] / 3, -Q[1] / 3, 0.0, 0.0, -Q[0] / 3, -Q[1] / 3], abs=1e-12)


def test_reopold_keeps_tokens_by_the_sampling_policy_reward():
    token_stats = later_update_stats()
    output = reopold(token_stats, lam=0.2, after_switch=False)
    loss, grad, _ = loss_and_grads(output, token_stats)
    # c = log .25: tokens 1 and 2 kept (r = log 1.25, log 5/6), token 3 dropped; normalised by 2.
    assert loss == pytest.approx(-(OLD_REWARD[0] * RHO[0] + OLD_REWARD[1] * RHO[1]) / 2, abs=1e-12)
    assert grad == pytest.approx([-OLD_REWARD[0] * RHO[0] / 2, -OLD_REWARD[1] * RHO[1] / 2, 0.0], abs=1e-12)


def test_fkl_topk_gradient_is_minus_q_on_every_token_whatever_the_sampling_policy():
    token_stats = later_update_stats()
    loss, grad, topk_grad = loss_and_grads(fkl_topk(token_stats), token_stats)
    assert loss == pytest.approx(sum(FKL) / 3, abs=1e-12)
    assert topk_grad == pytest.approx([-Q[0] / 3, -Q[1] / 3] * 3, abs=1e-12)


# A_t of the same tokens: the student's top-2 log-probs clamped at log 1e-8 (token 3's 1e-12).
ADVANTAGE = [-0.5187311326384293, -0.5187311326384293, -12.411468025338113]


def test_fkl_topk_advantage_form_is_the_detached_advantage_on_every_token():
    token_stats = stats()
    output = fkl_topk(token_stats, form="advantage")
    loss, grad, topk_grad = loss_and_grads(output, token_stats)
    assert loss == pytest.approx(-sum(ADVANTAGE) / 3, abs=1e-12)  # rho = 1 on the first update
    assert grad == pytest.approx([-a / 3 for a in ADVANTAGE], abs=1e-12)
    assert topk_grad == [0.0] * 6  # A_t carries no gradient
    with pytest.raises(ValueError, match="unknown top-k forward KL form 'soft'"):
        fkl_topk(stats(), form="soft")


def test_the_advantage_uses_the_sampling_policys_top_k_on_a_later_update():
    token_stats = stats()
    token_stats.old_topk_logprobs = torch.tensor([[0.5, 0.25]] * 3, dtype=torch.float64).log()  # = q's ratio
    loss, grad, _ = loss_and_grads(fkl_topk(token_stats, form="advantage"), token_stats)
    # sbar = s (no old_logprobs): rho = 1; A_t = sum q (log p_old - log q) = log .75 on every token.
    assert loss == pytest.approx(-LOG(0.75), abs=1e-12)
    assert grad == pytest.approx([-LOG(0.75) / 3] * 3, abs=1e-12)


def test_reopold_static_floor_floors_the_reward_on_every_token():
    token_stats = stats()
    output = reopold(token_stats, lam=0.2, static_floor=True)
    loss, grad, _ = loss_and_grads(output, token_stats)
    floored = [max(r, LOG(0.25)) for r in REWARD]  # c = log(.2 / .8)
    assert loss == pytest.approx(-sum(floored) / 3, abs=1e-12) and output.normaliser == 3.0
    assert grad == pytest.approx([-r / 3 for r in floored], abs=1e-12)
    assert output.metrics["loss_token_fraction"] == (3.0, 3.0)


def test_jsd_onpolicy_mixes_opd_and_the_top_k_forward_kl_and_reaches_both_ends():
    token_stats = stats()
    loss, grad, topk_grad = loss_and_grads(jsd_onpolicy(token_stats, beta=0.5), token_stats)
    assert loss == pytest.approx(0.5 * -sum(REWARD) / 3 + 0.5 * sum(FKL) / 3, abs=1e-12)
    assert grad == pytest.approx([-0.5 * r / 3 for r in REWARD], abs=1e-12)
    assert topk_grad == pytest.approx([-0.5 * q / 3 for q in Q] * 3, abs=1e-12)
    for beta, other in ((1.0, lambda s: opd(s)), (0.0, lambda s: fkl_topk(s))):
        mixed, alone = stats(), stats()
        got, expected = loss_and_grads(jsd_onpolicy(mixed, beta=beta), mixed), loss_and_grads(other(alone), alone)
        assert got[0] == pytest.approx(expected[0], abs=1e-12)
        for got_grad, expected_grad in zip(got[1:], expected[1:]):
            assert got_grad == pytest.approx(expected_grad, abs=1e-12)
