"""`tropd export`: merged and adapter exports of full, LoRA and 4-bit LoRA runs, reloaded with plain
transformers / peft and compared with the run's model; the card's provenance; one-line errors that leave
nothing behind.

Three tiny runs (2 steps, checkpoints at steps 1 and 2, a high learning rate so that the adapters move) are
distilled once per session; each export is made once and shared by the tests that read it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import yaml
from helpers import STUDENT_MODES, quiet
from peft import PeftModel
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tropd_cli.export.write as export_write
from tropd_cli import cli
from tropd_cli.config import load_config
from tropd_cli.distill import distill
from tropd_cli.export import ExportResult, export, tolerance
from tropd_cli.models import load_causal_lm, load_tokenizer, resolve_model_path
from tropd_cli.toylab.accuracy import prompt_token_ids
from tropd_cli.toylab.tasks import Difficulty, sample_problems

TINY_RUN = ["train.steps=2", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8",
            "eval.problems=4", "train.threads=1", "train.lr=1e-2", "train.warmup_steps=0",
            "train.checkpoint_every=1", "train.checkpoint_keep=0"]
BASE = Path(resolve_model_path("toylab:student"))


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One finished run folder per student mode."""
    root = tmp_path_factory.mktemp("runs")
    for mode, settings in STUDENT_MODES.items():
        distill(load_config("toylab", TINY_RUN + settings), "toylab", out=str(root / mode), console=quiet())
    return {mode: root / mode for mode in STUDENT_MODES}


@pytest.fixture(scope="session")
def exports(runs, tmp_path_factory):
    """`exports(mode, format, dtype)`: the export of a run, made once per session."""
    root = tmp_path_factory.mktemp("exports")
    made: dict[tuple[str, str, str], ExportResult] = {}

    def get(mode: str, format_: str, dtype: str) -> ExportResult:
        key = (mode, format_, dtype)
        if key not in made:
            made[key] = export(runs[mode], root / "-".join(key), format_=format_, dtype=dtype, console=quiet())
        return made[key]

    return get


@pytest.fixture(scope="session")
def probes() -> list[list[int]]:
    """Held-out toy prompts (not the ones export verifies on)."""
    tokenizer = load_tokenizer("toylab:student")
    return [prompt_token_ids(tokenizer, problem) for problem in sample_problems(99, 2, Difficulty(), held_out=True)]


