"""Stopping and resuming on two ranks; the launcher's one line for a rank that dies; unequal rollouts.

A rank killed with SIGKILL after the step-2 checkpoint brings the other down within seconds and the
launcher says which rank died in one line; `--resume --nproc 2` then finishes the run with exactly the
metrics and weights of the uninterrupted two-rank run; a resume on another number of processes is refused
in one line.
"""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import PARITY, ROOT, metrics, rank_env, run_tropd, tropd_command
from helpers import quiet, set_args, student_weights

from tropd_cli.distill import resume
from tropd_cli.errors import TropdError

STEPS = ["train.steps=10", "train.checkpoint_every=2", "train.checkpoint_keep=0", "train.strategy=fsdp2"]


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "tropd_cli" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} among the launcher's processes")


def test_a_killed_rank_stops_the_run_in_one_line_and_resume_equals_uninterrupted(tmp_path):
    settings = [*PARITY, *STEPS]
    reference = tmp_path / "uninterrupted"
    done = run_tropd("distill", "-p", "toylab", *set_args(settings), "--out", str(reference), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    launcher = subprocess.Popen(tropd_command("distill", "-p", "toylab", *set_args(settings), "--out", str(out),
                                              "--nproc", "2"),
                                env=rank_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "step-000002").is_dir():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.005)
    rank_process(psutil.Process(launcher.pid), 1).kill()
    killed = time.monotonic()
    _, err = launcher.communicate(timeout=60)
    assert time.monotonic() - killed < 15
    assert launcher.returncode == 1
    assert "error: rank 1 of 2 died (SIGKILL); the other ranks were stopped" in err
    assert err.count("error") == 1, err
    assert len(metrics(out)) < 10  # the kill came before the end

    with pytest.raises(TropdError, match=f"^{out} was trained on 2 processes and this resume runs 1; resume it "
                                         "with --nproc 2$"):
        resume(out, console=quiet())

    done = run_tropd("distill", "--resume", str(out), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    names = ("loss", "grad_norm", "kl_k1", "response_length")
    assert len(metrics(out)) == 10 and metrics(out, names) == metrics(reference, names)
    before, after = student_weights(reference), student_weights(out)
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


# Imported by the ranks of the test below (on their PYTHONPATH): rank 1's served teacher fails for good at its fourth
# scoring call, the one of step 4, while rank 0's answers.
TEACHER_GONE_ON_RANK_1 = """
import os
if os.environ.get("RANK") == "1":
    from tropd_cli.engine.teacher import server
    from tropd_cli.errors import TeacherUnavailable

    real_score, calls = server.ServerTeacherScorer.score, []

    def score(self, *args, **kwargs):
        calls.append(1)
        if len(calls) >= 4:
            raise TeacherUnavailable("teacher server http://127.0.0.1:9 did not answer /v1/completions after 4 tries "
                                     "(Connection refused)")
        return real_score(self, *args, **kwargs)

    server.ServerTeacherScorer.score = score
"""


def test_a_served_teacher_gone_on_one_rank_stops_both_after_the_last_step_and_resume_matches(tmp_path):
    """The served teacher fails on rank 1 only, inside step 4, while rank 0's step-4 scores arrive: both ranks
    stop before any update of step 4 (neither waits in the gradient all-reduce), one line names the failure, the
    checkpoint of step 3 is written with both ranks' parts, and `--resume --nproc 2` finishes the run with the
    uninterrupted run's metrics and weights."""
    from helpers import ServedTeacher

    from tropd_cli.models import TOYLAB_ASSETS
    from tropd_cli.runfolder import RunFolder

    server = ServedTeacher(TOYLAB_ASSETS / "teacher", name="toylab:teacher")
    try:
        settings = [*PARITY, "train.steps=6", "train.checkpoint_every=0", "train.strategy=fsdp2",
                    "teacher.backend=server", f"teacher.url={server.url}"]
        reference, out = tmp_path / "uninterrupted", tmp_path / "run"
        done = run_tropd("distill", "-p", "toylab", *set_args(settings), "--out", str(reference), "--nproc", "2")
        assert done.returncode == 0, done.stderr[-3000:]
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(TEACHER_GONE_ON_RANK_1)
        env = rank_env()
        env["PYTHONPATH"] = f"{tmp_path / 'site'}{os.pathsep}{env['PYTHONPATH']}"
        failed = subprocess.run(tropd_command("distill", "-p", "toylab", *set_args(settings), "--out", str(out),
                                              "--nproc", "2"),
                                env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert failed.returncode == 2, failed.stderr[-3000:]
        checkpoint = out / "checkpoints" / "step-000003"
        assert failed.stderr.strip() == (
            "error: teacher server http://127.0.0.1:9 did not answer /v1/completions after 4 tries (Connection "
            f"refused); the run stopped after step 3 with a checkpoint in {checkpoint}; go on with: tropd distill "
            f"--resume {out} --nproc 2 --set teacher.url=URL")
        assert [step for step, _ in RunFolder(out).list_checkpoints()] == [3] and len(metrics(out)) == 3
        done = run_tropd("distill", "--resume", str(out), "--nproc", "2", "--set", f"teacher.url={server.url}")
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.close()
    names = ("loss", "grad_norm", "kl_k1", "response_length")
    assert metrics(out, names) == metrics(reference, names)
    before, after = student_weights(reference), student_weights(out)
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_a_served_teachers_held_out_accuracy_is_asked_once_and_every_rank_takes_it(tmp_path):
    """With a served teacher on two ranks the first rank samples the teacher's held-out answers (one request per
    problem, as one process asks) and both ranks take its number: the run's teacher accuracy is one process's."""
    from helpers import ServedTeacher

    from tropd_cli.models import TOYLAB_ASSETS

    server = ServedTeacher(TOYLAB_ASSETS / "teacher", name="toylab:teacher")
    try:
        settings = [*PARITY, "train.steps=1", "train.checkpoint_every=0", "train.strategy=fsdp2", "eval.problems=3",
                    "eval.k=2", "eval.temperature=1.0", "eval.greedy=false", "teacher.backend=server",
                    f"teacher.url={server.url}"]
        asked = {}
        for nproc in (1, 2):
            server.requests.clear()
            done = run_tropd("distill", "-p", "toylab", *set_args(settings), "--out", str(tmp_path / str(nproc)),
                             "--nproc", str(nproc))
            assert done.returncode == 0, done.stderr[-3000:]
            asked[nproc] = [body for body in server.requests if body.get("prompt_logprobs") is None]
    finally:
        server.close()
    assert len(asked[1]) == 3 and [body["n"] for body in asked[1]] == [2, 2, 2]
    assert asked[2] == asked[1]  # the same three requests, from one rank
    accuracy = {n: json.loads((tmp_path / str(n) / "summary.json").read_text())["teacher_accuracy"] for n in (1, 2)}
    assert accuracy[2] == accuracy[1] is not None


def test_ranks_generating_different_lengths_do_not_wait_for_each_other():
    """Under FSDP2, rank 0 generates 4 tokens once and rank 1 twelve tokens twice, then both score and step
    together."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(ROOT / "tests" / "distributed" / "unequal_generation.py")],
                          env=rank_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank"))
    assert lines[0].startswith("rank 0: 4 new tokens, grad norm ")
    assert lines[1].startswith("rank 1: 12 new tokens, grad norm ")
    assert lines[0].split("grad norm ")[1] == lines[1].split("grad norm ")[1]


def test_ctrl_c_stops_every_rank_after_one_step_with_one_checkpoint(tmp_path):
    """SIGINT to the launcher (what a terminal's Ctrl-C sends it): the ranks agree on the step to stop after,
    rank 0 saves one checkpoint and prints one line with the resume command."""
    out = tmp_path / "run"
    settings = [*PARITY, "train.steps=40", "train.checkpoint_every=5", "train.checkpoint_keep=0"]
    launcher = subprocess.Popen(tropd_command("distill", "-p", "toylab", *set_args(settings), "--out", str(out),
                                              "--nproc", "2"),
                                env=rank_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "step-000005").is_dir():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.005)
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130
    stopped = len(metrics(out))
    assert stopped < 40
    checkpoint = out / "checkpoints" / f"step-{stopped:06d}"
    assert err.strip() == (f"stopped: stopped after step {stopped}; checkpoint saved in {checkpoint}; continue "
                           f"with: tropd distill --resume {out} --nproc 2")
    assert checkpoint.is_dir()
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_guidance_with_sampled_teacher_responses_resumes_exactly_on_two_ranks(tmp_path):
    """Temperature 1: each rank samples and caches the teacher responses of its own prompts, and a resume
    restores every rank's cache, so Ctrl-C and --resume give the uninterrupted run bit for bit."""
    settings = ["train.steps=8", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8",
                "eval.problems=0", "train.lr=1e-3", "train.threads=1", "train.device=cpu", "objective.guidance=true",
                "train.checkpoint_every=2", "train.checkpoint_keep=0", "student.lora.enabled=true"]
    reference, out = tmp_path / "uninterrupted", tmp_path / "run"
    done = run_tropd("distill", "-p", "toylab", *set_args(settings), "--out", str(reference), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    launcher = subprocess.Popen(tropd_command("distill", "-p", "toylab", *set_args(settings), "--out", str(out),
                                              "--nproc", "2"),
                                env=rank_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "step-000002").is_dir():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
        time.sleep(0.005)
    launcher.send_signal(signal.SIGINT)
    launcher.communicate(timeout=60)
    assert launcher.returncode == 130 and len(metrics(out)) < 8
    done = run_tropd("distill", "--resume", str(out), "--nproc", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    names = ("loss", "grad_norm", "prefix_length", "response_length")
    assert metrics(out, names) == metrics(reference, names)
    before, after = student_weights(reference), student_weights(out)
    assert all(torch.equal(before[name], after[name]) for name in before)
