"""Student modes end to end through `tropd distill`: every weight, LoRA adapters, and LoRA on a 4-bit base.

Each mode distills the shipped toy student towards the shipped toy teacher for a few steps with the
full-vocabulary reverse KL (`gkd` with beta 1, always on-policy): a teacher-matching setting whose loss is
exact at the sampled contexts, so the reverse KL on a fixed batch must fall (about 16% in 4 steps in each
mode; the test asks for 8%). The models that `distill` trained are captured by wrapping its loader, to
compare them with what the run folder holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from helpers import STUDENT_MODES, crash_inside_step, set_args
from peft import PeftModel

import tropd_cli.engine.run as run_module
from tropd_cli import cli
from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams
from tropd_cli.engine.scoring import SequenceBatch, build_sequences
from tropd_cli.models import load_causal_lm, load_tokenizer
from tropd_cli.toylab.accuracy import prompt_token_ids
from tropd_cli.toylab.tasks import Difficulty, sample_problems

REVERSE_KL = ["objective.name=gkd", "objective.gkd_beta=1.0", "objective.gkd_lambda=1.0", "train.lr=1e-3",
              "train.warmup_steps=0", "train.steps=4", "eval.problems=0", "rollout.prompts_per_step=4",
              "rollout.n=2", "rollout.max_new_tokens=16"]


@dataclass
class TrainedRun:
    mode: str
    run_dir: Path
    teacher: torch.nn.Module  # as distill loaded it
    student: torch.nn.Module  # as distill trained it


def load_base(mode: str) -> torch.nn.Module:
    """A fresh copy of the student's starting point in this mode (the 4-bit base for qlora)."""
    return load_causal_lm("toylab:student", quantization="4bit" if mode == "qlora" else "none", trainable=False)


def capture_distill(settings: list[str], out: Path) -> tuple[int, list[torch.nn.Module]]:
    """Run `tropd distill` on the toylab preset; also return the models it loaded (teacher, student)."""
    loaded: list[torch.nn.Module] = []
    real = run_module.load_causal_lm

    def spy(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "load_causal_lm", spy)
        code = cli.main(["distill", "-p", "toylab", *set_args(settings), "--out", str(out)])
    return code, loaded


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on two cores shared with other work, two threads spin-wait on each other and these
    tiny models run 40x slower (same numbers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fixed_batch() -> SequenceBatch:
    """Held-out toy prompts with responses sampled once from the starting student."""
    tokenizer = load_tokenizer("toylab:student")
    prompts = [prompt_token_ids(tokenizer, p) for p in sample_problems(7, 8, Difficulty(), held_out=True)]
    rollouts = HFGenerateBackend(load_base("full"), tokenizer.pad_token_id, [tokenizer.eos_token_id]).generate(
        prompts, 1, SamplingParams(16), 0)
    return build_sequences([prompts[i] for i in rollouts.prompt_index], rollouts.response_ids,
                           tokenizer.pad_token_id)


@torch.no_grad()
def response_logprobs(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Full-vocabulary log-probs at every response position: [tokens, vocab]."""
    model.eval()
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[:, :-1][batch.loss_mask.bool()].float().log_softmax(-1)


def reverse_kl(student: torch.nn.Module, teacher: torch.nn.Module, batch: SequenceBatch) -> float:
    """Token-mean KL(pi_S || pi_T) over the batch's response positions."""
    s, t = response_logprobs(student, batch), response_logprobs(teacher, batch)
    return float((s.exp() * (s - t)).sum(-1).mean())


def reload_student(run: TrainedRun) -> torch.nn.Module:
    """The run folder's student: the saved model, or the saved adapter on a fresh base (peft)."""
    folder = run.run_dir / "student"
    if run.mode == "full":
        return load_causal_lm(str(folder), trainable=False)
    return PeftModel.from_pretrained(load_base(run.mode), folder)


@pytest.fixture(scope="module", params=list(STUDENT_MODES))
def trained(request, tmp_path_factory) -> TrainedRun:
    mode = request.param
    out = tmp_path_factory.mktemp(mode) / "run"
    code, (teacher, student) = capture_distill(STUDENT_MODES[mode] + REVERSE_KL, out)
    assert code == 0
    return TrainedRun(mode, out, teacher, student)


def test_distill_reduces_reverse_kl_on_a_fixed_batch(trained, fixed_batch):
    before = reverse_kl(load_base(trained.mode), trained.teacher, fixed_batch)
    after = reverse_kl(reload_student(trained), trained.teacher, fixed_batch)
    assert after < 0.92 * before, (before, after)


def test_run_folder_holds_the_adapter_or_the_full_model(trained):
    folder = trained.run_dir / "student"
    summary = json.loads((trained.run_dir / "summary.json").read_text())
    assert summary["student_base_model"] == "toylab:student"
    assert (folder / "tokenizer.json").is_file()
    if trained.mode == "full":
        assert summary["student_format"] == "full"
        assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    else:
        assert summary["student_format"] == "adapter"
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every non-adapter tensor under its plain transformers name (4-bit weights as their packed bytes)."""
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return {name.replace(".base_layer", ""): tensor.detach().clone() for name, tensor in model.state_dict().items()
            if "lora_" not in name}


def test_lora_changes_only_the_adapters(trained):
    """LoRA modes: base weights bit-identical to a fresh load, adapters trained; full: every layer moved."""
    fresh, after = base_weights(load_base(trained.mode)), base_weights(trained.student)
    assert fresh.keys() == after.keys()
    changed = [name for name in fresh if not torch.equal(fresh[name], after[name])]
    if trained.mode == "full":
        assert len(changed) == len(fresh)
    else:
        assert changed == []
        lora_b = [p for name, p in trained.student.named_parameters() if "lora_B" in name]
        assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B starts at zero
        assert not any(p.requires_grad for name, p in trained.student.named_parameters() if "lora_" not in name)


def test_saved_student_reloads_with_the_trained_logits(trained, fixed_batch):
    torch.testing.assert_close(response_logprobs(reload_student(trained), fixed_batch),
                               response_logprobs(trained.student, fixed_batch), rtol=0, atol=1e-5)


def test_ctrl_c_saves_the_adapter(tmp_path, monkeypatch, capsys):
    crash_inside_step(monkeypatch, 2)
    out = tmp_path / "run"
    code, _ = capture_distill(STUDENT_MODES["qlora"] + REVERSE_KL, out)
    assert code == 130
    assert f"interrupted during step 2; student and metrics saved in {out}" in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["student_format"] == "adapter"
    assert (out / "student" / "adapter_model.safetensors").is_file()
    PeftModel.from_pretrained(load_base("qlora"), out / "student")


@pytest.mark.parametrize(("setting", "message"), [
    ("student.quantization=4bit", "error: invalid value for student.quantization: '4bit' (value error, a 4-bit "
     "student trains through lora adapters (qlora): also set student.lora.enabled=true)"),
    ("student.quantization=8bit", "error: invalid value for student.quantization: '8bit' (input should be 'none' "
     "or '4bit')"),
    ("student.lora.r=0", "error: invalid value for student.lora.r: 0 (input should be greater than or equal to 1)"),
])
def test_invalid_student_mode_is_a_one_line_error(setting, message, capsys):
    assert cli.main(["distill", "-p", "toylab", "--set", setting]) == 2
    assert capsys.readouterr().err.strip() == message


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_teacher_distills_frozen(quantization, tmp_path):
    code, (teacher, _) = capture_distill([f"teacher.quantization={quantization}", *REVERSE_KL, "train.steps=2"],
                                         tmp_path / "run")
    assert code == 0
    layer = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(module, layer) for module in teacher.modules())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
