"""Checkpoints, --resume, metric sinks, autocast, gradient checkpointing and stop tokens."""

import json
import os
import signal
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import crash_inside_step, pair_models, quiet, set_args, student_weights

from tropd_cli import cli
from tropd_cli.checkpoints import load_checkpoint
from tropd_cli.config import load_config
from tropd_cli.distill import distill, resume
from tropd_cli.engine.trainer import Trainer
from tropd_cli.errors import TeacherUnavailable
from tropd_cli.models import stop_token_ids
from tropd_cli.runfolder import RunFolder

TIMINGS = ("rollout_s", "score_s", "update_s", "sync_s", "tokens_per_s")


def tiny(pair: Path, steps: int = 4, *extra: str) -> list[str]:
    return [*pair_models(pair), f"train.steps={steps}", "rollout.prompts_per_step=2", "rollout.n=2",
            "rollout.max_new_tokens=8", "eval.problems=0", "train.checkpoint_every=2", "train.checkpoint_keep=0",
            "train.lr=1e-3", "train.threads=1", *extra]


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


@pytest.fixture(scope="module")
def uninterrupted(random_pair_dir, tmp_path_factory):
    """Four-step runs without interruption, full and LoRA, as the reference."""
    runs = {}
    for mode, extra in (("full", ()), ("lora", ("student.lora.enabled=true", "student.lora.r=4")),
                        ("qlora", ("student.lora.enabled=true", "student.lora.r=4", "student.quantization=4bit"))):
        out = tmp_path_factory.mktemp(mode) / "run"
        distill(load_config("toylab", tiny(random_pair_dir, 4, *extra)), "toylab", out=str(out), console=quiet())
        runs[mode] = (out, extra)
    return runs


