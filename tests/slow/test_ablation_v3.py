"""bench/ablation_v3.py --quick: the learning-rate pilot, then the comparison on the three v3 pairs with its
validity gate, report, JSON and plots; reuse of finished runs; the comparison refuses to start without a pilot."""

import json
import subprocess

import pytest
from helpers import ROOT, run_bench


def ablation(*args: str) -> subprocess.CompletedProcess:
    return run_bench("ablation_v3.py", *args)


@pytest.mark.slow
def test_quick_v3_pilot_then_comparison_writes_the_report_and_reuses_runs(tmp_path):
    work, out = tmp_path / "work", tmp_path / "report"
    refused = ablation("--quick", "--work-dir", str(work), "--out", str(out))
    assert refused.returncode == 2
    assert refused.stderr == (f"error: no learning-rate pilot in {out}; run first: .venv/bin/python "
                              f"bench/ablation_v3.py --pilot --quick --out {out}\n")

    pilot = ablation("--quick", "--pilot", "--work-dir", str(work), "--out", str(out))
    assert pilot.returncode == 0, pilot.stderr[-2000:]
    assert "pilot: 2 runs, 2 to run" in pilot.stdout and pilot.stderr == ""
    chosen = json.loads((out / "ablation-v3-lr-pilot.json").read_text())
    finals = {lr: row["final"] for lr, row in chosen["runs"].items()}
    assert sorted(finals) == ["0.0001", "0.001"] and chosen["seed"] == 100
    best = max(finals.values())
    assert chosen["chosen_lr"] == min(float(lr) for lr, final in finals.items() if final == best)
    assert f"chosen learning rate: {chosen['chosen_lr']:g}" in pilot.stdout
    assert "environment" in chosen and chosen["command"].startswith(".venv/bin/python bench/ablation_v3.py")

    first = ablation("--quick", "--work-dir", str(work), "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"8 runs at lr {chosen['chosen_lr']:g}: 0 reused, 8 to run, 2 at a time" in first.stdout
    assert first.stdout.count(" seed 0: sampled ") == 8 and first.stderr == ""
    report = json.loads((out / "ablation-v3.json").read_text())
    assert report["lr"] == chosen["chosen_lr"] and report["seeds"] == [0]
    assert {pair: list(methods) for pair, methods in report["conditions"].items()} == {
        "main": ["opd", "fkl", "mask", "clip"], "wide": ["opd", "fkl"], "weak": ["opd", "fkl"]}
    for methods in report["conditions"].values():
        for row in methods.values():
            run = row["seeds"][0]
            assert row["finished"] == 1 and run["curves"]["eval_steps"] == [0, 2, 4]
            assert run["final"] == run["curves"]["accuracy"][-1] and run["final_greedy"] is not None
    opd = report["conditions"]["main"]["opd"]["seeds"][0]
    gate = report["validity"]
    assert gate["gains"] == [pytest.approx(100 * (opd["final"] - opd["start"]))]
    assert gate["pass"] == (gate["mean"] >= 10)
    if gate["pass"]:  # one seed resolves nothing
        assert {p["verdict"] for p in report["predictions"]} == {"not resolved"}
    else:
        assert report["predictions"] == [] and "not in the paper's regime" in report["predictions_withheld"]
    markdown = (out / "ablation-v3.md").read_text()
    predictions = (ROOT / "bench" / "results" / "ablation-v3-predictions.md").read_text()
    assert predictions in markdown  # the predictions as written, unchanged
    assert "no run was cut" in markdown and "| 0.0001" in markdown
    for pair in ("main", "wide", "weak"):
        png = (out / f"ablation-v3-{pair}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and f"](ablation-v3-{pair}.png)" in markdown

    again = ablation("--quick", "--jobs", "1", "--work-dir", str(work), "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "8 runs at lr" in again.stdout and "8 reused, 0 to run, 1 at a time" in again.stdout
