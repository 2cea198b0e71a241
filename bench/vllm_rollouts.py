"""HF generate against vLLM rollouts, side by side in one run: rollouts alone and a whole training step.

Three cases, each through tropd's own backends (`HFGenerateBackend`, `VLLMRolloutBackend`):

- `fixed`: random float32 Qwen3 models (head_dim 64, which vLLM's CPU attention needs) of sizes s and m sample
  `--new-tokens` tokens per response. Neither the model nor its tokenizer has an EOS and no stop id is given,
  so every response has exactly that length on both sides; the script checks it (mean and max generated
  tokens are reported) and fails otherwise. This is the backends' raw decoding speed.
- `ragged`: the toy lab's v2 student (`toylab:v2-student-e0.03`) answers toy-lab v2 prompts at temperature 1 and
  stops at its own EOS, as in training: lengths differ per response (mean and max reported). HF's static batch
  keeps computing rows that have finished; vLLM does not.
- `step`: `tropd distill --preset toylab-v2` for `--steps` steps with `rollout.backend` hf and vllm, each run its
  own process: the median step time and rollout time over the steps after the first, and the process's wall
  time outside the steps (imports, loading, vLLM's engine start-up).

For `fixed` and `ragged`, the vLLM engine starts once per model (its start-up is a column of its own), each
side makes one untimed call (first-call set-up), then each of `--repeats` rounds times one HF call, one weight
sync and one vLLM call, in that order; for `step`, the HF and vLLM runs alternate. Medians are reported with
the range over repeats. Run it in the vLLM environment (`make vllm-venv`); it writes vllm_rollouts.json (with
the command and the environment) and vllm_rollouts.md:

    .venv-vllm/bin/python bench/vllm_rollouts.py --out bench/results
    .venv-vllm/bin/python bench/vllm_rollouts.py --cases fixed --sizes s --new-tokens 64 --repeats 1 --out /tmp/b

On a CPU, vLLM's worker binds its own OpenMP threads to the cores it is given, while HF uses torch's pool
(`--threads`, default all cores): both get the same cores. A GPU user wants `bench/vllm_gpu_smoke.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
CASES = ("fixed", "ragged", "step")
RAGGED_STUDENT = "toylab:v2-student-e0.03"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--sizes", default="s,m", help="fixed case: comma-separated model sizes: " + ", ".join(SIZES))
    parser.add_argument("--prompts", type=int, default=8, help="prompts per call (fixed, ragged)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (fixed, ragged)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="fixed case: prompt length")
    parser.add_argument("--new-tokens", type=int, default=256, help="fixed case: every response's length")
    parser.add_argument("--ragged-max-tokens", type=int, default=64, help="ragged case: max_new_tokens (the "
                        "toylab-v2 preset's)")
    parser.add_argument("--steps", type=int, default=12, help="step case: training steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per case, HF and vLLM interleaved")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of HF generate (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.cases, args.sizes = args.cases.split(","), args.sizes.split(",")
    if unknown := [c for c in args.cases if c not in CASES] + [s for s in args.sizes if s not in SIZES]:
        parser.error(f"unknown cases or sizes: {', '.join(unknown)}")
    if min(args.prompts, args.n, args.new_tokens, args.repeats, args.prompt_tokens, args.steps) < 1:
        parser.error("counts must be positive")
    if args.steps < 2 and "step" in args.cases:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    return args


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def build_model(size: str, folder: Path) -> tuple[torch.nn.Module, list[int]]:
    """A random float32 Qwen3 of `size` saved to `folder` with a tokenizer, neither with an EOS, and its stop
    ids: none (vLLM refuses a stop id outside the vocabulary)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0, **SIZES[size])
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(folder)
    save_tokenizer(config.vocab_size, folder)
    return model, []


