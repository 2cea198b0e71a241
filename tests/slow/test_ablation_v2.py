"""bench/ablation_v2.py --quick: every method on toy lab v2, the verdicts P0-P6, report, JSON and plots; resuming."""

import json
import subprocess

import pytest
from helpers import ROOT, run_bench

METHODS = ["opd", "mask", "clip", "fkl", "fkl_guidance", "topk_grad", "topk_advantage", "jsd", "reopold"]
VERDICTS = {"holds", "reversed", "not resolved"}


def ablation(*args: str) -> subprocess.CompletedProcess:
    return run_bench("ablation_v2.py", *args)


@pytest.mark.slow
def test_quick_v2_comparison_writes_verdicts_report_and_plots_and_resumes(tmp_path):
    work, out = tmp_path / "work", tmp_path / "report"
    first = ablation("--quick", "--jobs", "2", "--work-dir", str(work), "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "12 runs: 0 reused, 12 to run, 2 at a time" in first.stdout
    assert first.stdout.count(" seed 0: sampled ") == 12

    report = json.loads((out / "ablation-v2.json").read_text())
    assert report["budget"] == "quick" and report["seeds"] == [0]
    assert sorted(report["conditions"]) == ["e0.00-lr0.0001-t1", "e0.10-lr0.0001-t1", "e0.10-lr0.0001-t2",
                                            "e0.10-lr0.0003-t1"]
    assert list(report["conditions"]["e0.10-lr0.0001-t1"]) == METHODS
    for condition in report["conditions"].values():
        for row in condition.values():
            run = row["seeds"][0]
            assert row["finished"] == 1 and run["curves"]["eval_steps"] == [0, 2, 4]
            assert len(run["curves"]["grad_norm"]) == 4 and run["outlier_grad_share"] is not None
            assert run["final"] == run["curves"]["accuracy"][-1] and run["final_greedy"] is not None
            assert run["entropy_first"] > 0 and 0 <= run["final_slip"] <= 1
    assert [p["key"] for p in report["predictions"]] == [f"P{i}" for i in range(7)]
    assert {p["verdict"] for p in report["predictions"]} <= VERDICTS
    assert all(part["verdict"] in VERDICTS for p in report["predictions"] for part in p["parts"])

    markdown = (out / "ablation-v2.md").read_text()
    predictions = (ROOT / "bench" / "results" / "ablation-v2-predictions.md").read_text()
    assert predictions in markdown  # the predictions as written, unchanged
    assert ".venv/bin/python bench/ablation_v2.py --quick --jobs 2 --work-dir" in markdown
    for name in ("ablation-v2-e0.00.png", "ablation-v2-e0.10.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and f"]({name})" in markdown

    changed = work / "quick" / "e0.10-lr0.0001-t1" / "jsd-seed0" / "config.yaml"
    assert "jsd_beta: 0.5\n" in changed.read_text()
    changed.write_text(changed.read_text().replace("jsd_beta: 0.5\n", "jsd_beta: 0.9\n"))
    second = ablation("--quick", "--jobs", "1", "--work-dir", str(work), "--out", str(out))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "12 runs: 11 reused, 1 to run, 1 at a time" in second.stdout
    assert "e0.10-lr0.0001-t1-jsd seed 0: sampled" in second.stdout
    again = json.loads((out / "ablation-v2.json").read_text())
    assert [(i["runs_executed"], i["runs_reused"]) for i in again["invocations"]] == [(12, 0), (1, 11)]


@pytest.mark.slow
def test_v2_work_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "work"
    blocker.write_text("")
    result = ablation("--quick", "--work-dir", str(blocker), "--out", str(tmp_path / "report"))
    assert result.returncode == 2
    assert result.stderr == f"error: --work-dir {blocker} exists and is not a folder\n"