def test_checkpoints_are_written_every_n_steps_and_load_weights_only(uninterrupted):
    run, _ = uninterrupted["full"]
    assert [step for step, _ in RunFolder(run).list_checkpoints()] == [2, 4]
    state, trainer_state = load_checkpoint(run / "checkpoints" / "step-000002")
    assert state["step"] == 2 and trainer_state["step"] == 2 and state["summary"]["steps_done"] == 2
    assert set(trainer_state) >= {"optimizer", "scheduler", "random"}
    assert (run / "checkpoints" / "step-000002" / "student" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_interrupted_then_resumed_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch, mode):
    """A crash inside step 4 (after the step-2 checkpoint): resume redoes steps 3-4 exactly."""
    reference, extra = uninterrupted[mode]
    real_step = crash_inside_step(monkeypatch, 4)
    out = tmp_path / "run"
    assert cli.main(["distill", "-p", "toylab", *set_args(_settings(reference) + list(extra)),
                     "--out", str(out)]) == 130
    assert len(records(out)) == 3  # steps 1-3 logged; step 3 is redone after resuming from step 2
    monkeypatch.setattr(Trainer, "train_step", real_step)
    result = resume(out, console=quiet())
    assert result.summary["status"] == "finished" and result.summary["resumed_from"] == [2]
    assert records(out) == records(reference)
    expected, got = student_weights(reference), student_weights(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_teacher_that_goes_away_checkpoints_the_last_step_and_resume_matches(uninterrupted, tmp_path,
                                                                                 monkeypatch, capsys):
    """The served teacher fails for good inside step 4, after that step's rollouts: the run stops in one line
    with a checkpoint of step 3 (taken with the random states step 3 ended with), and a resume, here with
    the teacher back, redoes step 4 exactly."""
    reference, _ = uninterrupted["full"]
    real_accumulate = Trainer._accumulate

    def gone(self, *args, **kwargs):
        if self.step == 3:
            raise TeacherUnavailable("teacher server http://127.0.0.1:9 did not answer /v1/completions after 4 "
                                     "tries (Connection refused)")
        return real_accumulate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_accumulate", gone)
    out = tmp_path / "run"
    assert cli.main(["distill", "-p", "toylab", *set_args(_settings(reference)),
                     "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: teacher server http://127.0.0.1:9 did not answer /v1/completions after 4 tries (Connection "
        f"refused); the run stopped after step 3 with a checkpoint in {out / 'checkpoints' / 'step-000003'}; "
        f"go on with: tropd distill --resume {out} --set teacher.url=URL")
    assert [step for step, _ in RunFolder(out).list_checkpoints()] == [2, 3] and len(records(out)) == 3
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    monkeypatch.setattr(Trainer, "_accumulate", real_accumulate)
    result = resume(out, ["teacher.url=http://127.0.0.1:10"], console=quiet())
    assert result.summary["status"] == "finished" and result.summary["resumed_from"] == [3]
    assert records(out) == records(reference)
    expected, got = student_weights(reference), student_weights(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def _settings(reference: Path) -> list[str]:
    """The reference run's own settings, read back from its config.yaml."""
    config = (reference / "config.yaml").read_text()
    import yaml

    raw = yaml.safe_load(config)
    return [f"teacher.model={raw['teacher']['model']}", f"student.model={raw['student']['model']}",
            *[s for s in tiny(Path("/unused"), 4) if not s.startswith(("teacher.model", "student.model"))]]


def test_first_ctrl_c_finishes_the_step_checkpoints_and_resume_matches(uninterrupted, tmp_path, monkeypatch,
                                                                       capsys):
    reference, _ = uninterrupted["full"]
    real_step = Trainer.train_step

    def ctrl_c_during_third(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: the step runs to its end
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_during_third)
    out = tmp_path / "run"
    assert cli.main(["distill", "-p", "toylab", *set_args(_settings(reference)),
                     "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert (f"stopped after step 3; checkpoint saved in {out / 'checkpoints' / 'step-000003'}; "
            f"continue with: tropd distill --resume {out}") in err
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert cli.main(["distill", "--resume", str(out)]) == 0
    assert records(out) == records(reference)


def test_resume_can_raise_the_step_count(uninterrupted, tmp_path):
    reference, _ = uninterrupted["full"]
    out = tmp_path / "run"
    distill(load_config("toylab", _settings(reference)[:2] + tiny(Path("/x"), 2)[2:]), "toylab", out=str(out),
            console=quiet())
    first = json.loads((out / "env.json").read_text())["processes"]
    # a served teacher restarted elsewhere: its url and client settings may change on resume
    result = resume(out, ["train.steps=3", "teacher.url=http://127.0.0.1:9", "teacher.deadline_s=60"],
                    console=quiet())
    assert result.summary["steps_done"] == 3 and [r["step"] for r in records(out)] == [1, 2, 3]
    assert "steps: 3" in (out / "config.yaml").read_text()
    processes = json.loads((out / "env.json").read_text())["processes"]  # where each part of the run ran
    assert len(first) == 1 and processes[0] == first[0] and len(processes) == 2
    assert processes[1]["packages"]["torch"] == torch.__version__ and processes[1]["device"] == "cpu"


def test_resume_errors(uninterrupted, tmp_path, capsys):
    reference, _ = uninterrupted["full"]
    assert cli.main(["distill", "--resume", str(tmp_path)]) == 2
    assert f"error: {tmp_path} is not a run folder (no config.yaml)" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text((reference / "config.yaml").read_text())
    assert cli.main(["distill", "--resume", str(tmp_path)]) == 2
    assert (f"error: {tmp_path} has no checkpoint to resume from (nothing in {tmp_path / 'checkpoints'})"
            in capsys.readouterr().err)
    assert cli.main(["distill", "--resume", str(reference)]) == 2
    assert (f"error: {reference} already ran 4 steps and train.steps is 4; to train on, pass --set "
            f"train.steps=N with N above 4" in capsys.readouterr().err)
    assert cli.main(["distill", "--resume", str(reference), "--preset", "toylab"]) == 2
    assert "error: --resume continues a run with its own config.yaml and folder" in capsys.readouterr().err


def test_checkpoint_keep_prunes_old_checkpoints(random_pair_dir, tmp_path):
    settings = tiny(random_pair_dir, 4) + ["train.checkpoint_every=1", "train.checkpoint_keep=2"]
    distill(load_config("toylab", settings), "toylab", out=str(tmp_path / "run"), console=quiet())
    assert [step for step, _ in RunFolder(tmp_path / "run").list_checkpoints()] == [3, 4]


def test_tensorboard_gets_the_same_metric_names(random_pair_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    distill(load_config("toylab", tiny(random_pair_dir, 2, "output.log_to=[tensorboard]")), "toylab",
            out=str(out), console=quiet())
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = records(out)
    assert set(events.Tags()["scalars"]) == set(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])) \
        - {"step"}
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged]


def test_wandb_sink_logs_every_record_and_resumes_its_run(random_pair_dir, tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        id = "run-123"

        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs["project"], kwargs["id"], kwargs["resume"]))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    out = tmp_path / "run"
    settings = tiny(random_pair_dir, 2, "output.log_to=[wandb]", "output.wandb_project=toy")
    distill(load_config("toylab", settings), "toylab", out=str(out), console=quiet())
    assert calls[0] == ("init", "toy", None, None) and calls[-1] == ("finish",)
    logged = [call for call in calls if call[0] == "log"]
    assert [(step, values["loss"]) for _, step, values in logged] == [(r["step"], r["loss"]) for r in records(out)]
    assert json.loads((out / "summary.json").read_text())["wandb_run_id"] == "run-123"
    calls.clear()
    resume(out, ["train.steps=3"], console=quiet())
    assert calls[0] == ("init", "toy", "run-123", "allow")


def test_missing_sink_package_is_one_line(random_pair_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    argv = ["distill", "-p", "toylab", *[a for s in tiny(random_pair_dir, 2, "output.log_to=[wandb]")
                                         for a in ("--set", s)], "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "error: output.log_to has wandb, but it is not installed; pip install wandb" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_update(random_pair_dir, tmp_path, monkeypatch):
    import tropd_cli.engine.run as run_module

    runs, layer_calls = [], []
    real_load = run_module.load_models

    def counting_load(*args):
        teacher, student = real_load(*args)
        calls = [0]
        student.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        layer_calls.append(calls)
        return teacher, student

    monkeypatch.setattr(run_module, "load_models", counting_load)
    for flag in ("false", "true"):
        out = tmp_path / flag
        distill(load_config("toylab", tiny(random_pair_dir, 2, f"train.gradient_checkpointing={flag}")),
                "toylab", out=str(out), console=quiet())
        runs.append(out)
    # generation and no-grad passes are alike; the checkpointed run reruns each training forward in backward
    assert layer_calls[1][0] > layer_calls[0][0]
    plain, checkpointed = records(runs[0]), records(runs[1])
    for a, b in zip(plain, checkpointed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_bfloat16_autocast_runs_and_stays_close(random_pair_dir, tmp_path):
    runs = []
    for setting in ("none", "bfloat16"):
        out = tmp_path / setting
        distill(load_config("toylab", tiny(random_pair_dir, 1, f"train.autocast={setting}")), "toylab",
                out=str(out), console=quiet())
        runs.append(records(out)[0])
    assert runs[1]["loss"] != runs[0]["loss"]  # the forward really ran in bfloat16
    assert runs[1]["loss"] == pytest.approx(runs[0]["loss"], abs=0.05)


def test_stop_tokens_include_the_generation_config_eos_ids(random_pair_dir, tmp_path, toy_tokenizer):
    import shutil

    from transformers import GenerationConfig

    folder = tmp_path / "student"
    shutil.copytree(random_pair_dir / "student", folder)
    assert stop_token_ids(str(folder), toy_tokenizer) == [toy_tokenizer.eos_token_id]
    end_of_turn = toy_tokenizer.convert_tokens_to_ids("<|im_start|>")
    GenerationConfig(eos_token_id=[toy_tokenizer.eos_token_id, end_of_turn]).save_pretrained(folder)
    assert stop_token_ids(str(folder), toy_tokenizer) == [toy_tokenizer.eos_token_id, end_of_turn]


def test_trust_remote_code_is_off_unless_asked(random_pair_dir, tmp_path, capsys):
    assert load_config("toylab").student.trust_remote_code is False
    argv = ["distill", "-p", "toylab", *set_args(tiny(random_pair_dir, 1)),
            "--trust-remote-code", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"trust_remote_code is on: {random_pair_dir / 'student'} runs its own Python code" in out
    assert "trust_remote_code: true" in (tmp_path / "run" / "config.yaml").read_text()


def test_resume_with_guidance_keeps_the_teacher_responses(random_pair_dir, tmp_path, monkeypatch):
    """The in-run teacher-response cache travels in the checkpoint: a resumed guided run is the same run."""
    settings = tiny(random_pair_dir, 4, "objective.guidance=true")
    reference = tmp_path / "reference"
    distill(load_config("toylab", settings), "toylab", out=str(reference), console=quiet())
    real_step = crash_inside_step(monkeypatch, 4)
    out = tmp_path / "run"
    assert cli.main(["distill", "-p", "toylab", *set_args(settings),
                     "--out", str(out)]) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resume(out, console=quiet())
    assert records(out) == records(reference)
    assert [r["prefix_length"] for r in records(out)][0] > 0
