"""HF generate against vLLM rollouts, side by side in one run, where generation dominates (256+ new tokens).

Both backends sample the same prompts from the same random float32 Qwen3 model (head_dim 64, which vLLM's
CPU attention needs) through tropd's own rollout backends (`HFGenerateBackend`, `VLLMRolloutBackend`), with
stop ids that never occur so that every response is `--new-tokens` long. Reported per size: response tokens
per second of each backend (best of `--repeats` timed calls after one warm-up), the ratio, and vLLM's fixed
costs that a training run pays: engine start-up (once) and one weight sync (after every optimizer step).

Run it in the vLLM environment (`make vllm-venv`); it writes a Markdown table and JSON to --out:

    .venv-vllm/bin/python bench/vllm_rollouts.py                       # sizes s and m on this machine
    .venv-vllm/bin/python bench/vllm_rollouts.py --sizes s --new-tokens 256 --prompts 4 --repeats 1

On a CPU, vLLM's worker binds its own OpenMP threads to the cores it is given, while HF uses torch's pool
(`--threads`, default all cores): both get the same cores. A GPU user wants `bench/vllm_gpu_smoke.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

SIZES = {  # hidden, layers, heads (head_dim 64), vocabulary
    "s": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=8192),
    "m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=32768),
}
NEVER = 3  # a stop id the benchmark keeps the model from sampling: every response runs to --new-tokens


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="s,m", help="comma-separated model sizes: " + ", ".join(SIZES))
    parser.add_argument("--prompts", type=int, default=8, help="prompts per call")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per backend (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of HF generate (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.sizes = args.sizes.split(",")
    if unknown := [size for size in args.sizes if size not in SIZES]:
        parser.error(f"unknown sizes: {', '.join(unknown)}")
    if min(args.prompts, args.n, args.new_tokens, args.repeats, args.prompt_tokens) < 1:
        parser.error("counts must be positive")
    return args


def build_model(size: str, folder: Path) -> torch.nn.Module:
    """A random float32 Qwen3 of `size` saved to `folder` (config and weights, no tokenizer needed by vLLM's
    token-id prompts beyond a minimal one)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=NEVER, pad_token_id=0, **SIZES[size])
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[NEVER].zero_().add_(-1.0)  # tied head: the stop id is never likely
    model.save_pretrained(folder)
    save_tokenizer(config.vocab_size, folder)
    return model


def save_tokenizer(vocab_size: int, folder: Path) -> None:
    """A word-level tokenizer with one token per id (vLLM loads one even for token-id prompts)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", eos_token=f"t{NEVER}", unk_token="t1")
    tokenizer.save_pretrained(folder)


def timed(generate, repeats: int) -> tuple[float, int]:
    """Best seconds of `repeats` calls after one warm-up, and the response tokens of one call."""
    tokens = sum(len(r) for r in generate().response_ids)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        generate()
        best = min(best, time.perf_counter() - started)
    return best, tokens


def bench_size(size: str, args: argparse.Namespace) -> dict:
    from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams
    from tropd_cli.engine.rollout.vllm import EngineOptions, VLLMRolloutBackend

    folder = Path(tempfile.mkdtemp(prefix=f"tropd-bench-{size}-"))
    model = build_model(size, folder)
    generator = torch.Generator().manual_seed(1)
    vocab = SIZES[size]["vocab_size"]
    prompts = [torch.randint(4, vocab, (args.prompt_tokens,), generator=generator).tolist()
               for _ in range(args.prompts)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
    row: dict = {"size": size, "parameters": sum(p.numel() for p in model.parameters()),
                 "sequences": args.prompts * args.n, "new_tokens": args.new_tokens}

    hf = HFGenerateBackend(model, 0, [NEVER], batch_size=args.prompts * args.n)
    row["hf_s"], tokens = timed(lambda: hf.generate(prompts, args.n, params, 0), args.repeats)
    row["hf_tokens_per_s"] = tokens / row["hf_s"]

    started = time.perf_counter()
    options = EngineOptions(dtype="float32", max_model_len=args.prompt_tokens + args.new_tokens + 8,
                            kv_cache_gib=1.0, enforce_eager=True)
    vllm = VLLMRolloutBackend(str(folder), model, [NEVER], options)
    row["vllm_startup_s"] = time.perf_counter() - started
    started = time.perf_counter()
    vllm.sync(model)
    row["vllm_sync_s"] = time.perf_counter() - started
    row["vllm_s"], tokens = timed(lambda: vllm.generate(prompts, args.n, params, 0), args.repeats)
    row["vllm_tokens_per_s"] = tokens / row["vllm_s"]
    row["speedup"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
    return row


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"# HF generate vs vLLM rollouts ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()})", "",
             f"{args.prompts} prompts x {args.n} samples, {args.prompt_tokens} prompt tokens, {args.new_tokens} new "
             f"tokens each, temperature 1, float32, best of {args.repeats}.", "",
             "| size | params | HF tokens/s | vLLM tokens/s | vLLM / HF | vLLM start-up s | vLLM sync s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['size']} | {row['parameters'] / 1e6:.1f}M | {row['hf_tokens_per_s']:.0f} | "
                     f"{row['vllm_tokens_per_s']:.0f} | {row['speedup']:.2f}x | {row['vllm_startup_s']:.1f} | "
                     f"{row['vllm_sync_s']:.3f} |")
    lines += ["", "Command: `" + " ".join([sys.executable, *sys.argv]) + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench_size(size, args) for size in args.sizes]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm_rollouts.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "rows": rows}, indent=2))
    report = markdown(rows, args)
    (args.out / "vllm_rollouts.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
