"""Nothing lost, ever: owned folders, one writer, one-line failures, guarded resume, safe model loading.

Each promise of the README's "What tropd promises about your files" has a test here. Faults that kill or
limit a process (SIGKILL, RLIMIT_FSIZE, a second process) run `python -m tropd_cli` in a child process.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from helpers import crash_inside_step, pair_models, set_args

from tropd_cli import cli
from tropd_cli.checkpoints import verify_checkpoint
from tropd_cli.config import load_config_file
from tropd_cli.engine.trainer import Trainer
from tropd_cli.errors import TropdError
from tropd_cli.files import LOCK, LOCK_INFO, MARKER, holder
from tropd_cli.models import check_safetensors, load_causal_lm, load_model_config
from tropd_cli.runfolder import RunFolder

FILE_SIZE_LIMIT = 100_000  # above config.yaml, summary.json and a tokenizer; below the toy student's weights


def tiny(pair: Path, steps: int = 4, *extra: str) -> list[str]:
    return set_args([*pair_models(pair), f"train.steps={steps}", "rollout.prompts_per_step=2", "rollout.n=2",
                     "rollout.max_new_tokens=6", "eval.problems=0", "train.checkpoint_every=2",
                     "train.checkpoint_keep=0", "train.lr=1e-3", "train.threads=1", *extra])


def distill_argv(pair: Path, out: Path, steps: int = 4, *extra: str) -> list[str]:
    return ["distill", "-p", "toylab", *tiny(pair, steps, *extra), "--out", str(out)]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders): equal trees are byte-identical."""
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(folder.rglob("*"))}


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.strip()


def child(argv: list[str], tmp_path: Path, prelude: str = "", **popen) -> subprocess.Popen:
    """`tropd ARGV` in a child process (optionally after Python `prelude`), output to files in tmp_path."""
    code = f"import sys\n{prelude}\nfrom tropd_cli.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=(tmp_path / "child.out").open("w"),
                            stderr=(tmp_path / "child.err").open("w"), text=True, **popen)


def child_err(tmp_path: Path) -> str:
    return (tmp_path / "child.err").read_text()


