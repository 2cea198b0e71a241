"""A QLoRA student sampled by vLLM, measured: vLLM 0.32 has no bitsandbytes loader, so the engine of a 4-bit
student runs its base unquantized under the trained adapter and samples a slightly different policy than the one
being trained. How far (`sampler_logprob_gap`, mean |log p_vLLM - log p_student| per sampled token), and what it
does to a 100-step `toylab-v2` run, with and without `rollout.importance_correction: tis`.

Cases, each its own process, seed-major so that the cases alternate:

- `qlora-hf`: the 4-bit student sampled by HF generate on itself (the exact sampler, the reference);
- `qlora-vllm`: sampled by vLLM (unquantized base + adapter), no correction;
- `qlora-vllm-tis`: the same with truncated importance sampling;
- `lora-vllm`: a LoRA student over the full-precision base sampled by vLLM (the control: the gap of an engine
  that holds the trained model itself).

Every run: LoRA r 16 at the preset's lr (1e-4, chosen before any comparison run), the preset's evaluation
before and after training (100 held-out problems, avg@4 at temperature 1 and greedy): by the 4-bit student itself
in the QLoRA cases, by the engine in `lora-vllm` (which holds the trained weights themselves). The script checks
its premises: every run finishes its steps, the vLLM runs report a gap every step, the HF runs none. Pre-registered
predictions: bench/results/qlora_vllm-predictions.md; the report judges them. Run it in the vLLM environment:

    .venv-vllm/bin/python bench/qlora_vllm.py --out bench/results
    .venv-vllm/bin/python bench/qlora_vllm.py --steps 4 --seeds 0 --problems 8 --out /tmp/q
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

PRESET = "toylab-v2"
CASES = {
    "qlora-hf": ["student.quantization=4bit", "rollout.backend=hf"],
    "qlora-vllm": ["student.quantization=4bit", "rollout.backend=vllm"],
    "qlora-vllm-tis": ["student.quantization=4bit", "rollout.backend=vllm", "rollout.importance_correction=tis"],
    "lora-vllm": ["rollout.backend=vllm"],
}
COMMON = ["student.lora.enabled=true", "student.lora.r=16", "student.lora.alpha=32", "train.lr=1e-4",
          "eval.every=0", "output.save_model=false", "train.checkpoint_every=0", "rollout.vllm_enforce_eager=true",
          "rollout.vllm_kv_cache_gib=0.5", "rollout.vllm_max_model_len=256"]
WARN_GAP = 0.01  # P1's threshold (nats per token), as pre-registered; tropd's own warning is at 0.02 (distill.py)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--problems", type=int, default=100, help="held-out problems of each evaluation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def run_case(case: str, seed: int, args: argparse.Namespace, folder: Path) -> dict:
    """One run in its own process; what it measured."""
    settings = [*COMMON, *CASES[case], f"train.steps={args.steps}", f"train.seed={seed}",
                f"eval.problems={args.problems}", f"train.threads={args.threads}"]
    command = [sys.executable, "-m", "tropd_cli", "distill", "--preset", PRESET, "--out", str(folder),
               "--overwrite", *[part for setting in settings for part in ("--set", setting)]]
    began = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{case} seed {seed} failed: {done.stderr[-2000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    if summary["status"] != "finished" or len(records) != args.steps:
        raise SystemExit(f"{case} seed {seed}: {summary['status']} after {len(records)} of {args.steps} steps")
    gaps = [r["sampler_logprob_gap"] for r in records if "sampler_logprob_gap" in r]
    if len(gaps) != (args.steps if "vllm" in case else 0):
        raise SystemExit(f"{case} seed {seed}: {len(gaps)} of {args.steps} steps report sampler_logprob_gap")
    before, after = summary["student_eval_before"], summary["student_eval_after"]
    row = {"case": case, "seed": seed, "wall_s": time.perf_counter() - began,
           "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
           "greedy_before": before["greedy_accuracy"], "greedy_after": after["greedy_accuracy"],
           "kl_k1_last10": statistics.mean(r["kl_k1"] for r in records[-10:]),
           "step_s": statistics.median(r["rollout_s"] + r["score_s"] + r["update_s"] + r.get("sync_s", 0.0)
                                       for r in records[1:])}
    if gaps:
        row |= {"gap_step1": gaps[0], "gap_mean": statistics.mean(gaps), "gap_max": max(gaps),
                "gap_last10": statistics.mean(gaps[-10:])}
    if "tis" in case:
        row["tis_weight_mean"] = statistics.mean(r["tis_weight"] for r in records)
    print(f"{case} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)),
          flush=True)
    return row


def summarise(runs: list[dict]) -> dict:
    """Per case: the mean over seeds of each measured number, and the gains."""
    table = {}
    for case in CASES:
        rows = [r for r in runs if r["case"] == case]
        keys = [k for k, v in rows[0].items() if isinstance(v, float)]
        table[case] = {k: statistics.mean(r[k] for r in rows) for k in keys}
        table[case]["gain"] = statistics.mean(r["accuracy_after"] - r["accuracy_before"] for r in rows)
        table[case]["greedy_gain"] = statistics.mean(r["greedy_after"] - r["greedy_before"] for r in rows)
    return table


def verdicts(report: dict) -> list[str]:
    """The pre-registered predictions (bench/results/qlora_vllm-predictions.md), judged on the report's numbers."""
    runs, table = report["runs"], report["cases"]
    qlora_gaps = [r["gap_mean"] for r in runs if r["case"] in ("qlora-vllm", "qlora-vllm-tis")]
    control = [r["gap_mean"] for r in runs if r["case"] == "lora-vllm"]
    p1 = min(qlora_gaps) >= report["warn_gap"] and max(control) < 1e-4
    reference = table["qlora-hf"]["kl_k1_last10"]
    p2 = abs(table["qlora-vllm"]["kl_k1_last10"] - reference) < 0.1 * reference
    tis = table["qlora-vllm-tis"]
    p3 = abs(tis["tis_weight_mean"] - 1) <= 0.01 and abs(tis["kl_k1_last10"] - reference) < 0.1 * reference
    return ["Verdicts on the pre-registered predictions:", "",
            f"- P1 (the gap) {'holds' if p1 else 'fails'}: QLoRA runs' mean gaps {min(qlora_gaps):.3f}-"
            f"{max(qlora_gaps):.3f} (>= {report['warn_gap']}), the control's {max(control):.1e} at most (< 1e-4).",
            f"- P2 (no effect on the objective) {'holds' if p2 else 'fails'}: K1 KL over the last 10 steps "
            f"{table['qlora-vllm']['kl_k1_last10']:.3f} with vLLM rollouts against {reference:.3f} with HF's "
            f"({table['qlora-vllm']['kl_k1_last10'] / reference:.1f}x).",
            f"- P3 (tis) {'holds' if p3 else 'fails'}: mean TIS weight {tis['tis_weight_mean']:.4f}, K1 KL "
            f"{tis['kl_k1_last10']:.3f} against {reference:.3f}."]


