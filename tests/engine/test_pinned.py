"""Loss regression tests in the style of torchtune's recipe tests: every objective of
`test_distill_objectives.py` runs two steps of `tropd distill` on the shipped toy pair, and the step
losses, gradient norms and a few objective-specific metrics must match numbers pinned from the code as it
was when this file was written.

The finiteness checks of `test_distill_objectives.py` pass when an option is dropped on its way to the
objective, when the second update reuses the wrong log-probs or when a threshold is computed on the
wrong tokens; numbers pinned to 1e-5 do not. Each run is chosen so that its interesting code path fires:
a learning rate large enough for step 2 to see step 1's update, two updates with a PPO clip small enough
to clip, an EOPD entropy threshold that gives the forward-KL term to some tokens but not all, and small
micro-batches where a threshold must be taken over the whole rollout batch.

The numbers are those of float32 on one CPU thread (the conftest sets it). Step 1 is held to 1e-5 and later
steps to 3e-4 (see STEP1_REL and LATER_REL for the measurements behind them). A deliberate change of the
numerics (a new default, a different sampling order) changes them; regenerate the table with

    TROPD_REPIN=1 pytest -q tests/engine/test_pinned.py

which prints a new PINNED table to paste below (the tests are skipped), and say in the commit why the
numbers moved.
"""

import json
import os

import pytest

from tropd_cli import cli

BASE = ["teacher.model=toylab:teacher", "student.model=toylab:student", "train.steps=2",
        "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=12", "eval.problems=0",
        "output.save_model=false", "train.lr=1e-3", "train.warmup_steps=0"]

# run -> (settings on top of BASE, metrics pinned besides loss and grad_norm)
RUNS = {
    "tropd": ([], ["trust_fraction", "fkl_advantage_outlier"]),
    "tropd-hard-fkl_grad": (["objective.trust=hard", "objective.outlier=fkl_grad"], ["outlier_fraction"]),
    "tropd-mask": (["objective.outlier=mask"], ["loss_token_fraction"]),
    # eps 0.05 after a 1e-3 step: some ratios leave [0.95, 1.05] on the second update
    "tropd-clip-2-updates": (["objective.outlier=clip", "train.updates_per_batch=2", "train.clip_epsilon=0.05",
                              "train.micro_batch_size=2"], ["clip_fraction", "trust_fraction", "reward_outlier"]),
    "opd": (["objective.name=opd"], ["kl_k1"]),
    # the toy teacher is confident: 0.01 nats splits its tokens about one third / two thirds
    "eopd": (["objective.name=eopd", "objective.eopd_entropy_min=0.01"], ["fkl_token_fraction"]),
    # one sequence per micro-batch: the entropy thresholds must still cover the whole rollout batch
    "reopold": (["objective.name=reopold", "objective.reopold_switch_step=1", "train.micro_batch_size=1"],
                ["loss_token_fraction"]),
    "entropy_opd": (["objective.name=entropy_opd", "train.micro_batch_size=1"],
                    ["loss_token_fraction", "student_entropy"]),
    # gkd_lambda 0.5: the seeded coin gives one off-policy and one on-policy step
    "gkd": (["objective.name=gkd"], ["gkd_divergence", "on_policy"]),
    "gkd-off-policy": (["objective.name=gkd", "objective.gkd_lambda=0", "objective.gkd_beta=1"],
                       ["gkd_divergence", "on_policy"]),
    "fkl_topk": (["objective.name=fkl_topk"], ["fkl_topk"]),
    "fkl_topk-advantage": (["objective.name=fkl_topk", "objective.fkl_form=advantage"], ["fkl_topk"]),
    "jsd_onpolicy": (["objective.name=jsd_onpolicy"], ["fkl_topk", "kl_k1"]),
    # a weight other than the default 0.5, where beta and 1 - beta give the same loss
    "jsd_onpolicy-beta": (["objective.name=jsd_onpolicy", "objective.jsd_beta=0.2"], ["fkl_topk", "kl_k1"]),
    "reopold-static_floor": (["objective.name=reopold", "objective.reopold_form=static_floor"],
                             ["loss_token_fraction", "reward_mean"]),
    # three steps: the middle one starts from half the teacher response
    "tropd-guidance": (["objective.guidance=true", "train.steps=3"], ["prefix_length", "prefix_loss", "prefix_ce"]),
    "sft": (["objective.name=sft"], ["response_length"]),
    "seqkd": (["objective.name=seqkd"], ["response_length"]),
}

