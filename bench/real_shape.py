"""A real-shape preset on a GPU without the hub: random weights built from the published configs.

Builds the teacher and student of a preset (shapes from `preset_memory.SHAPES`) with random bfloat16
weights, saves them with a word-level tokenizer of the real vocabulary size (the toy lab's words plus
filler tokens, Qwen-style chat template), runs `tropd distill` on them for a few steps with the preset's
settings (shortened rollouts; random models never emit EOS, so every response has full length) and
prints tokens per second, peak GPU memory per step and the preflight's estimate for the same settings.

    python bench/real_shape.py --preset qwen3-4b-0.6b-lora --out /tmp/real-shape
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from preset_memory import model_config  # noqa: E402

from tropd_cli.config import load_config  # noqa: E402
from tropd_cli.distill import distill  # noqa: E402
from tropd_cli.preflight import estimate_memory, longest_prompt  # noqa: E402
from tropd_cli.toylab import tokenizer as toy  # noqa: E402


def big_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """The toy tokenizer's vocabulary padded with filler tokens to `size` entries."""
    base = toy.vocabulary()
    vocab = {token: index for index, token in enumerate(base + [f"<filler{i}>" for i in range(size - len(base))])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=toy.UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d+|[A-Za-z]+|\s|[^\sA-Za-z\d]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=toy.EOS_TOKEN, pad_token=toy.PAD_TOKEN,
                                   unk_token=toy.UNK_TOKEN, additional_special_tokens=["<|im_start|>"],
                                   chat_template=toy.CHAT_TEMPLATE, padding_side="left")


def build(model_id: str, folder: Path) -> None:
    config = model_config(model_id)
    if not (folder / "config.json").is_file():
        started = time.perf_counter()
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        print(f"built {model_id} shape in {time.perf_counter() - started:.0f}s", flush=True)
    big_tokenizer(config.vocab_size - 256).save_pretrained(folder)  # fewer tokens than rows, as in Qwen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-4b-0.6b-lora")
    parser.add_argument("--out", type=Path, default=Path("/tmp/real-shape"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[
        "rollout.prompts_per_step=8", "rollout.max_new_tokens=1024", "rollout.batch_size=32"])
    args = parser.parse_args()
    base = load_config(args.preset, ["data.prompts=toylab"])
    for role, model_id in (("teacher", base.teacher.model), ("student", base.student.model)):
        build(model_id, args.out / role)
    overrides = ["data.prompts=toylab", f"teacher.model={args.out / 'teacher'}",
                 f"student.model={args.out / 'student'}", f"train.steps={args.steps}", "eval.problems=0",
                 "train.checkpoint_every=0", *args.overrides]
    config = load_config(args.preset, overrides)
    started = time.perf_counter()
    result = distill(config, args.preset, out=str(args.out / "run"), overwrite=True,
                     console=Console(file=io.StringIO()))
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    from tropd_cli.models import empty_model, load_tokenizer

    estimate = estimate_memory(config, torch.device("cuda"), empty_model(config.teacher.model),
                               empty_model(config.student.model),
                               longest_prompt(config, load_tokenizer(config.student.model)), free=0)
    print(f"preset {args.preset} ({base.teacher.model} -> {base.student.model}), overrides {args.overrides}")
    for record in records:
        print(f"step {record['step']}: tokens/s {record['tokens_per_s']:.0f}  rollout {record['rollout_s']:.1f}s  "
              f"score {record['score_s']:.1f}s  update {record['update_s']:.1f}s  "
              f"peak {record.get('peak_memory_gib', float('nan')):.2f} GiB  loss {record['loss']:+.4f}  "
              f"len {record['response_length']:.0f}")
    print(f"preflight estimate {estimate.total / 2**30:.2f} GiB; wall {wall:.0f}s including loading")


if __name__ == "__main__":
    main()
