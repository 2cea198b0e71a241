"""Where the teacher lives, measured: `tropd distill --preset toylab-v2` with the teacher loaded here
(`teacher.backend=hf`), in an in-process vLLM engine (`vllm`), and served by vLLM's OpenAI server (`server`).

Each run is its own process of `--steps` steps (no evaluation, nothing saved); the three sides alternate over
`--repeats` rounds. Per run: the median step time and scoring time over the steps after the first, the wall time
outside the steps (imports, loading, engine start-up), and the process's peak resident memory (its
`ru_maxrss`, read when it exits). The server is started once, before the first round, by `tropd serve-teacher
--start` (its start-up and its resident memory at the end are reported apart). The script checks its premises: every run
finishes its steps with the same objective, and the served run records `teacher_loaded_here: false`.

On one machine the server and the trainer share the same cores (on this project's CI kind of machine, two):
the step time of `server` here is what a served teacher costs when it competes for the trainer's cores, an
upper bound for a server on its own GPU or machine. The memory column is what each side needs on the training
machine. Run it in the vLLM environment (`make vllm-venv`); it writes served_teacher.json (with the command and
the environment) and served_teacher.md:

    .venv-vllm/bin/python bench/served_teacher.py --out bench/results
    .venv-vllm/bin/python bench/served_teacher.py --steps 4 --repeats 1 --out /tmp/b
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

SIDES = ("hf", "vllm", "server")
PRESET = "toylab-v2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="the trainer's torch threads (train.threads)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(url: str, log: Path) -> tuple[subprocess.Popen, float]:
    """`tropd serve-teacher --start` for the preset's teacher at `url`, and the seconds until it answered."""
    command = [sys.executable, "-m", "tropd_cli", "serve-teacher", "--preset", PRESET, "--start",
               "--set", f"teacher.url={url}", "--set", "rollout.vllm_max_model_len=256"]
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2)
            return process, time.perf_counter() - began
        except OSError:
            if process.poll() is not None or time.perf_counter() - began > 300:
                raise SystemExit(f"the teacher server did not start: {log.read_text()[-2000:]}") from None
            time.sleep(1)


def distill_run(side: str, url: str, args: argparse.Namespace, folder: Path) -> dict:
    """One run in its own process; its records' medians and its peak resident memory."""
    settings = [f"train.steps={args.steps}", "eval.problems=0", "eval.every=0", "output.save_model=false",
                "train.checkpoint_every=0", f"train.threads={args.threads}", f"teacher.backend={side}",
                "rollout.vllm_enforce_eager=true", "rollout.vllm_kv_cache_gib=0.5", "rollout.vllm_max_model_len=256"]
    if side == "server":
        settings.append(f"teacher.url={url}")
    command = [sys.executable, "-m", "tropd_cli", "distill", "--preset", PRESET, "--out", str(folder),
               "--overwrite", *[part for setting in settings for part in ("--set", setting)]]
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{side} run failed: {process.stderr.read()[-2000:]}")
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    if summary["status"] != "finished" or len(records) != args.steps:
        raise SystemExit(f"{side} run: {summary['status']} after {len(records)} of {args.steps} steps")
    if summary.get("teacher_loaded_here") is not (side != "server"):
        raise SystemExit(f"{side} run records teacher_loaded_here={summary.get('teacher_loaded_here')}")
    steps = [r["rollout_s"] + r["score_s"] + r["update_s"] + r.get("sync_s", 0.0) for r in records]
    return {"objective": summary["objective"], "wall_s": wall, "step_s": statistics.median(steps[1:]),
            "score_s": statistics.median(r["score_s"] for r in records[1:]),
            "outside_steps_s": wall - sum(steps), "peak_rss_gib": usage.ru_maxrss / 2**20}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Where the teacher lives: `tropd distill --preset {PRESET}`, {report['steps']} steps per run "
             f"({env['cpu']}, {env['cpu_count']} cores)", "",
             f"Medians over {report['repeats']} interleaved rounds, (min-max) beside them. The server shares this "
             f"machine's cores with the trainer; it started in {report['server_startup_s']:.1f} s and held "
             f"{report['server_rss_gib']:.2f} GiB resident at the end.", "",
             "| teacher | step s | scoring s | s outside the steps | peak memory here, GiB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for side in SIDES:
        row = report["sides"][side]
        step = row["step_s"]
        lines.append(f"| {side} | {step['median']:.3f} ({step['min']:.3f}-{step['max']:.3f}) | "
                     f"{row['score_s']['median']:.3f} | {row['outside_steps_s']['median']:.1f} | "
                     f"{row['peak_rss_gib']['median']:.2f} |")
    lines += ["", "Command: `" + report["command"] + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import psutil
    from common import publish

    from tropd_cli.environment import describe

    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tropd-bench-served-"))
    url = f"http://127.0.0.1:{free_port()}"
    server, startup = start_server(url, work / "server.log")
    try:
        rounds = [{side: distill_run(side, url, args, work / side) for side in SIDES} for _ in range(args.repeats)]
        server_rss = sum(p.memory_info().rss for p in [psutil.Process(server.pid),
                                                         *psutil.Process(server.pid).children(recursive=True)])
    finally:
        server.terminate()
        server.wait(timeout=60)
    objectives = {r[side]["objective"] for r in rounds for side in SIDES}
    if len(objectives) != 1:
        raise SystemExit(f"the runs trained different objectives: {objectives}")
    report = {"command": " ".join([sys.executable, *sys.argv]), "environment": describe(command=sys.argv),
              "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
              "server_startup_s": startup, "server_rss_gib": server_rss / 2**30, "rounds": rounds,
              "sides": {side: {key: spread([r[side][key] for r in rounds])
                               for key in ("step_s", "score_s", "outside_steps_s", "peak_rss_gib", "wall_s")}
                        for side in SIDES}}
    publish(args.out, "served_teacher", report, markdown(report))


if __name__ == "__main__":
    main()