def run_model(run: Path) -> torch.nn.Module:
    """The run's student in float32, loaded independently of export.py: full weights, or base + adapter."""
    if (run / "student" / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(load_causal_lm("toylab:student", trainable=False), run / "student").eval()
    return load_causal_lm(str(run / "student"), trainable=False)


def plain_load(folder: Path) -> torch.nn.Module:
    """The export as a user loads it: transformers, or peft for an adapter folder (whose base, toylab:student,
    names tropd's shipped toy model: the one step only tropd can do)."""
    if (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == "toylab:student"
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=torch.float32)
        return PeftModel.from_pretrained(model, folder).eval()
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@torch.no_grad()
def greedy_and_logits(model: torch.nn.Module, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy continuations (16 tokens at most) and float32 logits over prompt + continuation."""
    sequences = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                             do_sample=False, eos_token_id=1, pad_token_id=0)
        sequences.append(out[0].tolist())
    return sequences, logits_on(model, sequences)


@torch.no_grad()
def logits_on(model: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([sequence])).logits[0].float() for sequence in sequences]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


CASES = [("full", "merged"), ("lora", "merged"), ("lora", "adapter"), ("qlora", "merged"), ("qlora", "adapter")]


@pytest.mark.parametrize(("mode", "format_"), CASES)
def test_fp32_export_reloads_with_the_runs_logits_and_greedy_text(mode, format_, runs, exports, probes):
    result = exports(mode, format_, "fp32")
    folder = result.out
    if format_ == "adapter":
        assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    else:
        assert (folder / "model.safetensors").is_file() and not (folder / "adapter_config.json").exists()
    reference_text, reference = greedy_and_logits(run_model(runs[mode]), probes)
    exported_text, exported = greedy_and_logits(plain_load(folder), probes)
    assert max_diff(exported, reference) <= 1e-4
    assert exported_text == reference_text
    check = result.verification
    assert check.greedy_identical and check.max_abs_diff <= check.tolerance == 1e-4
    assert check.prompts == 3
    assert (check.merge_diff is not None) == (mode != "full" and format_ == "merged")
    assert (check.other_base_diff is not None) == (mode == "qlora")


def test_trained_adapters_change_the_model(runs, probes):
    """The fixtures' adapters are not the identity, so that matching logits above means something."""
    base = load_causal_lm("toylab:student", trainable=False)
    for mode in ("lora", "qlora"):
        sequences, trained = greedy_and_logits(run_model(runs[mode]), probes)
        assert max_diff(trained, logits_on(base, sequences)) > 0.05


@pytest.mark.parametrize(("mode", "format_", "dtype", "torch_dtype"), [
    ("full", "merged", "fp16", torch.float16), ("qlora", "merged", "bf16", torch.bfloat16),
    ("lora", "adapter", "bf16", torch.bfloat16),
])
def test_low_precision_export_stores_its_dtype_and_stays_within_tolerance(mode, format_, dtype, torch_dtype,
                                                                          exports):
    result = exports(mode, format_, dtype)
    weights = load_file(result.out / ("adapter_model.safetensors" if format_ == "adapter" else "model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch_dtype}
    check = result.verification
    assert 0 < check.max_abs_diff <= check.tolerance
    if format_ == "merged":
        assert AutoModelForCausalLM.from_pretrained(result.out).dtype == torch_dtype


def test_tolerances():
    assert tolerance("fp32", 50.0) == 1e-4
    assert tolerance("bf16", 20.0) == 32 * 2 ** -8 * 20.0 == 2.5
    assert tolerance("fp16", 20.0) == 32 * 2 ** -11 * 20.0
    assert tolerance("bf16", 0.5) == 32 * 2 ** -8  # logits below 1 in size: bounded as if 1


def lora_pairs(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Plain weight name -> (A, B) from a saved peft adapter."""
    pairs = {}
    for name, lora_a in adapter.items():
        if ".lora_A." in name:
            plain = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            pairs[plain] = (lora_a, adapter[name.replace(".lora_A.", ".lora_B.")])
    return pairs


def test_4bit_run_merges_into_the_full_precision_base(runs, exports):
    """Merged weights = fp32 base + (alpha / r) B @ A, far from the same update on the dequantised nf4 base."""
    merged = load_file(exports("qlora", "merged", "fp32").out / "model.safetensors")
    base = load_file(BASE / "model.safetensors")
    adapter_folder = runs["qlora"] / "student"
    settings = json.loads((adapter_folder / "adapter_config.json").read_text())
    scale = settings["lora_alpha"] / settings["r"]
    pairs = lora_pairs(load_file(adapter_folder / "adapter_model.safetensors"))
    assert len(pairs) == 14 and scale == 2.0
    assert set(merged) == set(base)
    for name, tensor in base.items():
        if name in pairs:
            lora_a, lora_b = pairs[name]
            delta = scale * lora_b.float() @ lora_a.float()
            assert delta.abs().max() > 1e-3  # the adapter trained
            torch.testing.assert_close(merged[name], tensor + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[name], tensor)
    quantized = load_causal_lm("toylab:student", quantization="4bit", trainable=False)
    layer = quantized.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(layer, bnb.nn.Linear4bit)
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    name = "model.layers.0.mlp.down_proj.weight"
    lora_a, lora_b = pairs[name]
    on_quantized = dequantized + scale * lora_b.float() @ lora_a.float()
    assert (merged[name] - on_quantized).abs().max() > 100 * (merged[name] - (base[name] + scale * lora_b @ lora_a)
                                                              ).abs().max()


def test_exported_tokenizer_and_generation_config(runs, exports):
    folder = exports("lora", "merged", "fp32").out
    assert (folder / "chat_template.jinja").is_file()
    messages = [{"role": "user", "content": "compute 1+2"}]
    ours = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True)
    theirs = AutoTokenizer.from_pretrained(runs["lora"] / "student").apply_chat_template(
        messages, add_generation_prompt=True)
    assert ours == theirs
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 1 and generation["pad_token_id"] == 0


def card_rows(folder: Path) -> dict[str, str]:
    return {line.split(" | ")[0][2:]: line.split(" | ", 1)[1][:-2] for line in
            (folder / "README.md").read_text().splitlines() if line.startswith("| ") and " | " in line[2:]}


def test_card_records_the_provenance(runs, exports):
    folder = exports("qlora", "merged", "fp32").out
    summary = json.loads((runs["qlora"] / "summary.json").read_text())
    rows = card_rows(folder)
    assert rows["teacher"] == "`toylab:teacher`"
    assert rows["student base"] == "`toylab:student`"
    assert rows["training"] == "LoRA r=16 alpha=32 on all-linear over a 4-bit (nf4) base (QLoRA)"
    assert rows["objective"] == "`tropd` (trust=bernoulli, outlier=fkl, top_k=64, clip_lambda=0.2, guidance=False)"
    assert rows["steps"] == "2 of 2 (run finished)"
    assert rows["seed"] == "0"
    assert rows["data"] == "`toylab`"
    record = json.loads((folder / "tropd_export.json").read_text())
    measured = record["eval"]
    assert rows["held-out accuracy (4 problems)"] == (
        f"teacher {100 * summary['teacher_accuracy']:.1f}%, student before "
        f"{100 * summary['student_accuracy_before']:.1f}%, this model (measured on it at export) "
        f"{100 * measured['export_accuracy']:.1f}%, the 4-bit base + the adapter (the model the run trained) "
        f"{100 * measured['other_base_accuracy']:.1f}%")
    # The run measured the 4-bit model it trained; the card's "other base" is that model, measured again here.
    assert measured["other_base_accuracy"] == summary["student_accuracy_after"] == measured["run_accuracy"]
    assert rows["export"] == "merged, fp32, tropd 0.1.0, merged into the full-precision base"
    assert rows["verification"].startswith("max absolute logit difference ")
    assert "from the full-precision base + the adapter over" in rows["verification"]
    assert rows["the other base"].startswith("the 4-bit base + the adapter (the model the run trained): max ")
    text = (folder / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: transformers\ntags:\n- tropd\n")
    assert "merged here into the full-precision base (`tropd export --base full`): a different model" in text
    assert record["objective_config"]["name"] == "tropd" and record["steps"] == 2
    assert record["verification"]["greedy_identical"] is True
    assert (folder / "tropd_config.yaml").read_text() == (runs["qlora"] / "config.yaml").read_text()
    assert "library_name: peft" in (exports("qlora", "adapter", "fp32").out / "README.md").read_text()


def copy_run_with_prompts(run: Path, destination: Path, prompts: str) -> Path:
    """A copy of a run whose config.yaml names another data.prompts."""
    shutil.copytree(run, destination)
    config_path = destination / "config.yaml"
    header, _, body = config_path.read_text().partition("\n")
    raw = yaml.safe_load(body)
    raw["data"]["prompts"] = prompts
    config_path.write_text(header + "\n" + yaml.safe_dump(raw, sort_keys=False))
    return destination


def test_card_records_the_data_manifest_fingerprint(runs, tmp_path):
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"fingerprint": "5e1f00d", "counts": {}}))
    run = copy_run_with_prompts(runs["full"], tmp_path / "run", str(data))
    export(run, tmp_path / "out", verify=False, console=quiet())
    assert card_rows(tmp_path / "out")["data"] == f"`{data}`, manifest fingerprint `5e1f00d`"
    shutil.rmtree(data)  # the dataset moved away: the run still exports, the card keeps the path
    export(run, tmp_path / "out2", verify=False, console=quiet())
    assert card_rows(tmp_path / "out2")["data"] == f"`{data}`"
    assert json.loads((tmp_path / "out2" / "tropd_export.json").read_text())["data_fingerprint"] is None


def test_step_exports_a_checkpoint_by_number_or_folder(runs, tmp_path, capsys):
    run = runs["lora"]
    assert cli.main(["export", str(run), "--step", "1", "--out", str(tmp_path / "by-step")]) == 0
    out = capsys.readouterr().out
    assert "greedy text identical │ yes" in out and f"exported to {tmp_path / 'by-step'}" in out
    checkpoint = run / "checkpoints" / "step-000001"
    assert cli.main(["export", str(checkpoint), "--format", "adapter", "--out", str(tmp_path / "by-folder")]) == 0
    saved = load_file(checkpoint / "student" / "adapter_model.safetensors")
    exported = load_file(tmp_path / "by-folder" / "adapter_model.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    assert not all(torch.equal(saved[k], load_file(run / "student" / "adapter_model.safetensors")[k])
                   for k in saved)  # step 1 is not the final student
    for folder in ("by-step", "by-folder"):
        assert card_rows(tmp_path / folder)["steps"] == "checkpoint at step 1 of 2"
    merged = load_file(tmp_path / "by-step" / "model.safetensors")
    reference = PeftModel.from_pretrained(load_causal_lm("toylab:student", trainable=False),
                                          checkpoint / "student").merge_and_unload().state_dict()
    torch.testing.assert_close(merged["model.layers.1.self_attn.q_proj.weight"],
                               reference["model.layers.1.self_attn.q_proj.weight"], rtol=0, atol=0)


def test_sharded_export_reloads(runs, tmp_path, probes):
    out = tmp_path / "sharded"
    export(runs["full"], out, max_shard_size="200KB", console=quiet())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / shard).is_file() for shard in shards)
    assert not (out / "model.safetensors").exists()
    _, reference = greedy_and_logits(run_model(runs["full"]), probes)
    _, exported = greedy_and_logits(plain_load(out), probes)
    assert max_diff(exported, reference) <= 1e-4


def test_no_verify_skips_the_comparison(runs, tmp_path, capsys):
    out = tmp_path / "unchecked"
    assert cli.main(["export", str(runs["lora"]), "--out", str(out), "--no-verify", "--dtype", "bf16"]) == 0
    assert "verification │ skipped (--no-verify)" in capsys.readouterr().out
    assert json.loads((out / "tropd_export.json").read_text())["verification"] is None
    assert "verification" not in card_rows(out)


def test_overwrite_replaces_a_non_empty_target(runs, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["export", str(runs["full"]), "--out", str(out), "--no-verify"]) == 0
    (out / "old.txt").write_text("old")
    assert cli.main(["export", str(runs["full"]), "--out", str(out), "--overwrite", "--no-verify"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_export_is_readable_as_the_umask_allows(runs, tmp_path):
    previous = os.umask(0o022)
    try:
        export(runs["full"], tmp_path / "out", verify=False, console=quiet())
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert {path.stat().st_mode & 0o777 for path in (tmp_path / "out").iterdir()} == {0o644}


def leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir())


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda runs, tmp: [str(tmp)], "error: '{tmp}' is not a tropd run folder (no config.yaml) or checkpoint folder "
     "(RUN/checkpoints/step-NNNNNN with student/)"),
    (lambda runs, tmp: [str(tmp / "nope")], "error: '{tmp}/nope' does not exist"),
    (lambda runs, tmp: [str(runs["lora"]), "--step", "7"],
     "error: run folder '{lora}' has no checkpoint at step 7; saved checkpoints: 1, 2"),
    (lambda runs, tmp: [str(runs["lora"] / "checkpoints" / "step-000001"), "--step", "2"],
     "error: --step 2 disagrees with checkpoint folder '{lora}/checkpoints/step-000001' (step 1)"),
    (lambda runs, tmp: [str(runs["full"]), "--format", "adapter"],
     "error: --format adapter needs a LoRA run; '{full}' trained every weight (export it with --format merged)"),
    (lambda runs, tmp: [str(runs["full"]), "--format", "gguf"],
     "error: --format must be merged or adapter, got 'gguf'"),
    (lambda runs, tmp: [str(runs["full"]), "--dtype", "int8"], "error: --dtype must be bf16, fp16 or fp32, got 'int8'"),
    (lambda runs, tmp: [str(runs["full"]), "--max-shard-size", "lots"],
     "error: --max-shard-size must be a size such as 5GB or 500MB, got 'lots'"),
])
def test_bad_input_is_one_line_and_writes_nothing(make_args, message, runs, tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    out = tmp_path / "exported"
    args = make_args(runs, source)
    assert cli.main(["export", *args, "--out", str(out)]) == 2
    expected = message.format(tmp=source, lora=runs["lora"], full=runs["full"])
    assert capsys.readouterr().err.strip() == expected
    assert leftovers(tmp_path) == ["src"]


def test_existing_target_needs_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["export", str(runs["full"]), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: output folder {out} is not empty; choose another --out or "
                                               f"pass --overwrite")
    assert leftovers(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "x"
    assert leftovers(tmp_path) == ["out"]


def test_target_may_not_replace_the_run(runs, capsys):
    run = runs["full"]
    before = leftovers(run)
    assert cli.main(["export", str(run), "--out", str(run), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out {run} would replace the run folder it exports from; "
                                               f"choose another --out")
    assert leftovers(run) == before


def nudge_one_weight(real):
    """A broken save: scales one projection by 1.01 before writing."""
    def broken(model, *args, **kwargs):
        model.get_submodule("model.layers.0.mlp.down_proj").weight.data.mul_(1.01)
        return real(model, *args, **kwargs)
    return broken


def skip_the_merge(model):
    """A broken merge: drops the adapter instead of folding it in."""
    return model.unload()


@pytest.mark.parametrize("sabotage", ["weights", "merge"])
def test_failed_verification_is_loud_and_writes_nothing(sabotage, runs, tmp_path, monkeypatch, capsys):
    if sabotage == "weights":
        monkeypatch.setattr(export_write, "save_merged", nudge_one_weight(export_write.save_merged))
        expected = "error: verification failed: the exported fp32 logits differ from the run's model by "
    else:
        monkeypatch.setattr(LoraModel, "merge_and_unload", skip_the_merge)
        expected = "error: verification failed: merging the adapter moved the float32 logits by "
    out = tmp_path / "out"
    assert cli.main(["export", str(runs["lora"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and "\n" not in err and "nothing was written" in err
    assert leftovers(tmp_path) == []


def test_run_without_a_final_student_points_at_its_checkpoints(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["lora"], run)
    shutil.rmtree(run / "student")
    assert cli.main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: run folder '{run}' holds no student/ (the run saved no "
                                               f"model); saved checkpoints: 1, 2")
    assert leftovers(tmp_path) == ["run"]


def test_help_names_every_option(capsys):
    assert cli.main(["export", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--out", "--format", "--dtype", "--step", "--no-verify", "--max-shard-size", "--overwrite"):
        assert option in out


def counted_loads(monkeypatch) -> list[str]:
    """The quantization ("none" or "4bit") of every model export loads from now on, in order."""
    loads = []
    real = export_write.load_causal_lm

    def counting(spec, *args, **kwargs):
        loads.append(kwargs.get("quantization", "none"))
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(export_write, "load_causal_lm", counting)
    return loads


def test_quantized_base_merges_into_the_dequantized_4bit_weights(runs, tmp_path, probes, monkeypatch):
    """--base quantized: merged = dequantised nf4 base + (alpha / r) B @ A, and it reproduces the 4-bit model
    the run trained (logits and greedy text), which the full-precision merge does not."""
    loads = counted_loads(monkeypatch)
    result = export(runs["qlora"], tmp_path / "q", base="quantized", console=quiet())
    # the 4-bit reference, the full base beside it, and the dequantized merge made from those two
    assert loads == ["4bit", "none"]
    merged = load_file(result.out / "model.safetensors")
    quantized = load_causal_lm("toylab:student", quantization="4bit", trainable=False)
    pairs = lora_pairs(load_file(runs["qlora"] / "student" / "adapter_model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    layer = quantized.get_submodule(name.removesuffix(".weight"))
    dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    lora_a, lora_b = pairs[name]
    torch.testing.assert_close(merged[name], dequantized + 2.0 * lora_b.float() @ lora_a.float(), rtol=0, atol=1e-6)
    trained = PeftModel.from_pretrained(quantized, runs["qlora"] / "student").eval()
    trained_text, trained_logits = greedy_and_logits(trained, probes)
    exported_text, exported_logits = greedy_and_logits(plain_load(result.out), probes)
    assert exported_text == trained_text and max_diff(exported_logits, trained_logits) <= 1e-4
    full_logits = logits_on(run_model(runs["qlora"]), trained_text)  # the full-precision base + adapter
    assert max_diff(full_logits, trained_logits) > 100 * max_diff(exported_logits, trained_logits)
    check = result.verification
    assert check.reference == "the 4-bit base + the adapter (the model the run trained)" and check.greedy_identical
    record = json.loads((result.out / "tropd_export.json").read_text())
    assert record["base"] == "quantized" and record["eval"]["export_accuracy"] == record["eval"]["run_accuracy"]
    rows = card_rows(result.out)
    assert rows["export"] == "merged, fp32, tropd 0.1.0, merged into the dequantized 4-bit base"
    assert "this model (measured on it at export)" in rows["held-out accuracy (4 problems)"]
    assert "the full-precision base + the adapter" in rows["held-out accuracy (4 problems)"]
    assert "so this model reproduces the one the run trained" in (result.out / "README.md").read_text()


@pytest.mark.parametrize(("mode", "argv", "message"), [
    ("lora", ["--base", "quantized"], "--base quantized merges into the 4-bit base a QLoRA run trained on"),
    ("qlora", ["--base", "quantized", "--format", "adapter"], "--base quantized chooses what the adapter merges"),
    ("qlora", ["--base", "half"], "--base must be full or quantized, got 'half'"),
])
def test_base_errors_are_one_line(mode, argv, message, runs, tmp_path, capsys):
    assert cli.main(["export", str(runs[mode]), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("base", "verify", "expected"), [
    ("quantized", False, ["none", "4bit"]), ("full", False, ["none"]), ("full", True, ["none", "4bit"])])
def test_a_qlora_export_reads_each_base_once(base, verify, expected, runs, tmp_path, monkeypatch):
    loads = counted_loads(monkeypatch)
    export(runs["qlora"], tmp_path / "out", base=base, verify=verify, evaluate=False, console=quiet())
    assert loads == expected


def test_no_eval_keeps_the_runs_number_and_says_whose_it_is(runs, tmp_path):
    result = export(runs["qlora"], tmp_path / "out", evaluate=False, console=quiet())
    rows = card_rows(result.out)
    assert "the 4-bit model the run trained, not this export (measured during the run)" in \
        rows["held-out accuracy (4 problems)"]
    assert "export_accuracy" not in json.loads((result.out / "tropd_export.json").read_text())["eval"]


@pytest.mark.parametrize("mode", ["full", "qlora"])
def test_the_runs_student_folder_has_a_real_model_card(runs, mode):
    text = (runs[mode] / "student" / "README.md").read_text()
    assert "[More Information Needed]" not in text and "assets/student" not in text
    rows = card_rows(runs[mode] / "student")
    summary = json.loads((runs[mode] / "summary.json").read_text())
    assert rows["teacher"] == "`toylab:teacher`" and rows["steps"] == "2 of 2"
    assert rows["data"] == "`toylab`"
    after = "student after" + (" (4-bit base + this adapter)" if mode == "qlora" else "")
    assert rows["held-out accuracy (4 problems)"].endswith(f"{after} {100 * summary['student_accuracy_after']:.1f}%")
    if mode == "qlora":
        adapter = json.loads((runs[mode] / "student" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == "toylab:student"
