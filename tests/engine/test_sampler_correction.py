"""The trainer's view of a sampler with its own numerics: `sampler_logprob_gap` and truncated importance
sampling (`rollout.importance_correction: tis`), with a fake backend whose log-probs are the trainer's own
shifted by a known delta (no vLLM needed)."""

import math

import pytest
import torch

from tropd_cli.config import RunConfig
from tropd_cli.engine import trainer
from tropd_cli.engine.rollout import Rollouts, SamplingParams
from tropd_cli.engine.run import trainer_for
from tropd_cli.engine.scoring import build_sequences, score_student
from tropd_cli.toylab.models import new_toy_model

RESPONSES = [[7, 8, 9, 1], [10, 11]]


class ShiftedSampler:
    """Fixed responses whose sampler log-probs are the student's own plus `shift` (NaN: no log-probs there)."""

    def __init__(self, model, shift):
        self.model, self.shift = model, shift

    def generate(self, prompt_ids, n, params: SamplingParams, generator_seed):
        index = [i for i in range(len(prompt_ids)) for _ in range(n)]
        responses = [RESPONSES[row % 2] for row in range(len(index))]
        prompts = [prompt_ids[i] for i in index]
        with torch.no_grad():
            own = score_student(self.model, build_sequences(prompts, responses, 0),
                                torch.zeros((sum(map(len, responses)), 1), dtype=torch.long), 64).logprobs
        rows, start = [], 0
        for response in responses:
            rows.append([value + self.shift for value in own[start:start + len(response)].tolist()])
            start += len(response)
        return Rollouts(list(prompt_ids), index, responses, [True] * len(index), logprobs=rows)

    def sync(self, model):
        pass


def step(shift, correction="none", cap=2.0, objective="opd"):
    config = RunConfig.model_validate({
        "objective": {"name": objective}, "rollout": {"n": 2, "prompts_per_step": 1, "backend": "vllm",
                                                      "importance_correction": correction, "tis_cap": cap},
        "train": {"lr": 1e-3}})
    student = new_toy_model("student", seed=2)
    models = trainer.Models(new_toy_model("teacher", seed=1).eval(), student, 0, torch.device("cpu"))
    run = trainer_for(config, models, ShiftedSampler(student, shift), iter([[[2, 5, 6]]]))
    record = run.train_step()
    return record, [p.grad.clone() for p in student.parameters() if p.grad is not None]


def test_the_gap_is_the_mean_absolute_difference_and_changes_nothing_without_correction():
    record, grads = step(0.25)
    assert record["sampler_logprob_gap"] == pytest.approx(0.25, abs=1e-5)
    assert "tis_weight" not in record
    plain, plain_grads = step(0.0)
    assert plain["sampler_logprob_gap"] == pytest.approx(0.0, abs=1e-6)
    assert record["loss"] == plain["loss"] and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize(("shift", "weight"), [(0.25, math.exp(-0.25)), (-math.log(3.0), 2.0)])
def test_tis_weights_every_sampled_tokens_loss_by_the_capped_ratio(shift, weight):
    """w = min(exp(sbar - log p_sampler), cap) = min(exp(-shift), 2): every token's loss and gradient scale by w."""
    plain, plain_grads = step(shift)
    corrected, grads = step(shift, "tis", cap=2.0)
    assert corrected["tis_weight"] == pytest.approx(weight, rel=1e-5)
    assert corrected["loss"] == pytest.approx(weight * plain["loss"], rel=1e-5)
    for got, expected in zip(grads, plain_grads):
        torch.testing.assert_close(got, weight * expected, rtol=1e-4, atol=1e-7)


def test_tokens_the_sampler_did_not_choose_are_left_out_of_the_gap_and_unweighted():
    class PrefixSampler(ShiftedSampler):
        def generate(self, prompt_ids, n, params, generator_seed):
            rollouts = super().generate(prompt_ids, n, params, generator_seed)
            rollouts.logprobs = [[math.nan] + row[1:] for row in rollouts.logprobs]  # e.g. a guidance prefix
            return rollouts

    config = RunConfig.model_validate({"objective": {"name": "opd"}, "rollout": {
        "n": 2, "prompts_per_step": 1, "backend": "vllm", "importance_correction": "tis"}})
    student = new_toy_model("student", seed=2)
    models = trainer.Models(new_toy_model("teacher", seed=1).eval(), student, 0, torch.device("cpu"))
    record = trainer_for(config, models, PrefixSampler(student, 0.5), iter([[[2, 5, 6]]])).train_step()
    assert record["sampler_logprob_gap"] == pytest.approx(0.5, abs=1e-5)
    assert record["tis_weight"] == pytest.approx(math.exp(-0.5), rel=1e-5)