def markdown(report: dict) -> str:
    env, table = report["environment"], report["cases"]
    lines = [f"# A QLoRA student sampled by vLLM: `{PRESET}`, {report['steps']} steps, seeds "
             f"{', '.join(map(str, report['seeds']))} ({env['cpu']}, {env['cpu_count']} cores)", "",
             "Means over the seeds. gap: sampler_logprob_gap, mean |log p_vLLM - log p_student| per sampled token "
             "(nats); accuracy: avg@4 at temperature 1 on the held-out problems (by the 4-bit student itself in the "
             "QLoRA cases, by the engine in lora-vllm).", "", *verdicts(report), "",
             "| case | gap, step 1 | gap, mean | gap, max | avg@4 before | after | gain | greedy gain | "
             "K1 KL, last 10 | step s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for case, row in table.items():
        gap = [f"{row[k]:.2g}" if k in row else "-" for k in ("gap_step1", "gap_mean", "gap_max")]
        lines.append(f"| {case} | {' | '.join(gap)} | {100 * row['accuracy_before']:.1f} | "
                     f"{100 * row['accuracy_after']:.1f} | {100 * row['gain']:+.1f} | "
                     f"{100 * row['greedy_gain']:+.1f} | "
                     f"{row['kl_k1_last10']:.3f} | {row['step_s']:.2f} |")
    lines += ["", "Per run:", "", "| case | seed | gap, mean | avg@4 before | after | greedy before | after |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["runs"]:
        lines.append(f"| {r['case']} | {r['seed']} | {r['gap_mean']:.2g} | " if "gap_mean" in r else
                     f"| {r['case']} | {r['seed']} | - | ")
        lines[-1] += (f"{100 * r['accuracy_before']:.1f} | {100 * r['accuracy_after']:.1f} | "
                      f"{100 * r['greedy_before']:.1f} | {100 * r['greedy_after']:.1f} |")
    lines += ["", "Command: `" + report["command"] + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from common import publish

    from tropd_cli.environment import describe

    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tropd-bench-qlora-vllm-"))
    runs = [run_case(case, seed, args, work / f"{case}-{seed}") for seed in args.seeds for case in CASES]
    report = {"command": " ".join([sys.executable, *sys.argv]), "environment": describe(command=sys.argv),
              "steps": args.steps, "seeds": args.seeds, "problems": args.problems, "settings": COMMON,
              "cases_settings": CASES, "warn_gap": WARN_GAP, "runs": runs, "cases": summarise(runs)}
    publish(args.out, "qlora_vllm", report, markdown(report))


if __name__ == "__main__":
    main()
