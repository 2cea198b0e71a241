"""Every shipped preset: valid against the schema, a header that runs itself, a true memory figure."""

import re
import sys
from pathlib import Path

import pytest

from tropd_cli.config import PRESETS_DIR, load_config, preset_names
from tropd_cli.evaluation.heldout import eval_data_path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from preset_memory import SHAPES, preset_estimate  # noqa: E402

REAL = [name for name in preset_names() if not name.startswith("toylab")]


def header(name: str) -> str:
    return "".join(line for line in (PRESETS_DIR / f"{name}.yaml").read_text().splitlines(keepends=True)
                   if line.startswith("#"))


def test_the_real_pairs_are_there():
    pairs = {(load_config(name).teacher.model, load_config(name).student.model) for name in REAL}
    assert ("Skywork/Skywork-OR1-Math-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B") in pairs
    assert ("Skywork/Skywork-OR1-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B") in pairs
    for pair in [("Qwen/Qwen3-4B", "Qwen/Qwen3-1.7B"), ("Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B"),
                 ("Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B"), ("Qwen/Qwen2.5-Math-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
                 ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.2-1B-Instruct")]:
        assert pair in pairs
    modes = {(c.student.lora.enabled, c.student.quantization) for c in map(load_config, REAL)}
    assert modes == {(False, "none"), (True, "none"), (True, "4bit")}


@pytest.mark.parametrize("name", preset_names())
def test_preset_loads_and_its_header_names_its_commands(name):
    config = load_config(name)
    assert config.description
    text = header(name)
    assert f"tropd distill --preset {name}" in text
    if not name.startswith("toylab"):
        assert f"tropd doctor --preset {name}" in text
        assert re.search(rf"tropd prepare (--teacher-drafts )?--preset {re.escape(name)} ", text)
        assert f"--out {config.data.prompts}" in text  # prepare writes the folder that distill reads
        assert config.teacher.model in SHAPES and config.student.model in SHAPES
        # The toy held-out set means nothing to a real model: a small, cheap check on the prepared eval split,
        # which needs no hub; the teacher is not evaluated in the run (its generation would change the estimate).
        assert config.eval.benchmark == "custom" and config.eval.data is None
        assert 0 < config.eval.problems <= 64 and config.eval.every and not config.eval.teacher
        assert eval_data_path(config) == Path(config.data.prompts) / "eval.jsonl"


@pytest.mark.parametrize("name", REAL)
def test_header_memory_matches_the_estimate(name):
    """The GPU memory a header states is the preflight's estimate for the preset, and fits the GPU it names."""
    text = header(name)
    stated = float(re.search(r"estimate ~(\d+(?:\.\d+)?) GiB", text).group(1))
    gpu = int(re.search(r"GPU memory: (?:one|a|an) (\d+) GB GPU", text).group(1))
    total, _ = preset_estimate(name)
    assert stated == pytest.approx(total, abs=0.5)
    assert total <= 0.92 * gpu * 1e9 / 2**30  # headroom for the CUDA context and fragmentation


def test_readme_table_states_each_header_estimate():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in REAL:
        stated = re.search(r"estimate ~(\d+(?:\.\d+)?) GiB", header(name)).group(1)
        assert re.search(rf"\| `{re.escape(name)}` \|.*\(({stated}) GiB\) \|", readme), name


def test_auto_chunk_shrinks_with_the_vocabulary():
    rows = dict(preset_estimate("qwen3-4b-0.6b-lora")[1])
    assert "scoring logits (192 positions x 151936 vocab, float32)" in rows
    rows = dict(preset_estimate("llama-3.1-8b-3.2-1b-lora")[1])
    assert "scoring logits (256 positions x 128256 vocab, float32)" in rows
