"""Tiny models of a real transformers architecture (Qwen3) for the toy lab.

The teacher and the student are `Qwen3ForCausalLM` with tied embeddings (v3's teacher and student have an
output head of their own); only their sizes differ, so LoRA target modules, 4-bit loading and merging run the
same code as with real Qwen3 checkpoints.
"""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3ForCausalLM

from tropd_cli.toylab.tokenizer import EOS_TOKEN, PAD_TOKEN, build_tokenizer

SIZES: dict[str, dict[str, int]] = {
    "teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "student": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    # toy lab v2: head_dim 64, so that vLLM's CPU attention kernels accept the models too
    "v2-teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "v2-student": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64),
    # toy lab v3: v2's shapes with an output head of their own (with tied embeddings, neighbouring numbers share
    # their input and output vectors, and a tiny model stays unsure between n and n +- 1 long after it is right);
    # the student is half v2's student's width, so that it learns the task over some 300 steps instead of 100 and
    # the shipped students, cut from that rise, are not caught in the middle of a jump
    "v3-teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False),
    "v3-student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=64, tie_word_embeddings=False),
}


def toy_config(size: str) -> Qwen3Config:
    """The Qwen3 configuration of a toy model size (a key of SIZES)."""
    tokenizer = build_tokenizer()
    return Qwen3Config(**{
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "bos_token_id": None,
        **SIZES[size],
    })


def new_toy_model(size: str, seed: int) -> Qwen3ForCausalLM:
    """A freshly initialised toy model (fp32, seeded)."""
    import torch

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(toy_config(size))
