"""vLLM wherever tropd generates, against HF generate on the same models in the same run: `tropd evaluate`, a
two-rank `tropd distill --nproc 2`, and the weight sync after each update.

Cases, every run its own process, HF and vLLM alternating over `--repeats` rounds:

- `evaluate-fixed`: `tropd evaluate --backend hf|vllm` of a random float32 Qwen3 (head_dim 64, 5M parameters)
  with no EOS on `--prompts` prompts of a custom benchmark at `--new-tokens` new tokens: every response has exactly
  that length on both sides (the script checks the reports' mean response tokens and truncated fraction).
- `evaluate-ragged`: the same for the toy lab's v2 student on `--limit` held-out toy-lab problems (greedy, its own
  EOS): lengths differ per response.
- `ranks`: `tropd distill --preset toylab-v2 --nproc 2` for `--steps` steps with rollout.backend hf and vllm
  (every rank its own engine): the median step time over the steps after the first, and the wall time.
- `sync`: one-process `toylab-v2` runs with vLLM rollouts, a full and a LoRA student: the median `sync_s`.

Reported per side: the median (min-max) over the rounds. Evaluate's own `seconds` (generation and grading, from
its report) and the process's wall time (with loading and, for vLLM, the engine's start-up) are apart. Run it in
the vLLM environment; it writes vllm_everywhere.json (command and environment) and vllm_everywhere.md:

    .venv-vllm/bin/python bench/vllm_everywhere.py --out bench/results
    .venv-vllm/bin/python bench/vllm_everywhere.py --repeats 1 --steps 3 --new-tokens 16 --limit 8 --out /tmp/e
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

SIDES = ("hf", "vllm")
VLLM_SETTINGS = ["rollout.vllm_enforce_eager=true", "rollout.vllm_kv_cache_gib=0.5", "rollout.vllm_max_model_len=256"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="evaluate-fixed: prompts")
    parser.add_argument("--new-tokens", type=int, default=256, help="evaluate-fixed: every response's length")
    parser.add_argument("--limit", type=int, default=100, help="evaluate-ragged: toy-lab problems")
    parser.add_argument("--steps", type=int, default=8, help="ranks and sync: training steps per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def tropd(*args: str, env: dict | None = None) -> float:
    """`python -m tropd_cli *args` in its own process; its wall seconds (a failure stops the benchmark)."""
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tropd_cli", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"tropd {' '.join(args[:3])} ... failed: {done.stderr[-2000:]}")
    return time.perf_counter() - began


def fixed_model(folder: Path, prompts: int) -> Path:
    """The random model of `vllm_rollouts.py`'s size s, no EOS, and a custom benchmark of `prompts` prompts."""
    sys.path.insert(0, str(Path(__file__).parent))
    from vllm_rollouts import build_model

    build_model("s", folder / "model")
    rows = [{"prompt": " ".join(f"t{(7 * i + j) % 8000 + 2}" for j in range(32)), "answer": "0"}
            for i in range(prompts)]
    (folder / "bench.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def evaluate(side: str, model: str, benchmark: list[str], out: Path) -> dict:
    wall = tropd("evaluate", "-m", model, *benchmark, "--backend", side, "--out", str(out), "--overwrite")
    report = json.loads((out / "report.json").read_text())
    (metrics,) = [result for entry in report["benchmarks"].values() for result in entry["results"].values()]
    return {"wall_s": wall, "seconds": metrics["seconds"], "mean_response_tokens": metrics["mean_response_tokens"],
            "truncated_fraction": metrics["truncated_fraction"], "greedy": metrics["greedy"]}


def distill(settings: list[str], out: Path, nproc: int = 1) -> tuple[float, list[dict]]:
    args = ["distill", "--preset", "toylab-v2", "--out", str(out), "--overwrite",
            *[part for setting in [*settings, *VLLM_SETTINGS, "eval.problems=0", "output.save_model=false",
                                   "train.checkpoint_every=0", "train.threads=1"] for part in ("--set", setting)]]
    wall = tropd(*args, *(["--nproc", str(nproc)] if nproc > 1 else []))
    return wall, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_seconds(record: dict) -> float:
    return record["rollout_s"] + record["score_s"] + record["update_s"] + record.get("sync_s", 0.0)


def one_round(args: argparse.Namespace, work: Path, fixed: Path) -> dict:
    row: dict = {}
    for side in SIDES:
        row[f"evaluate-fixed/{side}"] = evaluate(side, str(fixed / "model"), [
            "-b", "custom", "--data", str(fixed / "bench.jsonl"), "--max-new-tokens", str(args.new_tokens)],
            work / f"fixed-{side}")
        row[f"evaluate-ragged/{side}"] = evaluate(side, "toylab:v2-student-e0.03", [
            "-b", "toylab", "--limit", str(args.limit), "--max-new-tokens", "64"], work / f"ragged-{side}")
    for side in SIDES:
        wall, records = distill([f"train.steps={args.steps}", f"rollout.backend={side}"], work / f"ranks-{side}", 2)
        if len(records) != args.steps:
            raise SystemExit(f"ranks/{side}: {len(records)} of {args.steps} steps")
        row[f"ranks/{side}"] = {"wall_s": wall, "step_s": statistics.median(map(step_seconds, records[1:]))}
    for student, extra in (("full", []), ("lora", ["student.lora.enabled=true"])):
        _, records = distill([f"train.steps={args.steps}", "rollout.backend=vllm", *extra], work / f"sync-{student}")
        row[f"sync/{student}"] = {"sync_s": statistics.median(r["sync_s"] for r in records),
                                  "step_s": statistics.median(map(step_seconds, records[1:]))}
    return row


def check(rounds: list[dict], args: argparse.Namespace) -> None:
    """The premises: fixed lengths really are `--new-tokens` on both sides; both sides answer alike."""
    for row in rounds:
        for side in SIDES:
            fixed = row[f"evaluate-fixed/{side}"]
            if fixed["mean_response_tokens"] != args.new_tokens or fixed["truncated_fraction"] != 1.0:
                raise SystemExit(f"evaluate-fixed/{side} generated {fixed['mean_response_tokens']} tokens on average "
                                 f"(truncated {fixed['truncated_fraction']}), not {args.new_tokens} every time")
        if row["evaluate-ragged/hf"]["greedy"] != row["evaluate-ragged/vllm"]["greedy"]:
            raise SystemExit("evaluate-ragged: the two backends' greedy accuracies differ")


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown(report: dict) -> str:
    env, table = report["environment"], report["cases"]

    def cell(name: str, key: str, digits: int = 2) -> str:
        value = table[name][key]
        return f"{value['median']:.{digits}f} ({value['min']:.{digits}f}-{value['max']:.{digits}f})"

    lines = [f"# vLLM wherever tropd generates, against HF ({env['cpu']}, {env['cpu_count']} cores, "
             f"{report['repeats']} interleaved rounds; medians, range in brackets)", "",
             "| case | HF | vLLM | HF / vLLM |", "| --- | ---: | ---: | ---: |"]
    for case, key, what in (("evaluate-fixed", "seconds", "generation + grading s"),
                            ("evaluate-fixed", "wall_s", "wall s"), ("evaluate-ragged", "seconds",
                                                                     "generation + grading s"),
                            ("evaluate-ragged", "wall_s", "wall s"), ("ranks", "step_s", "step s, 2 ranks"),
                            ("ranks", "wall_s", "wall s, 2 ranks")):
        hf, vllm = table[f"{case}/hf"][key]["median"], table[f"{case}/vllm"][key]["median"]
        lines.append(f"| {case}: {what} | {cell(f'{case}/hf', key)} | {cell(f'{case}/vllm', key)} | "
                     f"{hf / vllm:.2f} |")
    lines += ["", "| weight sync after each update | sync s | step s |", "| --- | ---: | ---: |",
              f"| full student | {cell('sync/full', 'sync_s', 4)} | {cell('sync/full', 'step_s')} |",
              f"| LoRA student | {cell('sync/lora', 'sync_s', 4)} | {cell('sync/lora', 'step_s')} |", "",
              f"evaluate-fixed: {report['prompts']} prompts x {report['new_tokens']} new tokens each; evaluate-ragged: "
              f"{report['limit']} toy-lab problems, mean response "
              f"{table['evaluate-ragged/hf']['mean_response_tokens']['median']:.1f} tokens; ranks and sync: "
              f"{report['steps']} steps of toylab-v2.", "", "Command: `" + report["command"] + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from common import publish

    from tropd_cli.environment import describe

    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tropd-bench-vllm-everywhere-"))
    fixed = fixed_model(work / "fixed", args.prompts)
    rounds = [one_round(args, work, fixed) for _ in range(args.repeats)]
    check(rounds, args)
    cases = {name: {key: spread([row[name][key] for row in rounds]) for key in rounds[0][name]}
             for name in rounds[0]}
    report = {"command": " ".join([sys.executable, *sys.argv]), "environment": describe(command=sys.argv),
              "prompts": args.prompts, "new_tokens": args.new_tokens, "limit": args.limit, "steps": args.steps,
              "repeats": args.repeats, "rounds": rounds, "cases": cases}
    publish(args.out, "vllm_everywhere", report, markdown(report))


if __name__ == "__main__":
    main()
