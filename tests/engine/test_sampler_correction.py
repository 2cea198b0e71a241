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


def test_a_sampler_gap_above_the_threshold_without_correction_is_one_warning_a_run(tmp_path, monkeypatch):
    """sampler_logprob_gap 0.05 every step (a sampler drawing another policy): one yellow line, at step 1; with tis,
    or at 0.02 and below, none."""
    import io

    from rich.console import Console

    from tropd_cli.config import load_config
    from tropd_cli.distill import SAMPLER_GAP_WARNING, distill, sampler_gap_warning

    real_step = trainer.Trainer.train_step
    monkeypatch.setattr(trainer.Trainer, "train_step",
                        lambda self: {**real_step(self), "sampler_logprob_gap": 0.05})
    printed = io.StringIO()
    settings = ["train.steps=3", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8",
                "eval.problems=0", "train.threads=1", "output.save_model=false", "train.checkpoint_every=0"]
    distill(load_config("toylab", settings), "toylab", out=str(tmp_path / "run"),
            console=Console(file=printed, width=200))
    lines = [line for line in printed.getvalue().splitlines() if "sampler_logprob_gap" in line]
    assert lines == ["warning: sampler_logprob_gap 0.050 at step 1 is above 0.02 nats per token: the rollouts come "
                     "from another policy than the one trained; rollout.importance_correction=tis corrects for it"]
    qlora = RunConfig.model_validate({"student": {"quantization": "4bit", "lora": {"enabled": True}},
                                      "rollout": {"backend": "vllm"}})
    assert "(a QLoRA student's vLLM engine runs the base unquantized)" in sampler_gap_warning(
        {"step": 2, "sampler_logprob_gap": 0.05}, qlora)
    tis = RunConfig.model_validate({"rollout": {"backend": "vllm", "importance_correction": "tis"}})
    assert sampler_gap_warning({"step": 1, "sampler_logprob_gap": 0.05}, tis) is None
    assert sampler_gap_warning({"step": 1, "sampler_logprob_gap": SAMPLER_GAP_WARNING}, qlora) is None
    assert sampler_gap_warning({"step": 1}, qlora) is None