# run -> {metric: [value at step 1, value at step 2, ...]}, printed by `TROPD_REPIN=1`.
PINNED = {
    "tropd": {
        "loss": [2.19645786, 1.00524206],
        "grad_norm": [5.15886021, 11.4251747],
        "trust_fraction": [0.6875, 0.775],
        "fkl_advantage_outlier": [-7.36819763, -5.24249183],
    },
    "tropd-hard-fkl_grad": {
        "loss": [2.19657588, 0.906986427],
        "grad_norm": [5.73104668, 6.66783381],
        "outlier_fraction": [0.3125, 0.225],
    },
    "tropd-mask": {
        "loss": [-0.106103718, -0.155049992],
        "grad_norm": [1.23686385, 3.86600137],
        "loss_token_fraction": [0.6875, 0.8],
    },
    "tropd-clip-2-updates": {
        "loss": [0.335183806, 0.192498201],
        "grad_norm": [3.72788876, 5.31455502],
        "clip_fraction": [0.125, 0.1375],
        "trust_fraction": [0.6875, 0.75],
        "reward_outlier": [-22.3527498, -21.8221985],
    },
    "opd": {
        "loss": [6.87913084, 3.0249754],
        "grad_norm": [77.0989914, 61.7371712],
        "kl_k1": [6.87913084, 3.0249754],
    },
    "eopd": {
        "loss": [8.19154263, 4.19515572],
        "grad_norm": [77.712677, 63.8382072],
        "fkl_token_fraction": [0.3125, 0.35],
    },
    "reopold": {
        "loss": [-0.154332681, 0.106240225],
        "grad_norm": [1.79907489, 13.1118536],
        "loss_token_fraction": [0.6875, 0.5],
    },
    "entropy_opd": {
        "loss": [15.5679209, 7.68748241],
        "grad_norm": [289.592224, 163.681229],
        "loss_token_fraction": [0.25, 0.225],
        "student_entropy": [0.49865213, 0.451488364],
    },
    "gkd": {
        "loss": [0.0642397553, 0.139617133],
        "grad_norm": [0.604047537, 1.26627457],
        "gkd_divergence": [0.0642397553, 0.139617133],
        "on_policy": [0, 1],
    },
    "gkd-off-policy": {
        "loss": [2.00571553, 2.47669284],
        "grad_norm": [26.7837467, 51.4570465],
        "gkd_divergence": [2.00571553, 2.47669284],
        "on_policy": [0, 0],
    },
    "fkl_topk": {
        "loss": [2.40763068, 1.13365431],
        "grad_norm": [5.89968348, 5.59932375],
        "fkl_topk": [2.40763068, 1.13365431],  # the metric is the unclamped top-k KL: equal to the loss
    },
    "fkl_topk-advantage": {
        "loss": [2.40750408, 2.82619715],  # step 1: -mean A_t, the clamped top-k KL
        "grad_norm": [4.73530197, 12.1560402],
        "fkl_topk": [2.40763068, 2.8543067],
    },
    "jsd_onpolicy": {
        "loss": [4.64338112, 2.10547409],  # step 1: (kl_k1 + fkl_topk) / 2
        "grad_norm": [39.2102203, 32.3733025],
        "fkl_topk": [2.40763068, 1.18331642],
        "kl_k1": [6.87913084, 3.02763176],
    },
    "jsd_onpolicy-beta": {
        "loss": [3.30193067, 1.5358778],  # step 1: 0.2 kl_k1 + 0.8 fkl_topk (1 - beta on K1 gives 5.99)
        "grad_norm": [16.9516773, 14.924963],
        "fkl_topk": [2.40763021, 1.16245661],
        "kl_k1": [6.87913179, 3.02956276],
    },
    "reopold-static_floor": {
        "loss": [0.327113271, 0.147271287],
        "grad_norm": [6.60531378, 10.4133396],
        "loss_token_fraction": [1, 1],
        "reward_mean": [-6.87913084, -4.13909225],
    },
    "tropd-guidance": {
        "loss": [-0.0730429292, 0.384944049, 6.19855626],
        "grad_norm": [2.56894588, 5.2384181, 93.4788361],
        "prefix_length": [12, 6, 0],
        "prefix_loss": [0.000215242888, 0.00123135396, 0],
        "prefix_ce": [0.215242863, 1.231354, 0],
    },
    "sft": {
        "loss": [0.215242783, 0.435739557],
        "grad_norm": [2.29795051, 12.5439653],
        "response_length": [12, 12],
    },
    "seqkd": {
        "loss": [0.215242783, 0.435739915],
        "grad_norm": [2.29795051, 12.5439711],
        "response_length": [12, 12],
    },
}

