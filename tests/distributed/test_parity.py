"""N ranks train the one-process step: per-step loss, gradient norm and final weights within 1e-5.

Each case runs `tropd distill --nproc 2` (two gloo ranks, one prompt each) and the same configuration in
one process. The objective is `opd`, whose loss has no random draw: TrOPD's Bernoulli trust test draws
per rank (equal in distribution, not bit for bit); `objective.trust=hard`, guidance and gkd match too.
"""

import pytest
import torch
from conftest import PARITY, metrics, run_tropd
from helpers import set_args, student_weights

CASES = {
    "ddp-lora": ("train.strategy=ddp", "student.lora.enabled=true", "student.lora.r=4"),
    "fsdp2-full": ("train.strategy=fsdp2",),
    "fsdp2-lora": ("train.strategy=fsdp2", "student.lora.enabled=true", "student.lora.r=4"),
    "ddp-qlora": ("train.strategy=ddp", "student.lora.enabled=true", "student.lora.r=4",
                  "student.quantization=4bit"),
    "fsdp2-qlora": ("train.strategy=fsdp2", "student.lora.enabled=true", "student.lora.r=4",
                    "student.quantization=4bit"),
    # the teacher sharded too: scoring a layer at a time, and (seqkd) generating whole
    "fsdp2-teacher-shard": ("train.strategy=fsdp2", "teacher.shard=true"),
    "ddp-lora-seqkd-teacher-shard": ("train.strategy=ddp", "student.lora.enabled=true", "student.lora.r=4",
                                     "teacher.shard=true", "objective.name=seqkd"),
    # one sequence per micro-batch: the entropy threshold must still be the whole batch's, over both ranks
    "fsdp2-entropy_opd": ("train.strategy=fsdp2", "objective.name=entropy_opd", "train.micro_batch_size=1"),
}
SLOW = {"fsdp2-lora", "ddp-qlora", "fsdp2-qlora", "fsdp2-entropy_opd", "fsdp2-teacher-shard",
        "ddp-lora-seqkd-teacher-shard"}  # ~13 s each; `make test` runs them


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case
                                  for case in CASES])
def test_two_ranks_equal_one_process(case, single_process_runs, tmp_path):
    settings = CASES[case]
    reference = single_process_runs(settings)
    out = tmp_path / "run"
    done = run_tropd("distill", "-p", "toylab", *set_args([*PARITY, *settings]), "--out", str(out), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = metrics(reference), metrics(out)
    assert len(got) == len(expected) == 3
    for one, two in zip(expected, got):
        assert two == pytest.approx(one, abs=1e-5, rel=1e-5)
    assert metrics(out, ("response_length", "truncation_rate")) == metrics(reference, ("response_length",
                                                                                        "truncation_rate"))
    before, after = student_weights(reference), student_weights(out)
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-5, rtol=1e-5)
