"""Off-policy guidance and the teacher-response objectives against hand computations (values below were
worked out by hand from DESIGN.md §1 item 4), and guided rollouts inside the trainer."""

import copy
import math

import pytest
import torch

from tropd_cli.config import RunConfig, validate
from tropd_cli.engine import guidance, teacher, trainer
from tropd_cli.engine.guidance import InRunTeacherResponses, TeacherResponse, prefix_length
from tropd_cli.engine.objectives.base import TokenStats
from tropd_cli.engine.objectives.sft import teacher_cross_entropy
from tropd_cli.engine.rollout import HFGenerateBackend, Rollouts, SamplingParams
from tropd_cli.engine.run import trainer_for
from tropd_cli.errors import TropdError
from tropd_cli.toylab.models import new_toy_model

LOG = math.log
EOS = 1
# Student probs of three tokens .5, .25, .8 (as in test_objectives).
STUDENT = [LOG(0.5), LOG(0.25), LOG(0.8)]


def test_prefix_schedule_goes_from_the_whole_response_to_nothing():
    # i runs 0..N with N = steps - 1: 11 steps, |y| = 10.
    assert prefix_length(10, 0, 11) == 10
    assert prefix_length(10, 5, 11) == 5
    assert prefix_length(10, 10, 11) == 0
    # N = 4: floor(10 (1 + cos(pi/4)) / 2) = floor(8.54) = 8, floor(10 (1 + cos(3 pi/4)) / 2) = floor(1.46) = 1.
    assert [prefix_length(10, i, 5) for i in range(5)] == [10, 8, 5, 1, 0]
    # Odd |y| at the midpoint: floor(7 / 2) = 3.
    assert prefix_length(7, 5, 11) == 3
    assert prefix_length(0, 0, 11) == 0
    assert prefix_length(10, 0, 1) == 10  # one step: N = 0, the whole response


def test_prefix_never_holds_the_teacher_eos():
    assert TeacherResponse([5, 6, EOS], finished=True).content() == [5, 6]
    assert TeacherResponse([5, 6, 7], finished=False).content() == [5, 6, 7]
    assert TeacherResponse([EOS], finished=True).content() == []


def test_prefix_token_mask_marks_the_first_l_tokens_of_each_response():
    mask = guidance.prefix_token_mask([2, 0, 1], [3, 2, 1])
    assert mask.tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_imitation_term_loss_and_gradient_match_hand_computation():
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    output = guidance.imitation(student, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), beta=0.001)
    loss = output.mean_loss()
    loss.backward()
    # 0.001 * (-log .5 - log .25) / 2 = 0.001 * 1.5 log 2; d/ds_t = -0.001 / 2 on the two prefix tokens.
    assert float(loss.detach()) == pytest.approx(0.001039720770839918, abs=1e-15)
    assert student.grad.tolist() == pytest.approx([-0.0005, -0.0005, 0.0], abs=1e-15)
    assert output.normaliser == 2.0
    assert output.metrics["prefix_ce"][0] / 2 == pytest.approx(1.0397207708399179, abs=1e-12)


def test_imitation_term_is_zero_without_prefix_tokens():
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    output = guidance.imitation(student, torch.zeros(3, dtype=torch.float64), beta=0.001)
    assert float(output.mean_loss().detach()) == 0.0 and output.normaliser == 0.0


def ce_stats(mask):
    return TokenStats(student_logprobs=torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True),
                      teacher_logprobs=torch.tensor([LOG(0.25), LOG(0.5), LOG(0.01)], dtype=torch.float64),
                      mask=torch.tensor(mask, dtype=torch.float64))


@pytest.mark.parametrize(("mask", "expected_loss", "expected_grad"), [
    # (-log .5 - log .25 - log .8) / 3, d/ds_t = -1/3.
    ((1.0, 1.0, 1.0), 0.7675283643313485, [-1 / 3, -1 / 3, -1 / 3]),
    # (-log .5 - log .8) / 2 over the two unmasked tokens.
    ((1.0, 0.0, 1.0), 0.4581453659370775, [-0.5, 0.0, -0.5]),
])
def test_teacher_cross_entropy_matches_hand_computation(mask, expected_loss, expected_grad):
    token_stats = ce_stats(mask)
    output = teacher_cross_entropy(token_stats)
    loss = output.mean_loss()
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected_loss, abs=1e-12)
    assert token_stats.student_logprobs.grad.tolist() == pytest.approx(expected_grad, abs=1e-12)


