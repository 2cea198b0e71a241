"""GPU smoke check of training past one process: FSDP2 on NCCL in bfloat16, and QLoRA under FSDP2 and DDP.

One command on a CUDA machine (about five minutes on one GPU), offline:

    python bench/distributed_gpu_smoke.py [--out /tmp/tropd-dist-gpu] [--nproc N]

It builds a random Qwen3 pair with the toy lab's tokenizer (about 0.2B parameters each at the default
`--hidden 1024 --layers 12`), then runs `tropd distill` on it in bfloat16 weights:

1. unsharded: one process, `train.strategy=single`;
2. FSDP2: `torchrun --nproc-per-node N -m tropd_cli distill ... train.strategy=fsdp2` (N = `--nproc`,
   default the GPUs here, at most 2; one NCCL rank on a one-GPU machine), the same steps and rollouts
   (near-greedy sampling, so that both see the same tokens);
3. the same with the teacher sharded too (`teacher.shard=true`);
4. QLoRA (4-bit student base, LoRA adapters) under fsdp2 and under ddp, a few steps each.

Checks: FSDP2's first-step loss and gradient norm (with the sharded teacher, the loss) equal the
unsharded ones within bfloat16 rounding (`--tolerance`, relative), every later step is reported; rank
0's peak GPU memory (torch's max_memory_allocated, `peak_memory_gib` in metrics.jsonl) against the
unsharded run's; QLoRA's losses are finite. Prints a table, writes OUT/summary.json, and exits 1 when a
check fails. `--device cpu` runs the same on gloo (a dry run of the script itself, with a smaller pair).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/tropd-dist-gpu"))
    parser.add_argument("--nproc", type=int, default=None, help="FSDP2 ranks (default: GPUs here, at most 2)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=2e-2, help="relative, first step (bfloat16)")
    return parser.parse_args(argv)


def build_pair(folder: Path, hidden: int, layers: int) -> None:
    """A random teacher and student of one Qwen3 shape, saved with the toy tokenizer."""
    import torch
    from transformers import Qwen3ForCausalLM

    from tropd_cli.toylab.models import toy_config
    from tropd_cli.toylab.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    for seed, name in enumerate(("teacher", "student")):
        if (folder / name / "config.json").is_file():
            continue
        config = toy_config("student")
        config.update(dict(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                           num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                           head_dim=64, max_position_embeddings=512,
                           layer_types=["full_attention"] * layers))
        torch.manual_seed(seed)
        Qwen3ForCausalLM(config).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)


def settings(pair: Path, device: str, steps: int, nproc: int, *extra: str) -> list[str]:
    dtype = "bfloat16" if device == "cuda" else "float32"
    return [f"teacher.model={pair / 'teacher'}", f"student.model={pair / 'student'}", f"train.device={device}",
            f"teacher.dtype={dtype}", f"student.dtype={dtype}", f"train.steps={steps}",
            f"rollout.prompts_per_step={4 * nproc}", "rollout.n=4", "rollout.max_new_tokens=64",
            "rollout.temperature=1e-6", "objective.name=opd", "eval.problems=0", "train.lr=1e-5",
            "train.warmup_steps=0", "train.checkpoint_every=0", *extra]


def distill(out: Path, sets: list[str], nproc: int | None) -> tuple[int, str]:
    """`tropd distill` in one process (nproc None) or under torchrun; (exit code, stderr tail)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    args = (launcher if nproc else [sys.executable]) + ["-m", "tropd_cli", "distill", "-p", "toylab", "--out",
                                                         str(out), "--overwrite"]
    args += [arg for setting in sets for arg in ("--set", setting)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", HF_HUB_OFFLINE="1")
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    return done.returncode, done.stderr[-2000:]


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here; --device cpu runs the script on gloo")
        nproc = args.nproc or min(2, torch.cuda.device_count())
    else:
        nproc = args.nproc or 2
    pair = args.out / "pair"
    build_pair(pair, args.hidden, args.layers)
    results: dict[str, dict] = {}
    checks: list[tuple[str, bool, str]] = []

    runs = {"unsharded": (settings(pair, args.device, args.steps, nproc, "train.strategy=single"), None),
            f"fsdp2 x{nproc}": (settings(pair, args.device, args.steps, nproc, "train.strategy=fsdp2"), nproc)}
    runs[f"fsdp2 teacher-shard x{nproc}"] = (settings(pair, args.device, args.steps, nproc, "train.strategy=fsdp2",
                                                      "teacher.shard=true"), nproc)
    for quantized in ("fsdp2", "ddp"):
        runs[f"qlora {quantized} x{nproc}"] = (settings(pair, args.device, 3, nproc, f"train.strategy={quantized}",
                                                        "student.lora.enabled=true", "student.quantization=4bit"),
                                               nproc)
    for name, (sets, ranks) in runs.items():
        code, err = distill(args.out / name.replace(" ", "-"), sets, ranks)
        steps = records(args.out / name.replace(" ", "-"))
        results[name] = {"exit": code, "loss": [r["loss"] for r in steps],
                         "grad_norm": [r["grad_norm"] for r in steps],
                         "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in steps), default=None)}
        ok = code == 0 and all(math.isfinite(r["loss"]) for r in steps)
        checks.append((f"{name}: runs, finite losses", ok and bool(steps), err if code else ""))
        print(f"{name}: exit {code}, loss {results[name]['loss']}, peak {results[name]['peak_memory_gib']}",
              flush=True)

    one, sharded = results["unsharded"], results[f"fsdp2 x{nproc}"]
    if one["loss"] and sharded["loss"]:
        loss_diff = relative(sharded["loss"][0], one["loss"][0])
        norm_diff = relative(sharded["grad_norm"][0], one["grad_norm"][0])
        checks.append(("fsdp2 first step equals unsharded", max(loss_diff, norm_diff) <= args.tolerance,
                       f"loss {loss_diff:.2e}, grad norm {norm_diff:.2e} relative"))
        later = [relative(a, b) for a, b in zip(sharded["loss"][1:], one["loss"][1:])]
        results["later_steps_loss_relative_diff"] = later
    both = results[f"fsdp2 teacher-shard x{nproc}"]
    if one["loss"] and both["loss"]:
        loss_diff = relative(both["loss"][0], one["loss"][0])
        checks.append(("fsdp2 + teacher.shard first step equals unsharded", loss_diff <= args.tolerance,
                       f"loss {loss_diff:.2e} relative"))
    if args.device == "cuda" and one["peak_memory_gib"] and sharded["peak_memory_gib"]:
        results["peak_ratio_fsdp2_to_unsharded"] = sharded["peak_memory_gib"] / one["peak_memory_gib"]
        checks.append(("fsdp2 peak memory per rank", True, f"{sharded['peak_memory_gib']:.2f} GiB vs "
                       f"{one['peak_memory_gib']:.2f} GiB unsharded"))

    width = max(len(name) for name, _, _ in checks)
    for name, ok, detail in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {name:<{width}}  {detail.strip().splitlines()[-1] if detail else ''}")
    args.out.mkdir(parents=True, exist_ok=True)
    from tropd_cli.environment import describe

    report = {"command": " ".join([sys.executable, *sys.argv]), "environment": describe(args.device, command=sys.argv),
              "nproc": nproc, "device": args.device, "results": results, "checks": checks}
    (args.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