def wait_for(condition, process: subprocess.Popen, tmp_path: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, child_err(tmp_path)
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def finished_run(random_pair_dir, tmp_path_factory) -> Path:
    """A finished four-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(distill_argv(random_pair_dir, out)) == 0
    return out


def copy_run(run: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(run, target)
    return target


# ---- 1. folders tropd owns ------------------------------------------------------------------------------------


def test_every_written_folder_carries_the_marker(finished_run):
    marker = json.loads((finished_run / MARKER).read_text())
    assert marker["tool"] == "tropd" and marker["command"] == "distill" and marker["version"]


@pytest.mark.parametrize("command", ["distill", "prepare", "evaluate", "export"])
def test_overwrite_never_touches_a_foreign_folder(command, random_pair_dir, finished_run, tmp_path, capsys):
    mydocs = tmp_path / "mydocs"
    (mydocs / "photos").mkdir(parents=True)
    (mydocs / "thesis.txt").write_text("years of work")
    (mydocs / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    before = tree(mydocs)
    argv = {
        "distill": distill_argv(random_pair_dir, mydocs),
        "prepare": ["prepare", "-p", "toylab", "--data", "toylab", "--out", str(mydocs), "--set", "train.steps=2"],
        "evaluate": ["evaluate", "-m", "toylab:student", "-b", "toylab", "--limit", "2", "--out", str(mydocs)],
        "export": ["export", str(finished_run), "--out", str(mydocs), "--no-verify"],
    }[command]
    assert cli.main([*argv, "--overwrite"]) == 2
    assert error_line(capsys) == (f"error: --overwrite replaces only a folder tropd wrote (with {MARKER}); "
                                  f"{mydocs} is not one and was left untouched; choose another --out")
    assert tree(mydocs) == before


@pytest.mark.parametrize(("out", "what"), [(".", "the working directory"), ("..", "a parent of the working directory")])
def test_overwrite_never_touches_the_working_directory(out, what, random_pair_dir, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / MARKER).write_text(json.dumps({"tool": "tropd"}))  # even a marked one
    monkeypatch.chdir(work)
    before = tree(tmp_path)
    assert cli.main([*distill_argv(random_pair_dir, Path(out)), "--overwrite"]) == 2
    assert error_line(capsys) == f"error: refusing to write into {out}: it is {what}; choose a new folder for --out"
    assert tree(tmp_path) == before


def test_overwrite_replaces_a_run_only_once_the_new_one_finished(random_pair_dir, finished_run, tmp_path,
                                                                monkeypatch, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    before = tree(run)
    real_step = crash_inside_step(monkeypatch, 3)
    assert cli.main([*distill_argv(random_pair_dir, run, 4), "--overwrite"]) == 130
    err = capsys.readouterr().err
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".run.new-")]
    assert len(partial) == 1 and f"the new run stays in {partial[0]}; {run} still holds the previous run" in err
    assert tree(run) == before  # the previous run, byte for byte
    assert json.loads((partial[0] / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert cli.main([*distill_argv(random_pair_dir, run, 3), "--overwrite"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps_done"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [partial[0].name, "run"]  # no other leftovers


# ---- 2. one writer per folder ---------------------------------------------------------------------------------


def test_a_second_writer_stops_at_once_naming_the_first(random_pair_dir, tmp_path, capsys):
    out = tmp_path / "run"
    first = child(distill_argv(random_pair_dir, out, 10_000), tmp_path,
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1,
                 first, tmp_path)
        for argv in ([*distill_argv(random_pair_dir, out, 2), "--overwrite"], ["distill", "--resume", str(out)]):
            assert cli.main(argv) == 2
            line = error_line(capsys)
            assert line.startswith(f"error: {out} is in use by another tropd process (pid {first.pid} on ")
            assert "`tropd distill` since" in line
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=240) == 130, child_err(tmp_path)
    finally:
        if first.poll() is None:
            first.kill()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == summary["steps_done"]
    verify_checkpoint(out / "checkpoints" / f"step-{summary['steps_done']:06d}")
    assert not (out / LOCK_INFO).exists()


def test_a_lock_left_by_a_dead_process_is_stale(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK_INFO).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "then",
                                             "command": "distill"}))
    held = FileLock(str(run / LOCK), timeout=0)
    held.acquire()  # a live holder that has not written its info yet: the leftover info is called out
    try:
        assert f"the info file names pid {dead.pid}, which is no longer running" in holder(run)
    finally:
        held.release()
    assert cli.main(["distill", "--resume", str(run), "--set", "train.steps=5"]) == 0  # the lock is free
    assert json.loads((run / "summary.json").read_text())["steps_done"] == 5


# ---- 3. every failure one line, and a truthful summary --------------------------------------------------------


def test_sigkill_during_a_checkpoint_keeps_the_previous_one_resumable(random_pair_dir, tmp_path):
    out = tmp_path / "run"
    flag = tmp_path / "writing-step-3"
    prelude = (f"import time, torch, pathlib\nreal = torch.save\n"
               f"def slow(obj, *a, **k):\n"
               f"    if isinstance(obj, dict) and obj.get('step') == 3:\n"
               f"        pathlib.Path({str(flag)!r}).touch(); time.sleep(600)\n"
               f"    return real(obj, *a, **k)\n"
               f"torch.save = slow")
    process = child(distill_argv(random_pair_dir, out, 4, "train.checkpoint_every=1"), tmp_path, prelude)
    try:
        wait_for(flag.exists, process, tmp_path)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert [step for step, _ in RunFolder(out).list_checkpoints()] == [1, 2]
    verify_checkpoint(out / "checkpoints" / "step-000002")
    assert json.loads((out / "summary.json").read_text())["status"] == "running"  # nobody lived to say otherwise
    assert cli.main(["distill", "--resume", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 4 and summary["resumed_from"] == [2]


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_a_file_size_limit_during_a_checkpoint_is_one_line_and_a_failed_summary(random_pair_dir, tmp_path):
    out = tmp_path / "run"
    process = child(distill_argv(random_pair_dir, out, 4), tmp_path, preexec_fn=limit_file_size)
    assert process.wait(timeout=300) == 1
    err = child_err(tmp_path)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write checkpoint {out}/checkpoints/step-000002: ")
    assert "File too large" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps_done"] == 2 and summary["error"] == err.strip()[7:]
    assert not RunFolder(out).list_checkpoints()


def test_a_file_size_limit_during_an_export_is_one_line_and_leaves_nothing(finished_run, tmp_path):
    out = tmp_path / "export"
    process = child(["export", str(finished_run), "--out", str(out), "--no-verify"], tmp_path,
                    preexec_fn=limit_file_size)
    assert process.wait(timeout=300) == 1
    err = child_err(tmp_path)
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: cannot write the export {out}: ") and "too large" in err
    assert list(tmp_path.iterdir()) and not [p for p in tmp_path.iterdir() if "export" in p.name]


def test_an_infinite_learning_rate_is_refused_before_anything_is_written(random_pair_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(distill_argv(random_pair_dir, out, 1, "train.lr=inf")) == 2
    assert error_line(capsys) == "error: invalid value for train.lr: 'inf' (input should be a finite number)"
    assert not out.exists()


def test_non_finite_weights_after_the_first_step_fail_the_run(random_pair_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(distill_argv(random_pair_dir, out, 1, "train.lr=1e300")) == 2
    line = error_line(capsys)
    assert line == ("error: training diverged at step 1: the updated weights are not finite; the run stopped; "
                    "lower train.lr (now 1e+300) and start again")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == line[7:] and "finished" not in json.dumps(summary)
    assert not (out / "student").exists()


def test_a_lora_target_typo_lists_the_modules_there_are(random_pair_dir, tmp_path, capsys):
    argv = distill_argv(random_pair_dir, tmp_path / "run", 1, "student.lora.enabled=true",
                        "student.lora.target_modules=[q_projj]")
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "student.lora.target_modules ['q_projj'] does not fit" in line
    assert line.endswith("its linear modules are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
                         "v_proj (or use all-linear)")


def test_unexpected_failures_are_one_line_unless_debug(monkeypatch, capsys):
    import tropd_cli.config as config_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(config_module, "load_config", broken)
    assert cli.main(["presets", "show", "toylab"]) == 1
    assert error_line(capsys) == "error: RuntimeError: boom (pass --debug or set TROPD_DEBUG=1 for the traceback)"
    assert cli.main(["--debug", "presets", "show", "toylab"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("TROPD_DEBUG", "1")
    assert cli.main(["presets", "show", "toylab"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_evaluate_leaves_no_folder_when_it_fails(tmp_path, monkeypatch, capsys):
    import tropd_cli.evaluation.runner as runner

    def fail(*args, **kwargs):
        raise TropdError("generation failed")

    monkeypatch.setattr(runner, "run_benchmark", fail)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "-m", "toylab:student", "-b", "toylab", "--limit", "2", "--out", str(out)]) == 2
    assert error_line(capsys) == "error: generation failed"
    assert list(tmp_path.iterdir()) == []


# ---- 5. guarded resume ----------------------------------------------------------------------------------------


def test_resume_refuses_a_changed_configuration(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    before = tree(run)
    assert cli.main(["distill", "--resume", str(run), "--set", "train.steps=6", "--set", "train.lr=0.5"]) == 2
    assert error_line(capsys) == (
        f"error: cannot resume {run}: train.lr (0.001 -> 0.5) differ from the run's configuration; --resume may "
        f"change only train.steps, train.checkpoint_every, train.checkpoint_keep, train.threads, train.device, "
        f"output.log_to, output.wandb_project, teacher.url, teacher.api_key_env, teacher.timeout_s, "
        f"teacher.deadline_s, teacher.retries, teacher.max_concurrency; start a new run for the rest")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("student:\n  model:", "student:\n  model: toylab:student\n  old:"))
    config.write_text(config.read_text().replace("\n  old: ", "\n  # was: "))
    assert cli.main(["distill", "--resume", str(run), "--set", "train.steps=6"]) == 2
    assert "student.model (" in error_line(capsys)
    assert {k: v for k, v in tree(run).items() if k != "config.yaml"} == \
        {k: v for k, v in before.items() if k != "config.yaml"}


def test_resume_names_a_damaged_checkpoint_and_resumes_from_an_older_one_on_purpose(finished_run, tmp_path,
                                                                                    capsys):
    run = copy_run(finished_run, tmp_path / "run")
    state = run / "checkpoints" / "step-000004" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-10] + b"0123456789")
    argv = ["distill", "--resume", str(run), "--set", "train.steps=6"]
    assert cli.main(argv) == 2
    assert error_line(capsys) == (f"error: checkpoint {state.parent} is damaged: trainer_state.pt differs from the "
                                  f"sha256 recorded when it was saved; to resume from an older checkpoint on "
                                  f"purpose, pass --from-step 2 (saved: 2)")
    state.unlink()
    assert cli.main(argv) == 2
    assert f"error: checkpoint {state.parent} is damaged: trainer_state.pt is missing;" in error_line(capsys)
    assert cli.main(["export", str(run), "--step", "4", "--out", str(tmp_path / "export"), "--no-verify"]) == 2
    assert "is damaged: trainer_state.pt is missing" in error_line(capsys)
    assert cli.main([*argv, "--from-step", "3"]) == 2
    assert error_line(capsys) == f"error: {run} has no checkpoint at step 3; saved: 2, 4"
    assert cli.main([*argv, "--from-step", "2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 6 and summary["resumed_from"] == [2]
    verify_checkpoint(run / "checkpoints" / "step-000004")  # rewritten as the run passed it


def test_already_ran_gives_the_real_counts(finished_run, capsys):
    assert cli.main(["distill", "--resume", str(finished_run), "--set", "train.steps=2"]) == 2
    assert error_line(capsys) == (f"error: {finished_run} already ran 4 steps and train.steps is 2; to train on, "
                                  f"pass --set train.steps=N with N above 4")


def test_a_run_records_the_sha256_of_its_configuration(finished_run):
    from tropd_cli.checkpoints import config_sha256

    resolved = load_config_file(finished_run / "config.yaml").model_dump(mode="json")
    summary = json.loads((finished_run / "summary.json").read_text())
    state = json.loads((finished_run / "checkpoints" / "step-000004" / "state.json").read_text())
    assert summary["config_sha256"] == state["config_sha256"] == config_sha256(resolved)
    assert set(state["files"]) >= {"trainer_state.pt", "student/model.safetensors"}


# ---- 6. model safety and messages -----------------------------------------------------------------------------


def test_pickle_only_weights_are_refused_with_how_to_convert(random_pair_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((random_pair_dir / "student" / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    for check in (lambda: check_safetensors(str(folder)), lambda: load_causal_lm(str(folder))):
        with pytest.raises(TropdError) as error:
            check()
        message = str(error.value)
        assert "has pickle weights only (pytorch_model.bin); tropd loads safetensors only" in message
        assert "use_safetensors=False).save_pretrained(" in message and "\n" not in message
    check_safetensors(str(random_pair_dir / "student"))


def test_doctor_refuses_pickle_only_weights_as_distill_does(random_pair_dir, tmp_path, capsys):
    folder = tmp_path / "pickled"
    shutil.copytree(random_pair_dir / "student", folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    code = cli.main(["doctor", "--preset", "toylab", "--set", f"teacher.model={random_pair_dir / 'teacher'}",
                     "--set", f"student.model={folder}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "ready to distill" not in err
    assert err.startswith(f"error: student model '{folder}' has pickle weights only (pytorch_model.bin)")
    assert len(err.splitlines()) == 1


def test_custom_code_names_trust_remote_code(random_pair_dir, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    config = json.loads((random_pair_dir / "student" / "config.json").read_text())
    config.update(model_type="mycustom", auto_map={"AutoConfig": "configuration_my.MyConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TropdError, match="needs its repository's own Python code .*pass --trust-remote-code"):
        load_model_config(str(folder))


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_evaluate_and_export_take_trust_remote_code(command):
    import typer

    options = {name for param in typer.main.get_command(cli.app).commands[command].params for name in param.opts}
    assert "--trust-remote-code" in options


def test_malformed_yaml_names_line_and_column(tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text("train:\n  steps: 2\n  lr: [1e-3\n")
    assert cli.main(["presets", "show", str(preset)]) == 2
    assert error_line(capsys).startswith(f"error: {preset}:4:1: not valid YAML (")