class FakeBackend:
    """Responds to prompt p with [p[-1] + 1, p[-1] + 2, EOS] and records what it was asked."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, n, params, generator_seed):
        self.calls.append([list(p) for p in prompt_ids])
        index = [i for i in range(len(prompt_ids)) for _ in range(n)]
        responses = [[prompt_ids[i][-1] + 1, prompt_ids[i][-1] + 2, EOS] for i in index]
        return Rollouts(list(prompt_ids), index, responses, [True] * len(index))


def test_teacher_responses_are_generated_once_per_prompt_and_cached():
    backend = FakeBackend()
    responses = InRunTeacherResponses(backend, SamplingParams(max_new_tokens=4), seed=0)
    first = responses([[2, 10], [2, 20], [2, 10]])
    assert backend.calls == [[[2, 10], [2, 20]]]
    assert first[0] == first[2] == TeacherResponse([11, 12, EOS], True)
    again = responses([[2, 20], [2, 30]])
    assert backend.calls[1] == [[2, 30]]
    assert again[0] == first[1]


def test_guided_rollouts_start_from_the_prefix_and_keep_the_original_prompt():
    backend = FakeBackend()
    teacher = [TeacherResponse([40, 41, 42, 43, EOS], True), TeacherResponse([50, 51, EOS], True)]
    rollouts, prefixes = guidance.guided_rollouts(backend, [[2, 7], [2, 8]], teacher, step=2, total_steps=5,
                                                  n=2, params=SamplingParams(max_new_tokens=3), seed=0)
    # i = 2 of N = 4 is the midpoint: l = floor(4 / 2) = 2 and floor(2 / 2) = 1.
    assert backend.calls == [[[2, 7, 40, 41], [2, 8, 50]]]
    assert prefixes == [2, 2, 1, 1]
    assert rollouts.prompt_ids == [[2, 7], [2, 8]]
    assert rollouts.response_ids[0] == [40, 41, 42, 43, EOS]
    assert rollouts.response_ids[2] == [50, 51, 52, EOS]


def guided_config(micro_batch_size=3, **objective):
    return RunConfig.model_validate({
        "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 4},
        "objective": {"guidance": True, **objective},
        "train": {"steps": 3, "micro_batch_size": micro_batch_size, "lr": 1e-3},
    })


@pytest.fixture(scope="module")
def models():
    return trainer.Models(new_toy_model("teacher", seed=1).eval(), new_toy_model("student", seed=2),
                          pad_token_id=0, device=torch.device("cpu"))


PROMPTS = [[2, 5, 6, 7], [2, 9]]
TEACHER = {(2, 5, 6, 7): TeacherResponse([20, 21, 22, EOS], True), (2, 9): TeacherResponse([30, 31, 32], False)}


def test_student_rollouts_are_scored_from_the_teacher_prefix(models, monkeypatch):
    scored = []
    real_score_teacher = teacher.hf.score_teacher

    def spy(model, batch, *args, **kwargs):
        scored.append(batch.input_ids.clone())
        return real_score_teacher(model, batch, *args, **kwargs)

    monkeypatch.setattr(teacher.hf, "score_teacher", spy)  # where the HF scorer looks it up
    student_backend = HFGenerateBackend(models.student, pad_token_id=0, eos_token_ids=[EOS])
    run = trainer_for(guided_config(), models, student_backend, iter([PROMPTS] * 3),
                          teacher_responses=lambda prompts: [TEACHER[tuple(p)] for p in prompts])
    record = run.train_step()
    rows = [row for batch in scored for row in batch.tolist()]  # two micro-batches of 3 and 1
    # Step 0: the whole response without its EOS (3 tokens each); two rollouts per prompt.
    assert [row[:7] for row in rows[:2]] == [[2, 5, 6, 7, 20, 21, 22]] * 2
    assert [row[:5] for row in rows[2:]] == [[2, 9, 30, 31, 32]] * 2
    assert record["prefix_length"] == 3.0
    assert record["prefix_loss"] > 0 and math.isfinite(record["loss"])
    record = run.train_step()  # midpoint of N = 2: floor(3 / 2) = 1
    assert record["prefix_length"] == 1.0
    record = run.train_step()
    assert record["prefix_length"] == 0.0 and record["prefix_loss"] == 0.0


def test_guided_step_loss_does_not_depend_on_micro_batching(models):
    """Objective mean over generated tokens + beta * CE mean over prefix tokens, both batch-wide."""
    records = []
    for size, beta in ((1, 0.5), (4, 0.5), (4, 0.0)):
        student = copy.deepcopy(models.student)
        pair = trainer.Models(models.teacher, student, pad_token_id=0, device=torch.device("cpu"))
        run = trainer_for(guided_config(size, guidance_beta=beta), pair,
                              HFGenerateBackend(student, pad_token_id=0, eos_token_ids=[EOS]), iter([PROMPTS]),
                              teacher_responses=lambda prompts: [TEACHER[tuple(p)] for p in prompts])
        records.append(run.train_step())
    for name in ("loss", "prefix_loss", "prefix_ce", "reward_mean", "grad_norm"):
        assert records[0][name] == pytest.approx(records[1][name], rel=1e-4), name
    # The same rollouts and trust draws without the imitation term: the loss drops by beta * mean CE.
    assert records[1]["prefix_loss"] == pytest.approx(0.5 * records[1]["prefix_ce"], rel=1e-6)
    assert records[1]["loss"] - records[2]["loss"] == pytest.approx(records[1]["prefix_loss"], rel=1e-4)


@pytest.mark.parametrize(("objective", "message"), [
    ({}, "objective.guidance=true needs teacher responses"),
    ({"guidance": False, "name": "sft"}, "objective.name=sft needs teacher responses"),
    ({"guidance": False, "name": "seqkd"}, "objective.name=seqkd needs teacher responses"),
])
def test_teacher_responses_are_required_before_the_first_step(models, objective, message):
    with pytest.raises(TropdError, match=message) as error:
        trainer_for(guided_config(**objective), models, FakeBackend(), iter([]))
    assert "\n" not in str(error.value)


def test_guidance_with_another_objective_is_a_configuration_error():
    with pytest.raises(TropdError, match="^objective.guidance applies to objective.name=tropd, not opd; "
                       "set objective.guidance=false$"):
        validate({"objective": {"guidance": True, "name": "opd"}}, source="test")


def test_micro_batches_group_rows_by_length_and_keep_each_rows_prefix():
    rollouts = Rollouts(prompt_ids=[[2, 5], [2, 6, 7]], prompt_index=[0, 0, 1, 1],
                        response_ids=[[10, EOS], [11, 12, 13, 14, 15, EOS], [16, EOS], [17, 18, 19, 20, EOS]],
                        finished=[True] * 4)
    micro = trainer.micro_batches(rollouts, [1, 2, 0, 3], size=2, pad_token_id=0, device=torch.device("cpu"))
    # prompt+response lengths 4, 8, 5, 8: rows 1 and 3 first, then 2 and 0
    assert [item.sequences.input_ids.tolist() for item in micro] == [
        [[2, 5, 11, 12, 13, 14, 15, EOS], [2, 6, 7, 17, 18, 19, 20, EOS]],
        [[2, 6, 7, 16, EOS], [2, 5, 10, EOS, 0]],
    ]
    assert micro[0].prefix_mask.tolist() == [1, 1, 0, 0, 0, 0, 1, 1, 1, 0, 0]  # 2 of 6, then 3 of 5 tokens
    assert micro[1].prefix_mask.tolist() == [0, 0, 1, 0]  # 0 of 2, then 1 of 2
    assert sum(item.sequences.input_ids.numel() for item in micro) == 16 + 10  # in rollout order: 16 + 16
