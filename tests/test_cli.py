"""The command line end to end: help, presets, a short distill, and one-line errors with exit code 2."""

import json
import os
from pathlib import Path

import pytest
from helpers import crash_inside_step, pair_models, set_args

from tropd_cli import cli
from tropd_cli.errors import TropdError


def pair_overrides(pair: Path, steps: int = 2) -> list[str]:
    return set_args([*pair_models(pair), f"train.steps={steps}", "rollout.prompts_per_step=2", "rollout.n=2",
                     "rollout.max_new_tokens=8", "eval.problems=4"])


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"], ["presets", "--help"],
                                  ["presets", "show", "--help"], ["toylab", "build", "--help"],
                                  ["probe", "--help"]])
def test_help_pages(argv, capsys):
    assert cli.main(argv) == 0
    assert "Usage" in capsys.readouterr().out


def test_presets_list_and_show(capsys):
    assert cli.main(["presets", "list"]) == 0
    out = capsys.readouterr().out
    assert "toylab" in out and "toylab:teacher" in out and "tropd" in out
    assert cli.main(["presets", "show", "toylab", "--set", "rollout.n=7"]) == 0
    assert "  n: 7\n" in capsys.readouterr().out


def test_distill_writes_a_run_folder(random_pair_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["distill", "--preset", "toylab", *pair_overrides(random_pair_dir), "--out", str(out)])
    assert code == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    for key in ("loss", "trust_fraction", "reward_trusted", "kl_k1", "grad_norm", "response_length",
                "truncation_rate", "rollout_s", "score_s", "update_s", "sync_s"):
        assert key in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_done"] == 2
    assert {"teacher_accuracy", "student_accuracy_before", "student_accuracy_after"} <= set(summary)
    assert (out / "student" / "model.safetensors").is_file()
    assert (out / "student" / "tokenizer.json").is_file()
    assert "steps: 2" in (out / "config.yaml").read_text()
    assert "held-out accuracy" in capsys.readouterr().out