REPIN = os.environ.get("TROPD_REPIN") == "1"

# Tolerances from bench/results/pinned_drift.json (`bench/pinned_drift.py`): this table against runs with transformers
# 5.19, 5.23 and 5.25 at 1 and 2 torch threads on another CPU (AMD EPYC, AVX2, no AVX-512), plus the drift a user
# reported on an AVX512-BF16 CPU after a registry update. Step 1 starts from the shipped weights: it moved by at most
# 1.7e-6 (under 1e-5 in the report), so it stays at 1e-5, where an option dropped on its way to an objective or a
# threshold taken over the wrong tokens shows. From step 2 on, the first update's rounding differences grow: at most
# 9.2e-5 measured (gkd-off-policy grad_norm), 4.1e-5 reported; 3e-4 leaves a margin of 3x. Bugs that only show from
# step 2 stay outside it (`--perturb` in the same bench): over the 18 cases a learning rate 1% off moves the later
# steps by 3.1e-3 to 6.7e-2, and a weight decay of 0.11 instead of the preset's 0 by 1.8e-4 to 4.6e-3 (past 3e-4 in 14
# of 18 cases).
STEP1_REL = 1e-5
LATER_REL = 3e-4


def distill_records(out, settings: list[str]) -> list[dict]:
    argv = ["distill", "--preset", "toylab", "--out", str(out)]
    assert cli.main(argv + [a for s in BASE + settings for a in ("--set", s)]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def pinned_entry(run: str, metrics: dict[str, list[float]]) -> str:
    """`run`'s entry of PINNED as Python source, nine significant digits (the tightest tolerance is 1e-5)."""
    lines = [f'    "{run}": {{']
    for name, values in metrics.items():
        lines.append(f'        "{name}": [{", ".join(f"{value:.9g}" for value in values)}],')
    return "\n".join(["", *lines, "    },"])


@pytest.mark.parametrize("run", list(RUNS))
def test_two_steps_match_the_pinned_numbers(run, tmp_path, capsys):
    settings, specific = RUNS[run]
    if REPIN and os.environ.get("TROPD_PINNED_EXTRA"):  # bench/pinned_drift.py --perturb: a deliberate bug's size
        settings = [*settings, *os.environ["TROPD_PINNED_EXTRA"].split()]
    records = distill_records(tmp_path / run, settings)
    got = {name: [record[name] for record in records] for name in ["loss", "grad_norm", *specific]}
    if REPIN:
        if out := os.environ.get("TROPD_PINNED_OUT"):  # bench/pinned_drift.py collects every run's numbers
            with open(out, "a") as sink:
                sink.write(json.dumps({"run": run, "metrics": got}) + "\n")
        capsys.readouterr()
        with capsys.disabled():
            print(pinned_entry(run, got))
        pytest.skip("repinning")
    assert got.keys() == PINNED[run].keys()
    for name, pinned in PINNED[run].items():
        assert got[name][:1] == pytest.approx(pinned[:1], rel=STEP1_REL, abs=1e-7), (run, name, "step 1")
        assert got[name][1:] == pytest.approx(pinned[1:], rel=LATER_REL, abs=1e-7), (run, name, "later steps")
