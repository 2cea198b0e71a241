"""Every objective end to end on the toy lab (`tropd distill --set objective.name=...`), and the
combinations that are rejected before the first step."""

import json
import math

import pytest

from tropd_cli import cli
from tropd_cli.engine import run


def tiny_run(pair, out, *settings: str) -> list[str]:
    base = [f"teacher.model={pair / 'teacher'}", f"student.model={pair / 'student'}", "train.steps=2",
            "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=6", "eval.problems=0",
            "output.save_model=false", *settings]
    return ["distill", "--preset", "toylab", "--out", str(out), *[a for s in base for a in ("--set", s)]]


# (settings, metrics that must be present and finite)
RUNS = {
    "tropd": ([], ["trust_fraction", "outlier_fraction", "fkl_topk"]),
    "tropd-hard-fkl_grad": (["objective.trust=hard", "objective.outlier=fkl_grad"], ["outlier_fraction"]),
    "tropd-mask": (["objective.outlier=mask"], ["loss_token_fraction"]),
    "tropd-clip-2-updates": (["objective.outlier=clip", "train.updates_per_batch=2"], ["clip_fraction"]),
    "opd": (["objective.name=opd"], ["trust_fraction"]),
    "eopd": (["objective.name=eopd", "objective.eopd_entropy_min=0"], ["fkl_token_fraction"]),
    "reopold": (["objective.name=reopold", "objective.reopold_switch_step=1"], ["clip_fraction"]),
    "entropy_opd": (["objective.name=entropy_opd"], ["student_entropy"]),
    "gkd": (["objective.name=gkd"], ["gkd_divergence", "on_policy"]),
    "gkd-off-policy": (["objective.name=gkd", "objective.gkd_lambda=0", "objective.gkd_beta=1"], ["on_policy"]),
    "fkl_topk": (["objective.name=fkl_topk"], ["fkl_topk"]),
    "fkl_topk-advantage": (["objective.name=fkl_topk", "objective.fkl_form=advantage"], ["clip_fraction"]),
    "jsd_onpolicy": (["objective.name=jsd_onpolicy"], ["fkl_topk", "clip_fraction"]),
    "reopold-static_floor": (["objective.name=reopold", "objective.reopold_form=static_floor"], ["clip_fraction"]),
    "tropd-guidance": (["objective.guidance=true"], ["prefix_length", "prefix_loss", "prefix_ce"]),
    "sft": (["objective.name=sft"], []),
    "seqkd": (["objective.name=seqkd"], []),
}
COMMON = ["loss", "grad_norm", "reward_mean", "reward_min", "kl_k1", "teacher_entropy", "student_entropy",
          "loss_token_fraction"]


@pytest.mark.parametrize("run", list(RUNS))
def test_every_objective_runs_end_to_end_with_finite_metrics(run, random_pair_dir, tmp_path):
    settings, specific = RUNS[run]
    out = tmp_path / run
    assert cli.main(tiny_run(random_pair_dir, out, *settings)) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        for name in COMMON + specific:
            assert math.isfinite(line[name]), (run, name, line)


@pytest.mark.parametrize(("settings", "message"), [
    (["objective.top_k=100000"], "error: objective.top_k=100000 is larger than the vocabulary"),
    (["objective.name=eopd", "objective.eopd_top_k=100000"], "error: objective.eopd_top_k=100000 is larger"),
    (["objective.outlier=drop"], "error: invalid value for objective.outlier: 'drop'"),
    (["objective.name=ppo"], "error: invalid value for objective.name: 'ppo'"),
    (["objective.name=sft", "objective.guidance=true"], "error: objective.guidance applies to objective.name=tropd"),
])
def test_invalid_combinations_fail_before_the_first_step(settings, message, random_pair_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_run(random_pair_dir, out, *settings)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text()


@pytest.mark.parametrize(("settings", "message"), [
    (["objective.guidance=true"], "error: objective.guidance=true needs teacher responses"),
    (["objective.name=sft"], "error: objective.name=sft needs teacher responses"),
])
def test_teacher_responses_without_a_source_fail_before_the_first_step(settings, message, random_pair_dir,
                                                                      tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "teacher_response_source", lambda *args: None)
    out = tmp_path / "run"
    assert cli.main(tiny_run(random_pair_dir, out, *settings)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (out / "metrics.jsonl").exists()
