"""The benchmarks in bench/ import, parse their arguments and build their inputs (no timings here)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import scoring_memory  # noqa: E402
import trl_compare  # noqa: E402


def test_trl_compare_defaults_follow_the_device():
    cpu = trl_compare.parse_args([])
    assert cpu.sizes == ["s", "m", "v32k"] and cpu.frameworks == ["hf", "tropd", "trl"]
    assert cpu.threads == 1 and cpu.clock == "tokens_per_cpu_second" and cpu.precision == "fp32"
    assert cpu.shape == trl_compare.DEFAULT_SHAPES["cpu"]
    cuda = trl_compare.parse_args(["--device", "cuda", "--sizes", "v152k", "--micro-batch", "4"])
    assert cuda.sizes == ["v152k"] and cuda.clock == "tokens_per_second" and cuda.threads == 0
    assert cuda.shape.micro_batch == 4 and cuda.precision == "bf16"
    assert cuda.shape.max_new_tokens == trl_compare.DEFAULT_SHAPES["cuda"].max_new_tokens
    assert trl_compare.parse_args(["--clock", "wall"]).clock == "tokens_per_second"


@pytest.mark.parametrize("argv", [["--sizes", "xl"], ["--frameworks", "hf,vllm"], ["--steps", "0"],
                                  ["--device", "cuda", "--clock", "cpu"]])
def test_trl_compare_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        trl_compare.parse_args(argv)


def test_tokenizer_matches_the_vocabulary_and_prompts_round_trip():
    tokenizer = trl_compare.build_tokenizer(300)
    assert len(tokenizer) == 300
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (trl_compare.PAD_ID, trl_compare.EOS_ID)
    spec = {"shape": vars(trl_compare.StepShape(2, 3, 5, 4, 2)), "warmup": 1, "steps": 2, "vocab": 300, "seed": 0}
    steps = trl_compare.step_prompts(spec)
    assert len(steps) == 3 and all(len(batch) == 2 and all(len(p) == 5 for p in batch) for batch in steps)
    assert steps == trl_compare.step_prompts(spec)
    prompt = steps[0][0]
    assert min(prompt) > trl_compare.UNK_ID
    assert tokenizer(" ".join(f"t{i}" for i in prompt))["input_ids"] == prompt
    every_word = list(range(trl_compare.UNK_ID + 1, 300))
    assert tokenizer(" ".join(f"t{i}" for i in every_word))["input_ids"] == every_word


def test_summary_takes_medians_and_checks_the_targets():
    def run(seconds, step_bytes):
        steps = [{"seconds": s, "cpu_seconds": s, "generated": 100, "scored": 300, "parts": {}} for s in seconds]
        return {"steps": steps, "peak_bytes": step_bytes, "resident_bytes": 0, "step_bytes": step_bytes}

    results = {"hf": trl_compare.summarise([run([1.0, 1.0], 100)]),
               "tropd": trl_compare.summarise([run([1.0, 3.0], 40), run([1.05], 60)]),
               "trl": trl_compare.summarise([run([1.5, 1.5, 1.5], 100)])}
    assert results["tropd"]["step_seconds"] == 1.05 and results["tropd"]["step_bytes"] == 50
    assert results["tropd"]["tokens_per_second"] == pytest.approx(400 / 1.05)
    summary = trl_compare.ratios(trl_compare.SIZES["v32k"], results, "tokens_per_second")
    assert summary["tropd_of_hf_limit"] == pytest.approx(1 / 1.05) and summary["target_limit_met"]
    assert summary["tropd_over_trl_speed"] == pytest.approx(1.5 / 1.05) and summary["target_speed_met"]
    assert summary["tropd_over_trl_memory"] == 0.5 and summary["target_memory_met"]
    small = trl_compare.ratios(trl_compare.SIZES["s"], {"tropd": results["tropd"]}, "tokens_per_second")
    assert small["tropd_of_hf_limit"] is None and small["target_memory_met"] is None


def test_scoring_memory_arguments_and_both_passes_run_on_a_tiny_pair():
    args = scoring_memory.parse_args(["--batches", "2x3,4x5", "--chunks", "2,8", "--top-ks", "1,4"])
    assert args.batches == [(2, 3), (4, 5)] and args.chunks == [2, 8] and args.top_ks == [1, 4]
    assert scoring_memory.parse_args(["--device", "cuda"]).batches[0] == (8, 256)
    device = torch.device("cpu")
    teacher, student = scoring_memory.build_models(64, device, max_positions=32)
    batch = scoring_memory.random_batch(64, 2, 3, device)
    scoring_memory.chunked_pass(teacher, student, batch, top_k=4, chunk=2)
    assert all(p.grad is not None for p in student.lm_head.parameters())
    student.zero_grad()
    scoring_memory.naive_pass(teacher, student, batch, top_k=4)
    assert all(p.grad is not None for p in student.lm_head.parameters())


def test_distributed_benches_parse_their_arguments_and_build_commands(tmp_path):
    import distributed_cpu
    import distributed_gpu_smoke

    assert distributed_cpu.parse_args([]).steps == 6
    command = distributed_cpu.command(tmp_path / "run", 3, ["train.strategy=fsdp2"], 2)
    assert command[-2:] == ["--nproc", "2"] and "train.strategy=fsdp2" in command and "train.steps=3" in command
    assert "--nproc" not in distributed_cpu.command(tmp_path / "run", 3, [], 1)
    smoke = distributed_gpu_smoke.parse_args(["--device", "cpu", "--nproc", "1"])
    assert smoke.device == "cpu" and smoke.nproc == 1 and smoke.tolerance == 2e-2
    sets = distributed_gpu_smoke.settings(tmp_path, "cuda", 4, 2, "train.strategy=fsdp2")
    assert "student.dtype=bfloat16" in sets and "rollout.prompts_per_step=8" in sets
    assert sets[-1] == "train.strategy=fsdp2"


def test_vllm_rollouts_arguments_and_its_fixed_length_premise_on_the_hf_side(tmp_path, monkeypatch):
    import vllm_rollouts

    from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams

    args = vllm_rollouts.parse_args(["--cases", "fixed,step", "--sizes", "s", "--repeats", "3"])
    assert args.cases == ["fixed", "step"] and args.sizes == ["s"] and args.steps == 12
    for bad in (["--cases", "fast"], ["--sizes", "xl"], ["--repeats", "0"], ["--steps", "1"]):
        with pytest.raises(SystemExit):
            vllm_rollouts.parse_args(bad)
    assert vllm_rollouts.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    # a model and tokenizer without EOS and no stop ids: every response runs to max_new_tokens
    monkeypatch.setitem(vllm_rollouts.SIZES, "tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                                          num_attention_heads=1, num_key_value_heads=1,
                                                          vocab_size=64))
    model, stop_ids = vllm_rollouts.build_model("tiny", tmp_path)
    assert stop_ids == [] and model.config.eos_token_id is None
    rollouts = HFGenerateBackend(model, 0, stop_ids).generate([[5, 6, 7], [8]], 3, SamplingParams(9), 0)
    assert [len(response) for response in rollouts.response_ids] == [9] * 6 and not any(rollouts.finished)


def test_pinned_drift_compares_every_pinned_value():
    import pinned_drift

    reference = {"run": {"loss": [2.0, 1.0], "grad_norm": [4.0, 0.0]}}
    rows = pinned_drift.differences({"run": {"loss": [2.0, 1.001], "grad_norm": [4.0004, 0.0]}}, reference)
    assert [(r["metric"], r["step"]) for r in rows] == [("loss", 1), ("loss", 2), ("grad_norm", 1), ("grad_norm", 2)]
    assert [round(r["relative"], 6) for r in rows] == [0.0, 0.001, 0.0001, 0.0]
    assert pinned_drift.differences({}, reference) == []


def test_served_teacher_arguments_and_its_table():
    import served_teacher

    args = served_teacher.parse_args(["--steps", "4", "--repeats", "1"])
    assert (args.steps, args.repeats, args.threads) == (4, 1, 1)
    assert served_teacher.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    side = {"step_s": {"median": 0.5, "min": 0.4, "max": 0.6}, "score_s": {"median": 0.25},
            "outside_steps_s": {"median": 9.0}, "peak_rss_gib": {"median": 0.75}}
    report = {"environment": {"cpu": "CPU", "cpu_count": 2}, "steps": 4, "repeats": 1, "server_startup_s": 60.0,
              "server_rss_gib": 3.5, "command": "python bench/served_teacher.py",
              "sides": {name: side for name in served_teacher.SIDES}}
    table = served_teacher.markdown(report)
    assert "| server | 0.500 (0.400-0.600) | 0.250 | 9.0 | 0.75 |" in table
    assert "started in 60.0 s and held 3.50 GiB" in table


def test_publish_writes_a_reports_json_and_markdown_and_prints_it(tmp_path, capsys):
    import json

    from common import publish

    publish(tmp_path / "out", "name", {"command": "c", "value": 1.5}, "# table")
    assert json.loads((tmp_path / "out" / "name.json").read_text()) == {"command": "c", "value": 1.5}
    assert (tmp_path / "out" / "name.md").read_text() == "# table"
    assert capsys.readouterr().out == "# table\n"
