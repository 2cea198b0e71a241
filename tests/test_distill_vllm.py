"""`tropd distill` end to end with vLLM rollouts (vLLM lane): a short run on the random head_dim-64 pair.

A full student with a vLLM-scored teacher and truncated importance sampling, and a LoRA student with the HF
teacher: every step's metrics are finite and the sampler agrees with the trainer to float32 rounding.
"""

import json
import math

import pytest

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM lane, `make test-vllm`, has it)")

from tropd_cli import cli  # noqa: E402

STEPS = 3


@pytest.mark.parametrize("mode", ["full, vllm teacher, tis", "lora, hf teacher"])
def test_a_short_distill_with_vllm_rollouts_runs_end_to_end(mode, vllm_pair_dir, tmp_path, monkeypatch):
    """Also: the held-out evaluations before and after training sample the student through its engine."""
    from tropd_cli.engine.rollout.vllm import VLLMRolloutBackend

    calls = []
    real_generate = VLLMRolloutBackend.generate
    monkeypatch.setattr(VLLMRolloutBackend, "generate",
                        lambda self, *a, **k: calls.append((self, len(a[0]))) or real_generate(self, *a, **k))
    settings = {
        "teacher.model": vllm_pair_dir / "teacher", "student.model": vllm_pair_dir / "student",
        "rollout.backend": "vllm", "rollout.n": 2, "rollout.prompts_per_step": 4, "rollout.max_new_tokens": 16,
        "rollout.vllm_enforce_eager": "true", "rollout.vllm_kv_cache_gib": 0.25, "rollout.vllm_max_model_len": 256,
        "train.steps": STEPS, "train.warmup_steps": 0, "train.lr": 1e-3, "eval.problems": 3,
        "train.checkpoint_every": 0,
    }
    if mode.startswith("full"):
        settings |= {"teacher.backend": "vllm", "rollout.importance_correction": "tis"}
    else:
        settings |= {"student.lora.enabled": "true", "student.lora.r": 8, "train.lr": 1e-2}
    args = [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]
    out = tmp_path / "run"
    assert cli.main(["distill", "-p", "toylab", *args, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    for record in records:
        assert all(math.isfinite(record[key]) for key in ("loss", "grad_norm", "sampler_logprob_gap"))
        assert record["sampler_logprob_gap"] < 1e-3
        if mode.startswith("full"):
            assert record["tis_weight"] == pytest.approx(1.0, abs=1e-3)
            assert "teacher_entropy" not in record  # a served teacher has none
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["held_out"]["student_sampler"] == "vllm"
    student = calls[-1][0]  # the last call: the evaluation after training
    assert [size for backend, size in calls if backend is student] == [3] + [4] * STEPS + [3]
    assert 0 <= summary["teacher_accuracy"] <= 1  # measured by the teacher's engine when it holds the teacher


@pytest.mark.slow
def test_toylab_with_vllm_rollouts_gains_what_hf_rollouts_gain_over_three_seeds(tmp_path, capsys):
    """20 steps of the toylab preset per seed and backend (the shipped pair: head_dim 32 works on vLLM's CPU
    attention): the mean held-out gain with vLLM rollouts lies within 5 points of the HF backend's."""
    gains: dict[str, list[float]] = {"hf": [], "vllm": []}
    for seed in (0, 1, 2):
        for backend in gains:
            out = tmp_path / f"{backend}{seed}"
            assert cli.main(["distill", "-p", "toylab", "--set", f"train.seed={seed}", "--set", "train.steps=20",
                             "--set", f"rollout.backend={backend}", "--set", "rollout.vllm_kv_cache_gib=0.5",
                             "--set", "eval.problems=150", "--set", "eval.teacher=false", "--out", str(out)]) == 0
            summary = json.loads((out / "summary.json").read_text())
            gains[backend].append(summary["student_accuracy_after"] - summary["student_accuracy_before"])
    means = {backend: sum(values) / len(values) for backend, values in gains.items()}
    with capsys.disabled():
        print(f"\ngains over seeds 0-2, 20 steps: {gains}")
    assert means["vllm"] > 0.05 and abs(means["vllm"] - means["hf"]) <= 0.05, gains


def test_an_in_process_vllm_teacher_is_held_once_and_its_engine_samples(vllm_pair_dir, tmp_path, monkeypatch):
    """teacher.backend=vllm: the teacher's weights are in its engine only (no torch copy loads), and seqkd's
    teacher samples come from that engine."""
    from tropd_cli.engine import run
    from tropd_cli.engine.rollout.vllm import VLLMRolloutBackend

    loads, samples = [], []
    real_load, real_generate = run.load_causal_lm, VLLMRolloutBackend.generate
    monkeypatch.setattr(run, "load_causal_lm", lambda spec, *a, **k: loads.append(spec) or real_load(spec, *a, **k))
    monkeypatch.setattr(VLLMRolloutBackend, "generate",
                        lambda self, *a, **k: samples.append(a[1]) or real_generate(self, *a, **k))
    settings = {
        "teacher.model": vllm_pair_dir / "teacher", "student.model": vllm_pair_dir / "student",
        "teacher.backend": "vllm", "objective.name": "seqkd", "rollout.n": 2, "rollout.prompts_per_step": 2,
        "rollout.max_new_tokens": 8, "rollout.vllm_enforce_eager": "true", "rollout.vllm_kv_cache_gib": 0.25,
        "rollout.vllm_max_model_len": 256, "train.steps": 2, "eval.problems": 0, "train.checkpoint_every": 0,
    }
    args = [part for key, value in settings.items() for part in ("--set", f"{key}={value}")]
    out = tmp_path / "run"
    assert cli.main(["distill", "-p", "toylab", *args, "--out", str(out)]) == 0
    assert loads == [str(vllm_pair_dir / "student")]
    assert samples == [2, 2]  # each step's teacher samples, n=2, from the teacher's engine
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("sampler_logprob_gap" not in record for record in records)  # the teacher's are not the student's
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["teacher_loaded_here"] is True
