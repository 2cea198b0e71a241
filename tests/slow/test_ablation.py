"""bench/ablation.py --quick: every method at both mismatch levels, the report, JSON and plots; resuming."""

import json
import subprocess

import pytest
from helpers import run_bench

METHODS = ["opd", "tropd_mask", "tropd_clip", "tropd_fkl", "tropd", "fkl_topk", "eopd", "reopold", "gkd",
           "entropy_opd"]
LABELS = ["OPD", "TrOPD, mask outliers", "TrOPD, clip outliers", "TrOPD, FKL outliers",
          "TrOPD, FKL outliers + guidance", "top-k FKL alone", "EOPD", "REOPOLD", "GKD (JSD, beta 0.5)",
          "entropy OPD (top 20%)"]
ROW_KEYS = {"runs", "finished", "accuracy_after_mean", "accuracy_after_std", "gain_mean", "gain_std",
            "max_grad_norm", "median_grad_norm", "spikes", "final_trust_fraction", "response_length", "seeds"}


def ablation(*args: str) -> subprocess.CompletedProcess:
    return run_bench("ablation.py", *args)


@pytest.mark.slow
def test_quick_comparison_writes_report_json_and_plots_and_resumes(tmp_path):
    work, out = tmp_path / "work", tmp_path / "report"
    first = ablation("--quick", "--work-dir", str(work), "--out", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.count("seed 0: accuracy") == 20

    report = json.loads((out / "ablation.json").read_text())
    assert report["budget"] == "quick" and report["seeds"] == [0] and report["runs_reused"] == 0
    assert report["steps"] == 4 and report["eval"]["k"] == 1 and report["eval"]["temperature"] == 0.0
    assert list(report["levels"]) == ["shipped", "wide"]
    for level in report["levels"].values():
        assert list(level["methods"]) == METHODS
        assert level["teacher_accuracy"] == 1.0
        for row in level["methods"].values():
            assert set(row) == ROW_KEYS and row["finished"] == 1
            run = row["seeds"][0]
            assert [step for step, _ in run["accuracy_curve"]] == [0, 2, 4]
            assert run["accuracy_curve"][-1][1] == run["accuracy_after"] and len(run["grad_norm_curve"]) == 4
        assert [claim["verdict"] in ("holds", "reversed", "not resolved", "does not hold")
                for claim in level["claims"]] == [True] * 13
        assert level["methods"]["opd"]["final_trust_fraction"] == 1.0
        assert level["methods"]["eopd"]["final_trust_fraction"] is None
    assert report["levels"]["wide"]["student"]["recipe"]["shortcut_rate"] == 0.8
    assert report["levels"]["shipped"]["student"]["model"] == "toylab:student"

    markdown = (out / "ablation.md").read_text()
    for label in LABELS:
        assert markdown.count(f"\n| {label} |") == 2
    assert "## shipped pair" in markdown and "## wider mismatch" in markdown
    assert ".venv/bin/python bench/ablation.py --quick --work-dir" in markdown
    for level in ("shipped", "wide"):
        png = (out / f"ablation-{level}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 200_000
        assert f"](ablation-{level}.png)" in markdown

    # A field the schema gains later does not force a rerun; a changed setting the comparison chooses does.
    with (work / "quick" / "shipped" / "opd-seed0" / "config.yaml").open("a") as config:
        config.write("later_section:\n  later_field: 1\n")
    changed = work / "quick" / "wide" / "gkd-seed0" / "config.yaml"
    assert "gkd_beta: 0.5\n" in changed.read_text()
    changed.write_text(changed.read_text().replace("gkd_beta: 0.5\n", "gkd_beta: 0.9\n"))

    second = ablation("--quick", "--work-dir", str(work), "--out", str(out))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "building" not in second.stdout and second.stdout.count("reused") == 19
    assert "wide    gkd         seed 0: accuracy" in second.stdout
    assert "reused" not in second.stdout.split("wide    gkd")[1].splitlines()[0]
    again = json.loads((out / "ablation.json").read_text())
    assert again["runs_reused"] == 19
    assert [(entry["runs_executed"], entry["runs_reused"]) for entry in again["invocations"]] == [(20, 0), (1, 19)]
    assert "over 2 invocation(s)" in (out / "ablation.md").read_text()
    for key, level in report["levels"].items():
        for method, row in level["methods"].items():
            assert again["levels"][key]["methods"][method]["accuracy_after_mean"] == row["accuracy_after_mean"]


@pytest.mark.slow
def test_work_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "work"
    blocker.write_text("")
    result = ablation("--quick", "--work-dir", str(blocker), "--out", str(tmp_path / "report"))
    assert result.returncode == 2
    assert result.stderr == f"error: --work-dir {blocker} exists and is not a folder\n"