def save_tokenizer(vocab_size: int, folder: Path) -> None:
    """A word-level tokenizer with one token per id and no EOS (vLLM loads one even for token-id prompts)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")), pad_token="t0",
                            unk_token="t1").save_pretrained(folder)


def race(model: torch.nn.Module, folder: str, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int,
         args: argparse.Namespace, fixed: bool) -> dict:
    """Start a vLLM engine on `folder`, then `--repeats` rounds of HF generate, vLLM sync, vLLM generate."""
    from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams
    from tropd_cli.engine.rollout.vllm import VLLMRolloutBackend
    from tropd_cli.engine.vllm_engine import EngineOptions

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)
    hf = HFGenerateBackend(model, 0, stop_ids, batch_size=len(prompts) * args.n)
    started = time.perf_counter()
    options = EngineOptions(dtype="float32", max_model_len=max(map(len, prompts)) + max_new_tokens + 8,
                            kv_cache_gib=1.0, enforce_eager=True)
    vllm = VLLMRolloutBackend(folder, model, stop_ids, options)
    row: dict = {"vllm_startup_s": time.perf_counter() - started, "rounds": []}
    for backend in (hf, vllm):  # one untimed call each: first-call set-up is not decoding speed
        backend.generate(prompts, args.n, params, generator_seed=10_000)
    for round_ in range(args.repeats):
        sample = {}
        for side, backend in (("hf", hf), ("vllm", vllm)):
            if side == "vllm":
                began = time.perf_counter()
                vllm.sync(model)
                sample["vllm_sync_s"] = time.perf_counter() - began
            began = time.perf_counter()
            rollouts = backend.generate(prompts, args.n, params, generator_seed=round_)
            seconds = time.perf_counter() - began
            lengths = [len(response) for response in rollouts.response_ids]
            if fixed and set(lengths) != {max_new_tokens}:
                raise SystemExit(f"{side} did not generate {max_new_tokens} tokens per response: "
                                 f"{sorted(set(lengths))}")
            sample[side] = {"seconds": seconds, "tokens": sum(lengths), "tokens_per_s": sum(lengths) / seconds,
                            "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths)}
        row["rounds"].append(sample)
    vllm.close()
    for side in ("hf", "vllm"):
        row[side] = {key: spread([r[side][key] for r in row["rounds"]])
                     for key in ("seconds", "tokens_per_s", "mean_tokens", "max_tokens")}
    row["vllm_sync_s"] = spread([r["vllm_sync_s"] for r in row["rounds"]])
    row["speedup"] = spread([r["vllm"]["tokens_per_s"] / r["hf"]["tokens_per_s"] for r in row["rounds"]])
    return row


def fixed_case(size: str, args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"tropd-bench-{size}-"))
    model, stop_ids = build_model(size, folder)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, SIZES[size]["vocab_size"], (args.prompt_tokens,), generator=generator).tolist()
               for _ in range(args.prompts)]
    row = race(model, str(folder), prompts, stop_ids, args.new_tokens, args, fixed=True)
    return {"case": "fixed", "model": f"random Qwen3 {size}", "parameters": sum(p.numel() for p in model.parameters()),
            "sequences": args.prompts * args.n, "max_new_tokens": args.new_tokens, **row}


def ragged_case(args: argparse.Namespace) -> dict:
    from tropd_cli.data.chat import chat_prompt_ids
    from tropd_cli.models import load_causal_lm, load_tokenizer, resolve_model_path, stop_token_ids
    from tropd_cli.toylab.tasks import V2_DIFFICULTY, sample_problems

    tokenizer = load_tokenizer(RAGGED_STUDENT)
    model = load_causal_lm(RAGGED_STUDENT, trainable=False).eval()
    prompts = [chat_prompt_ids(tokenizer, problem.prompt)
               for problem in sample_problems(0, args.prompts, V2_DIFFICULTY, held_out=False)]
    row = race(model, resolve_model_path(RAGGED_STUDENT), prompts, stop_token_ids(RAGGED_STUDENT, tokenizer),
               args.ragged_max_tokens, args, fixed=False)
    return {"case": "ragged", "model": RAGGED_STUDENT, "parameters": sum(p.numel() for p in model.parameters()),
            "sequences": args.prompts * args.n, "max_new_tokens": args.ragged_max_tokens, **row}


def distill_run(backend: str, args: argparse.Namespace, folder: Path) -> dict:
    """One `tropd distill --preset toylab-v2` run of `--steps` steps in its own process."""
    settings = [f"train.steps={args.steps}", "eval.problems=0", "eval.every=0", "output.save_model=false",
                f"rollout.backend={backend}", "rollout.vllm_enforce_eager=true", "rollout.vllm_kv_cache_gib=1"]
    if args.threads:
        settings.append(f"train.threads={args.threads}")
    command = [sys.executable, "-m", "tropd_cli", "distill", "--preset", "toylab-v2", "--out", str(folder),
               "--overwrite", *[part for setting in settings for part in ("--set", setting)]]
    began = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - began
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r["rollout_s"] + r["score_s"] + r["update_s"] + r.get("sync_s", 0.0) for r in records]
    return {"wall_s": wall, "step_s": statistics.median(steps[1:]),
            "rollout_s": statistics.median(r["rollout_s"] for r in records[1:]),
            "response_tokens": statistics.median(r["response_length"] for r in records[1:]),
            "outside_steps_s": wall - sum(steps)}


def step_case(args: argparse.Namespace) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="tropd-bench-step-"))
    rounds = [{backend: distill_run(backend, args, folder / backend) for backend in ("hf", "vllm")}
              for _ in range(args.repeats)]
    row: dict = {"case": "step", "model": "preset toylab-v2", "steps": args.steps, "rounds": rounds}
    for side in ("hf", "vllm"):
        row[side] = {key: spread([r[side][key] for r in rounds])
                     for key in ("step_s", "rollout_s", "response_tokens", "outside_steps_s", "wall_s")}
    row["step_speedup"] = spread([r["hf"]["step_s"] / r["vllm"]["step_s"] for r in rounds])
    row["rollout_speedup"] = spread([r["hf"]["rollout_s"] / r["vllm"]["rollout_s"] for r in rounds])
    return row


def rng(value: dict, fmt: str) -> str:
    """`median (min-max)`."""
    return f"{value['median']:{fmt}} ({value['min']:{fmt}}-{value['max']:{fmt}})"


def markdown(report: dict) -> str:
    env, args = report["environment"], report["args"]
    lines = [f"# HF generate vs vLLM rollouts ({env['cpu']}, {env['cpu_count']} cores, torch threads "
             f"{env['torch_threads']}, vllm-cpu {env['packages'].get('vllm-cpu', '-')})", "",
             f"Medians over {args['repeats']} interleaved rounds, (min-max) beside them; float32, temperature 1, "
             f"{args['prompts']} prompts x {args['n']} samples per call.", ""]
    rollouts = [row for row in report["rows"] if row["case"] != "step"]
    if rollouts:
        lines += ["## Rollouts alone", "",
                  "| case | model | params | tokens per response, mean / max (HF; vLLM) | HF tokens/s | vLLM tokens/s "
                  "| vLLM / HF | vLLM start-up s | vLLM sync s |",
                  "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for row in rollouts:
            hf, vllm = row["hf"], row["vllm"]
            lengths = (f"{hf['mean_tokens']['median']:.1f} / {hf['max_tokens']['max']:.0f}; "
                       f"{vllm['mean_tokens']['median']:.1f} / {vllm['max_tokens']['max']:.0f}")
            lines.append(f"| {row['case']} | {row['model']} | {row['parameters']:,} | {lengths} | "
                         f"{rng(hf['tokens_per_s'], '.0f')} | {rng(vllm['tokens_per_s'], '.0f')} | "
                         f"{rng(row['speedup'], '.2f')}x | {row['vllm_startup_s']:.1f} | "
                         f"{rng(row['vllm_sync_s'], '.3f')} |")
        lines.append("")
    for row in (row for row in report["rows"] if row["case"] == "step"):
        hf, vllm = row["hf"], row["vllm"]
        lines += [f"## A whole training step: `tropd distill --preset toylab-v2`, {row['steps']} steps per run", "",
                  "| backend | step s | rollout s | response tokens | s outside the steps (load, start-up) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, side in (("hf", hf), ("vllm", vllm)):
            lines.append(f"| {name} | {rng(side['step_s'], '.3f')} | {rng(side['rollout_s'], '.3f')} | "
                         f"{side['response_tokens']['median']:.0f} | {rng(side['outside_steps_s'], '.1f')} |")
        lines += ["", f"HF / vLLM: whole step {rng(row['step_speedup'], '.2f')}x, rollout alone "
                  f"{rng(row['rollout_speedup'], '.2f')}x.", ""]
    lines += ["Command: `" + report["command"] + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from common import publish

    from tropd_cli.environment import describe

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases:
        if case == "fixed":
            rows += [fixed_case(size, args) for size in args.sizes]
        elif case == "ragged":
            rows.append(ragged_case(args))
        else:
            rows.append(step_case(args))
    report = {"command": " ".join([sys.executable, *sys.argv]), "environment": describe(command=sys.argv),
              "args": {key: value if isinstance(value, (int, list)) else str(value)
                       for key, value in vars(args).items()}, "rows": rows}
    publish(args.out, "vllm_rollouts", report, markdown(report))


if __name__ == "__main__":
    main()
