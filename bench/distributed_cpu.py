"""Step time and peak memory per rank of `tropd distill` on 1 and 2 processes, on this machine's CPU.

Each case runs the toy-lab preset (16 prompts x 4 rollouts of up to 48 tokens a step, TrOPD) for `--steps`
steps in a fresh subprocess: once in one process, once with `--nproc 2` (two gloo ranks, one thread each),
for a full student under fsdp2 and a LoRA student under ddp. Step time is the median over the steps after
the first of rank 0's rollout + scoring + update seconds (metrics.jsonl; rank 0 waits at every collective,
so this is the step's wall time); peak memory is the largest resident set size of each rank's process,
sampled every 20 ms. On two cores two ranks cannot be much faster than one process: the point is the
cost of the collectives and what each rank holds.

    python bench/distributed_cpu.py [--steps 6] [--out bench/results/distributed_cpu.json]
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

import psutil

ROOT = Path(__file__).resolve().parent.parent
CASES = {"full": ["train.strategy=fsdp2"], "lora": ["train.strategy=ddp", "student.lora.enabled=true"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is not timed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distributed_cpu.json")
    return parser.parse_args(argv)


def command(run_dir: Path, steps: int, settings: list[str], nproc: int) -> list[str]:
    sets = [f"train.steps={steps}", "eval.problems=0", "output.save_model=false", "train.checkpoint_every=0",
            "train.threads=1", "train.device=cpu", *settings]
    args = [sys.executable, "-m", "tropd_cli", "distill", "-p", "toylab", "--out", str(run_dir), "--overwrite"]
    args += [arg for setting in sets for arg in ("--set", setting)]
    return args + (["--nproc", str(nproc)] if nproc > 1 else [])


def rank_processes(root: psutil.Process, nproc: int) -> dict[int, psutil.Process]:
    """The processes that train: the root itself on one process, else the launcher's children by RANK."""
    if nproc == 1:
        return {0: root}
    found = {}
    for child in root.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "tropd_cli" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


def measure(run_dir: Path, steps: int, settings: list[str], nproc: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command(run_dir, steps, settings, nproc), env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peaks: dict[int, int] = {}
    while process.poll() is None:
        for rank, proc in rank_processes(root, nproc).items():
            try:
                peaks[rank] = max(peaks.get(rank, 0), proc.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.02)
    if process.returncode:
        raise SystemExit(f"run failed: {process.stderr.read()[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["rollout_s"] + r["score_s"] + r["update_s"] + r.get("sync_s", 0.0) for r in records[1:]]
    return {"nproc": nproc, "step_s": statistics.median(seconds),
            "rollout_s": statistics.median(r["rollout_s"] for r in records[1:]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:]),
            "peak_rss_mib_per_rank": [round(peaks[rank] / 2**20, 1) for rank in sorted(peaks)]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, settings in CASES.items():
            for nproc in (1, 2):
                key = f"{name}-{nproc}"
                results[key] = measure(Path(scratch) / key, args.steps, settings, nproc)
                print(key, results[key], flush=True)
    for name in CASES:
        one, two = results[f"{name}-1"], results[f"{name}-2"]
        print(f"{name}: step {one['step_s']:.2f}s on 1 process, {two['step_s']:.2f}s on 2 ranks "
              f"(speed-up {one['step_s'] / two['step_s']:.2f}x); peak RSS per rank "
              f"{one['peak_rss_mib_per_rank']} MiB vs {two['peak_rss_mib_per_rank']} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from tropd_cli.environment import describe

    machine = {"cpus": os.cpu_count(), "torch_threads_per_rank": 1}
    args.out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                                    "environment": describe("cpu", command=sys.argv), "machine": machine,
                                    "steps": args.steps, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
