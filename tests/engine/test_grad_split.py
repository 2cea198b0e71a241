"""`train.grad_norm_split`: the step's gradient g (before clipping, divided by the normaliser) split into
g_O, the outlier tokens' part, and g_T = g - g_O.

The split is checked against gradients taken by hand on the same rollouts with the weights before the
step: tropd with `trust: hard` (its outliers are the tokens with tau_t < sbar_t) and opd, whose tokens
are outliers with the probability 1 - p_t of the trust test. The extra backward must leave the gradient,
and so the weights, exactly as they are without the split; the split needs one process.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.engine.conftest import make_trainer, student_of, toy_config
from tropd_cli.config import RunConfig, validate
from tropd_cli.engine import trainer as trainer_module
from tropd_cli.engine.objectives import get_objective
from tropd_cli.engine.objectives.base import StepContext, TokenStats
from tropd_cli.engine.rollout import Rollouts, SamplingParams
from tropd_cli.engine.run import trainer_for
from tropd_cli.engine.scoring import build_sequences, score_student, score_teacher
from tropd_cli.engine.strategy import SingleDevice
from tropd_cli.errors import TropdError
from tropd_cli.toylab.models import new_toy_model

SPLIT_KEYS = {"grad_norm_trusted", "grad_norm_outlier", "outlier_grad_share"}


def recording_rollouts(trainer: trainer_module.Trainer) -> list[Rollouts]:
    """The rollout batch of every step `trainer` takes from now on."""
    seen: list[Rollouts] = []
    sample = trainer._rollouts

    def record(prompt_ids):
        rollouts, on_policy, prefix_lengths = sample(prompt_ids)
        seen.append(rollouts)
        return rollouts, on_policy, prefix_lengths

    trainer._rollouts = record
    return seen


def hand_split(config: RunConfig, teacher: torch.nn.Module, student: torch.nn.Module, pad_token_id: int,
               rollouts: Rollouts, outlier_weight) -> tuple[float, float, float]:
    """(|g|, |g_T|, |g_O|) of the first update taken by hand on the whole rollout batch at once:
    g_O = grad sum_t w_t loss_t / N and g_T = grad sum_t (1 - w_t) loss_t / N, w_t = outlier_weight(tau, sbar)."""
    batch = build_sequences([rollouts.prompt_ids[i] for i in rollouts.prompt_index], rollouts.response_ids,
                            pad_token_id)
    teacher_stats = score_teacher(teacher, batch, config.objective.top_k, 1024)
    student_stats = score_student(student, batch, teacher_stats.topk_ids, 1024)
    stats = TokenStats(
        student_logprobs=student_stats.logprobs, teacher_logprobs=teacher_stats.logprobs,
        mask=torch.ones_like(teacher_stats.logprobs), teacher_topk_logprobs=teacher_stats.topk_logprobs,
        student_topk_logprobs=student_stats.topk_logprobs, old_logprobs=student_stats.logprobs.detach(),
        old_topk_logprobs=student_stats.topk_logprobs.detach(), teacher_entropy=teacher_stats.entropy,
        student_entropy=student_stats.entropy)
    context = StepContext(step=0, clip_epsilon=config.train.clip_epsilon)
    output = get_objective(config.objective.name).loss(stats, config.objective, context)
    weight = outlier_weight(teacher_stats.logprobs, student_stats.logprobs.detach())
    assert 0 < float(weight.sum()) < weight.numel()  # both parts present
    parameters = [p for p in student.parameters() if p.requires_grad]

    def norm(loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        grads = torch.autograd.grad(loss / output.normaliser, parameters, retain_graph=True)
        flat = torch.cat([g.flatten() for g in grads])
        return flat, float(flat.norm())

    outlier, outlier_norm = norm((output.per_token_loss * weight).sum())
    trusted, trusted_norm = norm((output.per_token_loss * (1 - weight)).sum())
    return float((trusted + outlier).norm()), trusted_norm, outlier_norm


def hard_outliers(tau: torch.Tensor, sbar: torch.Tensor) -> torch.Tensor:
    return (tau < sbar).float()


def expected_outliers(tau: torch.Tensor, sbar: torch.Tensor) -> torch.Tensor:
    return 1 - torch.exp(tau - sbar).clamp(max=1.0)


@pytest.mark.parametrize(("settings", "outlier_weight"), [
    (["objective.trust=hard"], hard_outliers),
    (["objective.trust=hard", "objective.outlier=fkl_grad"], hard_outliers),
    (["objective.name=opd"], expected_outliers),
], ids=["tropd-hard", "tropd-hard-fkl_grad", "opd"])
def test_the_split_norms_are_those_of_the_trusted_and_outlier_losses_by_hand(settings, outlier_weight):
    # one sequence per micro-batch: the outlier gradient accumulates and is scaled like the gradient
    config = toy_config(*settings, "train.grad_norm_split=true", "train.micro_batch_size=1")
    trainer = make_trainer(config)
    before = copy.deepcopy(student_of(trainer))
    seen = recording_rollouts(trainer)
    record = trainer.train_step()
    whole, trusted, outlier = hand_split(config, trainer.models.teacher, before, trainer.models.pad_token_id,
                                         seen[0], outlier_weight)
    assert record["grad_norm"] == pytest.approx(whole, rel=1e-5)
    assert record["grad_norm_trusted"] == pytest.approx(trusted, rel=1e-5)
    assert record["grad_norm_outlier"] == pytest.approx(outlier, rel=1e-5)
    assert record["outlier_grad_share"] == pytest.approx(outlier / (trusted + outlier), rel=1e-5)


class GreedyBackend:
    """Answers every prompt with the student's greedy continuation (fixed at construction)."""

    def __init__(self, student: torch.nn.Module, prompt: list[int], length: int) -> None:
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(length):
                ids.append(int(student(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        self.response = ids[len(prompt):]

    def generate(self, prompt_ids, n, params: SamplingParams, generator_seed):
        index = [i for i in range(len(prompt_ids)) for _ in range(n)]
        return Rollouts(list(prompt_ids), index, [list(self.response)] * len(index), [False] * len(index))

    def sync(self, model):
        pass


def test_no_outlier_gradient_when_the_teacher_likes_every_sampled_token_more_than_the_student():
    """The teacher is the student at temperature 1/2 (its final norm doubled), the responses the student's
    greedy tokens: a sharper softmax gives its argmax more mass, so tau_t > sbar_t and p_t = 1 everywhere."""
    student = new_toy_model("student", seed=2)
    teacher = copy.deepcopy(student).eval()
    with torch.no_grad():
        teacher.model.norm.weight.mul_(2.0)
    prompt = [2, 5, 6]
    config = RunConfig.model_validate({"objective": {"name": "opd"}, "rollout": {"n": 2, "prompts_per_step": 1},
                                       "train": {"grad_norm_split": True}})
    models = trainer_module.Models(teacher, student, 0, torch.device("cpu"))
    record = trainer_for(config, models, GreedyBackend(student, prompt, 6), iter([[prompt]])).train_step()
    assert record["reward_min"] > 0
    assert record["grad_norm"] > 0
    assert record["grad_norm_outlier"] == 0.0 and record["outlier_grad_share"] == 0.0
    assert record["grad_norm_trusted"] == pytest.approx(record["grad_norm"], rel=1e-6)


# the gradient through the chunked head, through checkpointed chunks (gkd), through checkpointed layers,
# with the imitation term (guidance) and over two updates
FLAG_RUNS = {
    "tropd": [],
    "opd": ["objective.name=opd"],
    "gkd": ["objective.name=gkd", "objective.gkd_lambda=1"],
    "gradient_checkpointing": ["train.gradient_checkpointing=true"],
    "guidance": ["objective.guidance=true"],
    "tropd-2-updates": ["train.updates_per_batch=2", "train.clip_epsilon=0.05"],
}


@pytest.mark.parametrize("run", list(FLAG_RUNS))
def test_the_split_changes_neither_loss_nor_gradient_nor_weights(run):
    records, weights = {}, {}
    for flag in (False, True):
        trainer = make_trainer(toy_config(*FLAG_RUNS[run], f"train.grad_norm_split={str(flag).lower()}"))
        records[flag] = trainer.train_step()
        weights[flag] = {name: p.detach().clone() for name, p in student_of(trainer).named_parameters()}
    off, on = records[False], records[True]
    assert not SPLIT_KEYS & off.keys()
    assert on.keys() - off.keys() == SPLIT_KEYS
    assert on["loss"] == off["loss"] and on["grad_norm"] == off["grad_norm"]
    for name, weight in weights[False].items():
        assert torch.equal(weight, weights[True][name]), name
    # g = g_T + g_O: the triangle inequality
    assert on["grad_norm"] <= on["grad_norm_trusted"] + on["grad_norm_outlier"] + 1e-5
    assert on["grad_norm_outlier"] > 0
    share = on["grad_norm_outlier"] / (on["grad_norm_trusted"] + on["grad_norm_outlier"])
    assert on["outlier_grad_share"] == pytest.approx(share, rel=1e-12)


def test_mask_outliers_carry_no_gradient():
    record = make_trainer(toy_config("objective.outlier=mask", "train.grad_norm_split=true")).train_step()
    assert record["outlier_fraction"] > 0
    assert record["grad_norm_outlier"] == 0.0 and record["outlier_grad_share"] == 0.0
    assert record["grad_norm_trusted"] == pytest.approx(record["grad_norm"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_the_split_on_several_processes_is_refused_in_one_line(strategy):
    with pytest.raises(TropdError) as error:
        validate({"train": {"grad_norm_split": True, "strategy": strategy}}, source="test")
    assert str(error.value) == (f"train.grad_norm_split needs one process (its outlier gradient is not summed "
                                f"over ranks); with train.strategy={strategy} set train.grad_norm_split=false")


class TwoRanks(SingleDevice):
    world_size = 2


def test_the_split_under_auto_strategy_on_several_processes_is_refused_before_the_first_step():
    config = RunConfig.model_validate({"train": {"grad_norm_split": True}})
    models = trainer_module.Models(new_toy_model("teacher", seed=1).eval(), new_toy_model("student", seed=2), 0,
                                   torch.device("cpu"))
    with pytest.raises(TropdError) as error:
        trainer_for(config, models, GreedyBackend(models.student, [2], 1), iter([]), strategy=TwoRanks())
    assert str(error.value) == ("train.grad_norm_split needs one process (its outlier gradient is not summed over "
                                "ranks), but 2 are training; set train.grad_norm_split=false")
