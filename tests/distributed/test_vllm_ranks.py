"""vLLM on every rank (the vLLM lane): under `--nproc 2` each gloo rank holds its own vLLM engine, samples its own
prompts and takes the new weights after every update (a full student's gathered whole from its FSDP2 shards, a LoRA
student's adapter, under DDP or gathered from its FSDP2 shards). Near-greedy sampling (temperature 1e-6) makes two
ranks' rollouts the one-process vLLM run's, so losses, gradient norms and final weights match it within the HF parity
tests' 1e-5."""

import pytest
import torch
from conftest import metrics, run_tropd
from helpers import set_args, student_weights

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM lane, `make test-vllm`, has it)")

# The v2 pair: head_dim 64, as vLLM's CPU attention needs.
SETTINGS = ["teacher.model=toylab:v2-teacher", "student.model=toylab:v2-student-e0.03", "train.steps=3",
            "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=16", "rollout.temperature=1e-6",
            "eval.problems=0", "train.lr=1e-3", "train.warmup_steps=0", "train.threads=1", "train.device=cpu",
            "objective.name=opd", "train.checkpoint_every=0", "rollout.backend=vllm", "rollout.vllm_kv_cache_gib=0.25",
            "rollout.vllm_enforce_eager=true", "rollout.vllm_max_model_len=256"]
CASES = {"fsdp2-full": ("train.strategy=fsdp2",),
         "ddp-lora": ("train.strategy=ddp", "student.lora.enabled=true", "student.lora.r=4"),
         # the adapters are DTensor shards: gathered whole, then saved for the engine
         "fsdp2-lora": ("train.strategy=fsdp2", "student.lora.enabled=true", "student.lora.r=4"),
         # two engines on every rank: the student's and the teacher's, both joined to the ranks' group
         "ddp-full-vllm-teacher": ("train.strategy=ddp", "teacher.backend=vllm", "objective.top_k=16")}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_with_their_own_engines_equal_one_process(case, tmp_path):
    settings = [*SETTINGS, *CASES[case]]
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_tropd("distill", "-p", "toylab", *set_args(settings), "--out", str(one), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_tropd("distill", "-p", "toylab", *set_args(settings), "--out", str(two), "--nproc", "2", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # nothing from vLLM's engines on the ranks' stderr
    names = ("loss", "grad_norm", "kl_k1", "sampler_logprob_gap")
    assert len(metrics(two)) == 3
    for expected, got in zip(metrics(one, names), metrics(two, names), strict=True):
        assert got == pytest.approx(expected, abs=1e-5, rel=1e-5)
    lengths = ("response_length", "truncation_rate")
    assert metrics(two, lengths) == metrics(one, lengths)
    before, after = student_weights(one), student_weights(two)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-5, rtol=1e-5)