def test_existing_run_folder_needs_overwrite(random_pair_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["distill", "-p", "toylab", *pair_overrides(random_pair_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output folder {out} is not empty; choose another --out or pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(("argv", "message"), [
    (["distill", "--preset", "nope"], "error: unknown preset 'nope'; known presets:"),
    (["distill", "-p", "toylab", "--set", "train.stepz=3"], "error: unknown config key 'train.stepz'"),
    (["distill", "-p", "toylab", "--set", "train.steps=many"], "error: invalid value for train.steps: 'many'"),
    (["presets", "show", "nope"], "error: unknown preset 'nope'"),
    (["distill"], "error: distill needs --preset (see `tropd presets list`) or --resume RUN_DIR"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_unwritable_output_folder(random_pair_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        target = Path("/proc/tropd-run")  # not even root may create folders in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    assert cli.main(["distill", "-p", "toylab", *pair_overrides(random_pair_dir), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write to output folder {target}" in err and "Traceback" not in err


def test_output_path_under_a_file_is_rejected(random_pair_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["distill", "-p", "toylab", *pair_overrides(random_pair_dir),
                     "--out", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot write to output folder {blocker / 'run'}" in err and "Traceback" not in err


def test_ctrl_c_saves_the_student_and_metrics(random_pair_dir, tmp_path, monkeypatch, capsys):
    crash_inside_step(monkeypatch, 3)
    out = tmp_path / "run"
    code = cli.main(["distill", "-p", "toylab", *pair_overrides(random_pair_dir, steps=5), "--out", str(out)])
    assert code == 130
    assert (f"interrupted during step 3; student and metrics saved in {out}; no checkpoint was written yet"
            in capsys.readouterr().err)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert (out / "student" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".tropd.json", ".tropd.lock"]


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "tropd_cli", "--version"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("tropd ")


def test_sigint_during_distill_saves_and_exits_130(random_pair_dir, tmp_path):
    """A real Ctrl-C (SIGINT to the process) mid-run: exit 130, student and metrics saved."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    log = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(  # output to files: a full pipe would block the child
        [sys.executable, "-m", "tropd_cli", "distill", "-p", "toylab",
         *pair_overrides(random_pair_dir, steps=10_000), "--set", "eval.problems=0", "--out", str(out)],
        stdout=log[0], stderr=log[1], text=True,
        # a shell that starts pytest in the background makes SIGINT ignored, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None and not (
                metrics.is_file() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.2)
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=240)
    finally:
        if process.poll() is None:  # never leave a 10,000-step run behind
            process.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 130, err
    assert f"continue with: tropd distill --resume {out}" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert (out / "checkpoints" / f"step-{summary['steps_done']:06d}" / "trainer_state.pt").is_file()
    assert (out / "student" / "model.safetensors").is_file()
    lines = metrics.read_text().splitlines()
    assert len(lines) >= 2 and all(json.loads(line)["step"] for line in lines)


def test_doctor_help_and_bad_preset(capsys):
    assert cli.main(["doctor", "--help"]) == 0
    assert "Usage" in capsys.readouterr().out
    assert cli.main(["doctor", "--preset", "nope"]) == 2
    assert "error: unknown preset 'nope'" in capsys.readouterr().err


def test_full_disk_is_one_line(random_pair_dir, tmp_path, monkeypatch, capsys):
    import errno

    import tropd_cli.distill as distill_module

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(distill_module, "save_checkpoint", no_space)
    code = cli.main(["distill", "-p", "toylab", *pair_overrides(random_pair_dir), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err == f"error: No space left on device: {tmp_path / 'run' / 'checkpoints'}\n"


COMMANDS = [["prepare"], ["distill"], ["doctor"], ["evaluate"], ["export"], ["presets", "list"],
            ["presets", "show"], ["toylab", "build"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_teaches_itself_with_examples(command, capsys):
    assert cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    examples = out.split("Examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert examples and examples[0].strip().startswith(f"tropd {' '.join(command)}")
    assert all(line.strip().startswith("tropd ") for line in examples)
    assert "<bool>" not in out and "{" not in out.splitlines()[0]


def test_flags_are_flags_and_export_names_its_argument(capsys):
    assert cli.main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: tropd export [OPTIONS] RUN_OR_CHECKPOINT")
    assert "--overwrite  " in out and "--no-overwrite" not in out and "--base" in out and "--no-eval" in out
    assert cli.main(["prepare", "--help"]) == 0
    assert "  --dry-run  " in capsys.readouterr().out


def test_shell_completion_is_offered(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--install-completion" in out and "--show-completion" in out


def test_presets_list_never_cuts_a_name_at_80_columns(monkeypatch, capsys):
    from rich.console import Console

    from tropd_cli.config import preset_names

    monkeypatch.setattr(cli, "console", Console(width=80))
    assert cli.main(["presets", "list"]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 80 and "…" not in out
    for name in preset_names():
        assert f"│ {name} " in out


def test_presets_show_explain_names_each_fields_description_and_origin(capsys):
    assert cli.main(["presets", "show", "toylab", "--explain", "--set", "train.lr_schedule=cosine"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def comment_above(key: str) -> str:
        return lines[lines.index(key) - 1]

    assert comment_above("  lr_schedule: cosine").endswith("[--set]")
    assert comment_above("  steps: 100") == ("  # Rollout batches (each gets updates_per_batch optimizer steps). "
                                             "[preset]")
    assert comment_above("  weight_decay: 0.0").endswith("[preset]")
    assert comment_above("  micro_batch_size: 64").endswith("[default]")
    assert comment_above("train:").startswith("#")
    import yaml

    assert yaml.safe_load("\n".join(lines))["train"]["lr_schedule"] == "cosine"  # still YAML


def test_set_errors_are_one_line(capsys):
    assert cli.main(["presets", "show", "toylab", "--set", "train.steps=true"]) == 2
    assert capsys.readouterr().err.strip() == "error: invalid value for train.steps: true (expects a number, not a " \
                                              "boolean)"


def test_error_lines_keep_their_brackets(capsys, monkeypatch):
    """Rich markup must not eat a message's brackets (`pip install 'tropd[vllm]'`, `[default]`)."""
    from tropd_cli import config as config_module

    def refuse(*args, **kwargs):
        raise TropdError("needs vLLM: pip install 'tropd[vllm]' [/] [red]")

    monkeypatch.setattr(config_module, "load_config", refuse)
    assert cli.main(["doctor", "--preset", "toylab"]) == 2
    assert capsys.readouterr().err.strip() == "error: needs vLLM: pip install 'tropd[vllm]' [/] [red]"


def test_distill_nproc_hands_each_rank_the_same_command_without_nproc(monkeypatch):
    """`--nproc N` starts torchrun's launcher with the distill command line each rank runs."""
    from tropd_cli.engine import distributed

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda nproc, args: launched.append((nproc, args)) or 0)
    assert cli.main(["distill", "-p", "toylab", "--set", "train.steps=3", "--out", "runs/x", "--nproc", "2",
                     "--device", "cpu", "--overwrite"]) == 0
    assert launched == [(2, ["distill", "--preset", "toylab", "--out", "runs/x", "--device", "cpu", "--set",
                             "train.steps=3", "--overwrite"])]
    monkeypatch.setattr(distributed, "launch", lambda nproc, args: 130)
    assert cli.main(["distill", "--resume", "runs/x", "--nproc", "2"]) == 130
