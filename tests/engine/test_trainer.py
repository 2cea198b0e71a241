"""The training loop's invariants, asserted through `Trainer.train_step()` records and the student's weights.

The objective tests check the mathematics on hand-made tensors; these check the wiring around it: that
micro-batching changes no value, that every update of a rollout batch measures rho, the PPO clip and the
trust test against the policy that sampled, that each option reaches its objective, that entropy
thresholds cover the whole rollout batch, that the step's student entropy is the sampling policy's over
the generated tokens, that non-finite values never reach the weights, and that a second Ctrl-C stops at
once. Trainers come from `make_trainer` in conftest.py.
"""

from __future__ import annotations

import copy
import math
import signal

import pytest
import torch
from rich.console import Console
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.engine.conftest import TINY, make_trainer, student_of, toy_config
from tropd_cli import cli, distill
from tropd_cli.engine import run

# What a record reports that is not a function of the weights and rollouts.
TIMINGS = ("rollout_s", "score_s", "update_s", "sync_s", "tokens_per_s", "peak_memory_gib")


def first_step(*settings: str, prepare=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The first step's record and the student's weights after it."""
    trainer = make_trainer(toy_config(*settings), prepare)
    record = trainer.train_step()
    weights = {name: p.detach().clone() for name, p in student_of(trainer).named_parameters()}
    return record, weights


def first_step_gradients(*settings: str) -> tuple[dict, list[dict[str, torch.Tensor]]]:
    """The first step's record and the gradients each of its optimizer steps was handed (clipped)."""
    trainer = make_trainer(toy_config(*settings))
    names = {p: name for name, p in student_of(trainer).named_parameters()}
    seen: list[dict[str, torch.Tensor]] = []

    def keep_gradients(optimizer, args, kwargs) -> None:
        seen.append({names[p]: p.grad.clone() for group in optimizer.param_groups for p in group["params"]
                     if p in names and p.grad is not None})

    handle = register_optimizer_step_pre_hook(keep_gradients)
    try:
        record = trainer.train_step()
    finally:
        handle.remove()
    return record, seen


def initial_weights() -> dict[str, torch.Tensor]:
    trainer = make_trainer(toy_config())
    return {name: p.detach().clone() for name, p in student_of(trainer).named_parameters()}


def response_tokens(record: dict) -> int:
    """Response tokens of the step: its mean response length times its 4 rollouts."""
    return round(record["response_length"] * 4)


# The bernoulli trust test draws from one generator per update, token by token in the batch's sorted
# order, so it too is the same whatever the micro-batch size.
INVARIANT = {
    "opd": ["objective.name=opd"],
    "tropd": [],
    "tropd-hard-fkl": ["objective.trust=hard"],
    "tropd-hard-fkl_grad-2-updates": ["objective.trust=hard", "objective.outlier=fkl_grad",
                                      "train.updates_per_batch=2", "train.clip_epsilon=0.05"],
    "eopd": ["objective.name=eopd", "objective.eopd_entropy_min=0.01"],
    "entropy_opd": ["objective.name=entropy_opd"],
    "reopold-after-switch": ["objective.name=reopold", "objective.reopold_switch_step=0"],
    "gkd": ["objective.name=gkd", "objective.gkd_lambda=1"],
    "guidance-hard": ["objective.guidance=true", "objective.trust=hard"],
    "tropd-grad-norm-split": ["train.grad_norm_split=true"],
    "opd-grad-norm-split": ["objective.name=opd", "train.grad_norm_split=true"],
}


@pytest.mark.parametrize("run", list(INVARIANT))
def test_micro_batch_size_changes_no_value(run):
    # Gradients, not weights: Adam's first step lr * g / (|g| + eps) turns rounding in a tiny g into a
    # visible difference in the weights.
    one, one_gradients = first_step_gradients(*INVARIANT[run], "train.micro_batch_size=1")
    whole, whole_gradients = first_step_gradients(*INVARIANT[run], "train.micro_batch_size=64")
    assert one.keys() == whole.keys()
    for name in one.keys() - set(TIMINGS):
        assert one[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-6), name
    assert len(one_gradients) == len(whole_gradients) > 0
    for one_update, whole_update in zip(one_gradients, whole_gradients, strict=True):
        assert one_update.keys() == whole_update.keys()
        for name, gradient in one_update.items():
            torch.testing.assert_close(gradient, whole_update[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fraction", [0.2, 0.5])
@pytest.mark.parametrize("name", ["entropy_opd", "reopold"])
def test_entropy_selection_counts_the_top_fraction_of_the_whole_rollout_batch(name, fraction):
    # One sequence per micro-batch: a per-micro-batch threshold would keep ceil(f n_i) of each sequence.
    # One rollout per prompt: two rollouts of a prompt share their first context, hence tie in entropy.
    option = "entropy_top_fraction" if name == "entropy_opd" else "reopold_beta"
    record, _ = first_step(f"objective.name={name}", f"objective.{option}={fraction}",
                           "objective.reopold_switch_step=0", "train.micro_batch_size=1",
                           "rollout.prompts_per_step=4", "rollout.n=1")
    tokens = response_tokens(record)
    assert record["loss_token_fraction"] == pytest.approx(math.ceil(fraction * tokens) / tokens, abs=1e-9)


@pytest.mark.parametrize("settings", [["objective.name=opd"], ["objective.guidance=true", "train.steps=3"]],
                         ids=["opd", "guidance"])
def test_student_entropy_is_the_token_mean_over_generated_tokens_of_the_sampling_policy(settings):
    """H_t = -sum_v pi_S(v | c_t) log pi_S(v | c_t) from the logits of one unbatched forward of the student
    before the update, averaged over the tokens the student generated (a guidance prefix is not), one
    sequence per micro-batch, so that the token-weighted mean over micro-batches is what is checked. With
    guidance the checked step is the middle one, whose rollouts start from half the teacher response."""
    trainer = make_trainer(toy_config(*settings, "train.micro_batch_size=1"))
    if "objective.guidance=true" in settings:
        trainer.train_step()
    seen = []
    sample = trainer._rollouts

    def record_rollouts(prompt_ids):
        seen.append(sample(prompt_ids))
        return seen[-1]

    trainer._rollouts = record_rollouts
    student = copy.deepcopy(student_of(trainer))
    record = trainer.train_step()
    rollouts, _, prefix_lengths = seen[0]
    prefix_lengths = prefix_lengths or [0] * len(rollouts.response_ids)
    entropies = []
    with torch.no_grad():
        for row, response in enumerate(rollouts.response_ids):
            prompt = rollouts.prompt_ids[rollouts.prompt_index[row]]
            logits = student(input_ids=torch.tensor([prompt + response])).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:-1]  # [response, vocab]
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            entropies.append(entropy[prefix_lengths[row]:])
    generated = torch.cat(entropies)
    assert len(generated) == response_tokens(record)  # the record's response length counts generated tokens
    assert (sum(prefix_lengths) > 0) == ("objective.guidance=true" in settings)
    assert record["student_entropy"] == pytest.approx(float(generated.mean()), rel=1e-5)


TRUSTED_ON_SAMPLING_POLICY = ["reward_mean", "kl_k1", "reward_min", "trust_fraction", "outlier_fraction",
                              "reward_trusted", "reward_outlier"]


@pytest.mark.parametrize("trust", ["hard", "bernoulli"])
def test_second_update_measures_reward_and_trust_on_the_sampling_policy(trust):
    """The second update changes the loss (rho departs from 1) but not r_t = tau_t - sbar_t, nor the trust
    mask, which are both functions of the sampling policy and of the step's seeded draws."""
    settings = [f"objective.trust={trust}", "objective.outlier=clip", "train.clip_epsilon=null"]
    once, _ = first_step(*settings)
    twice, _ = first_step(*settings, "train.updates_per_batch=2")
    for name in TRUSTED_ON_SAMPLING_POLICY:
        assert twice[name] == pytest.approx(once[name], rel=1e-6, abs=1e-7), name
    # the record averages the updates' losses; the second update's loss is that of rho != 1
    second = 2 * twice["loss"] - once["loss"]
    assert abs(second - once["loss"]) > 1e-3


def test_ppo_clip_acts_on_the_second_update_only():
    opd = ["objective.name=opd"]
    clipped_once, clipped_once_weights = first_step(*opd, "train.clip_epsilon=0.01")
    free_once, free_once_weights = first_step(*opd, "train.clip_epsilon=null")
    # first update: rho = 1, nothing to clip
    assert clipped_once["clip_fraction"] == 0.0
    assert clipped_once["loss"] == free_once["loss"] and clipped_once["grad_norm"] == free_once["grad_norm"]
    for name, weight in clipped_once_weights.items():
        assert torch.equal(weight, free_once_weights[name]), name
    clipped, _ = first_step(*opd, "train.clip_epsilon=0.01", "train.updates_per_batch=2")
    free, _ = first_step(*opd, "train.clip_epsilon=null", "train.updates_per_batch=2")
    # clip_fraction averages over both updates' tokens: the second update clips a share of its tokens
    assert 0.0 < clipped["clip_fraction"] < 0.5
    assert free["clip_fraction"] == 0.0
    assert abs(clipped["grad_norm"] - free["grad_norm"]) > 1e-3


def test_eopd_entropy_min_reaches_the_objective():
    some, _ = first_step("objective.name=eopd", "objective.eopd_entropy_min=0.01")
    none, _ = first_step("objective.name=eopd", "objective.eopd_entropy_min=100")
    opd, _ = first_step("objective.name=opd")
    assert 0.0 < some["fkl_token_fraction"] < 1.0
    assert none["fkl_token_fraction"] == 0.0
    # with no token above the threshold EOPD is OPD
    assert none["loss"] == pytest.approx(opd["loss"], rel=1e-6)
    assert none["grad_norm"] == pytest.approx(opd["grad_norm"], rel=1e-6)
    assert some["loss"] > none["loss"] + 1e-3  # the forward-KL term is positive


# (objective settings, option, two values, a metric that must differ between them)
OPTIONS = [
    (["objective.trust=hard", "objective.outlier=clip"], "objective.clip_lambda", (0.2, 0.001), "loss"),
    (["objective.name=reopold", "objective.reopold_switch_step=0"], "objective.reopold_beta", (0.5, 0.2),
     "loss_token_fraction"),
    (["objective.name=reopold"], "objective.reopold_switch_step", (0, 5), "loss_token_fraction"),
    (["objective.name=reopold", "objective.reopold_switch_step=5"], "objective.clip_lambda", (0.2, 1e-9),
     "loss_token_fraction"),
    (["objective.name=entropy_opd"], "objective.entropy_top_fraction", (0.2, 0.6), "loss_token_fraction"),
    (["objective.name=gkd", "objective.gkd_lambda=1"], "objective.gkd_beta", (0.5, 0.1), "gkd_divergence"),
    (["objective.trust=hard"], "objective.top_k", (64, 2), "fkl_advantage_outlier"),
    (["objective.name=fkl_topk"], "objective.top_k", (64, 2), "loss"),
    (["objective.name=eopd", "objective.eopd_entropy_min=0.01"], "objective.eopd_top_k", (16, 2), "loss"),
    (["objective.trust=hard"], "objective.outlier", ("fkl", "mask"), "loss"),
    (["objective.guidance=true"], "objective.guidance_beta", (0.001, 0.1), "prefix_loss"),
]


@pytest.mark.parametrize(("settings", "option", "values", "metric"), OPTIONS,
                         ids=[f"{s[0] if s else 'tropd'}:{o}" for s, o, _, _ in OPTIONS])
def test_each_option_reaches_its_objective(settings, option, values, metric):
    first, second = (first_step(*settings, f"{option}={value}")[0] for value in values)
    assert abs(first[metric] - second[metric]) > 1e-6 * max(1.0, abs(first[metric]))


def poison_teacher(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """NaN teacher logits: r_t, and so the loss, are NaN."""
    with torch.no_grad():
        teacher.get_output_embeddings().weight.fill_(math.nan)


def infinite_student_gradient(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """A finite loss whose gradient is infinite in one weight."""
    weight = next(p for p in student.parameters() if p.requires_grad)
    weight.register_hook(lambda grad: grad * math.inf)


@pytest.mark.parametrize("prepare", [poison_teacher, infinite_student_gradient])
def test_a_non_finite_loss_or_gradient_never_updates_the_weights(prepare):
    record, weights = first_step(prepare=prepare)
    assert not math.isfinite(record["grad_norm"])
    before = initial_weights()
    for name, weight in weights.items():
        assert torch.equal(weight, before[name]), name


def test_distill_stops_with_one_line_on_a_non_finite_loss(tmp_path, monkeypatch, capsys):
    real_load_models = run.load_models

    def poisoned(*args, **kwargs):
        teacher, student = real_load_models(*args, **kwargs)
        poison_teacher(teacher, student)
        return teacher, student

    monkeypatch.setattr(run, "load_models", poisoned)
    settings = [a for s in [*TINY, "output.save_model=false"] for a in ("--set", s)]
    assert cli.main(["distill", "--preset", "toylab", "--out", str(tmp_path / "run"), *settings]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training diverged at step 1: loss is nan; the run stopped; lower train.lr")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_second_ctrl_c_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    stop = distill.StopAfterStep(Console(quiet=True))
    with stop:
        signal.raise_signal(signal.SIGINT)  # the first only asks to stop after the step
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous
