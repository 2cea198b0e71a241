"""Peak GPU memory that `tropd doctor` estimates for every real-pair preset, without the hub.

The models' shapes are copied from their published config.json files; the models are built on the meta
device (no memory, no weights) and fed to the same estimator `tropd doctor` uses, with the longest prompt
the preset admits (data.max_prompt_tokens) and full-length responses: a worst case. Run:

    .venv/bin/python bench/preset_memory.py [--only NAME]

Each preset's header states the figure this prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tropd_cli.config import load_config, preset_names  # noqa: E402
from tropd_cli.models import meta_model  # noqa: E402
from tropd_cli.preflight import estimate_memory, gib  # noqa: E402

QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)
QWEN2_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, vocab_size=151936)


def qwen3(hidden: int, layers: int, heads: int, intermediate: int, tied: bool) -> dict:
    """A Qwen3 shape: every size has 8 key-value heads of 128 dimensions and 151936 vocabulary rows."""
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                head_dim=128, intermediate_size=intermediate, vocab_size=151936, tie_word_embeddings=tied)


SHAPES = {
    "Skywork/Skywork-OR1-Math-7B": (Qwen2Config, QWEN2_7B),
    "Skywork/Skywork-OR1-7B": (Qwen2Config, QWEN2_7B),
    "Qwen/Qwen2.5-Math-7B-Instruct": (Qwen2Config, QWEN2_7B),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (Qwen2Config, {**QWEN2_1_5B, "tie_word_embeddings": False}),
    "Qwen/Qwen2.5-1.5B-Instruct": (Qwen2Config, {**QWEN2_1_5B, "tie_word_embeddings": True}),
    "Qwen/Qwen3-0.6B": (Qwen3Config, qwen3(1024, 28, 16, 3072, tied=True)),
    "Qwen/Qwen3-1.7B": (Qwen3Config, qwen3(2048, 28, 16, 6144, tied=True)),
    "Qwen/Qwen3-4B": (Qwen3Config, qwen3(2560, 36, 32, 9728, tied=True)),
    "Qwen/Qwen3-8B": (Qwen3Config, qwen3(4096, 36, 32, 12288, tied=False)),
    "meta-llama/Llama-3.1-8B-Instruct": (LlamaConfig, dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)),
    "meta-llama/Llama-3.2-1B-Instruct": (LlamaConfig, dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)),
}


def model_config(model_id: str):
    """The published configuration of a preset's model, rebuilt offline."""
    config_class, shape = SHAPES[model_id]
    return config_class(**shape)


def preset_estimate(name: str) -> tuple[float, list[tuple[str, int]]]:
    """The estimated peak memory of a preset on a CUDA GPU, in GiB, and its rows."""
    # a GPU with bfloat16, where train.autocast=auto turns it on; the teacher drafts come from prepare
    config = load_config(name, ["train.autocast=bfloat16"])
    estimate = estimate_memory(config, torch.device("cuda"), meta_model(model_config(config.teacher.model)),
                               meta_model(model_config(config.student.model)), config.data.max_prompt_tokens, free=0)
    return estimate.total / 2**30, estimate.rows


def real_presets() -> list[str]:
    return [name for name in preset_names() if load_config(name).teacher.model in SHAPES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="One preset name.")
    parser.add_argument("--rows", action="store_true", help="Also print each preset's components.")
    args = parser.parse_args()
    for name in [args.only] if args.only else real_presets():
        total, rows = preset_estimate(name)
        print(f"{name:34s} {total:6.1f} GiB")
        if args.rows:
            for label, size in rows:
                print(f"    {label:70s} {gib(size)}")


if __name__ == "__main__":
    main()
