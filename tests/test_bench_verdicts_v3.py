"""bench/ablation_v3.py's rules on made-up runs: the verdict rule with its equivalence band, the validity gate,
the learning-rate choice and P1-P4 as the predictions file states them."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import ablation_v3  # noqa: E402
from ablation_v3 import choose_lr, predictions, validity, verdict_of  # noqa: E402

from tropd_cli.errors import TropdError  # noqa: E402


def run(seed, final, start=0.2, status="finished", final_greedy=0.5, start_greedy=0.5):
    return {"seed": seed, "status": status, "final": final, "start": start, "final_greedy": final_greedy,
            "start_greedy": start_greedy}


def grid(finals=None, seeds=5):
    """Every pair x method of the design with `seeds` runs, final accuracy 0.40 unless `finals` says otherwise."""
    runs = {}
    for pair, methods in ablation_v3.DESIGN:
        for method in methods:
            values = (finals or {}).get((pair, method), [0.40] * seeds)
            runs.setdefault(pair, {})[method] = [run(seed, value) for seed, value in enumerate(values)]
    return runs


def verdicts(runs):
    return {p["key"]: p["verdict"] for p in predictions(runs)}


def test_verdict_rule_needs_two_standard_errors_and_two_points_and_calls_small_precise_differences_equivalent():
    assert verdict_of([3.0, 4.0, 5.0, 3.5, 4.5])["verdict"] == "holds"
    assert verdict_of([-3.0, -4.0, -5.0])["verdict"] == "reversed"
    assert verdict_of([1.5, 1.6, 1.4, 1.5, 1.5])["verdict"] == "equivalent"  # resolved but under 2 points
    assert verdict_of([0.5, -0.5, 0.2, -0.1, 0.0])["verdict"] == "equivalent"
    assert verdict_of([1.0, 9.0, 1.0])["verdict"] == "not resolved"  # mean 3.7 < 2 SE 5.3
    assert verdict_of([3.0, -3.0, 2.0, -2.0, 0.0])["verdict"] == "not resolved"  # 2 SE = 2.2: too wide for a null
    assert verdict_of([5.0, 6.0])["verdict"] == "not resolved"  # fewer than 3 seeds resolves nothing
    result = verdict_of([2.0, 4.0, 6.0])
    assert result["mean"] == pytest.approx(4.0) and result["se"] == pytest.approx(2.0 / 3 ** 0.5)


def test_the_validity_gate_is_opds_mean_gain_on_the_main_student():
    runs = grid({("main", "opd"): [0.30, 0.31, 0.29, 0.30, 0.30]})  # start 0.20: +10 points
    assert validity(runs)["pass"] and validity(runs)["mean"] == pytest.approx(10.0)
    runs = grid({("main", "opd"): [0.30, 0.30, 0.29, 0.29, 0.30]})
    assert not validity(runs)["pass"]


def test_the_pilot_picks_the_best_final_and_the_lower_rate_on_a_tie():
    stats = {3e-5: run(0, 0.30), 1e-4: run(0, 0.50), 3e-4: run(0, 0.50), 1e-3: run(0, 0.9, status="failed")}
    assert choose_lr(stats) == 1e-4
    with pytest.raises(TropdError, match="no pilot run finished"):
        choose_lr({1e-3: run(0, 0.9, status="failed")})


def test_p1_to_p3_hold_when_fkl_leads_and_the_gap_widens_and_p4_holds_when_nothing_gains():
    finals = {("main", "opd"): [0.40, 0.41, 0.39, 0.40, 0.40], ("main", "fkl"): [0.50, 0.52, 0.49, 0.50, 0.51],
              ("main", "mask"): [0.45, 0.44, 0.45, 0.46, 0.45], ("main", "clip"): [0.42, 0.41, 0.43, 0.42, 0.42],
              ("wide", "opd"): [0.30] * 5, ("wide", "fkl"): [0.50, 0.51, 0.52, 0.50, 0.50],
              ("weak", "opd"): [0.20, 0.19, 0.21, 0.20, 0.20], ("weak", "fkl"): [0.19, 0.18, 0.20, 0.19, 0.19]}
    assert verdicts(grid(finals)) == {"P1": "holds", "P2": "holds", "P3": "holds", "P4": "holds"}


def test_equal_methods_make_p1_fail_as_a_null_and_weak_teacher_gains_make_p4_fail():
    runs = grid()  # every method 0.40 from 0.20: no differences, and every method gains 20 points
    got = {p["key"]: p for p in predictions(runs)}
    assert got["P1"]["parts"][0]["verdict"] == "equivalent" and got["P1"]["verdict"] == "fails"
    assert got["P3"]["parts"][2]["outcome"] == "as predicted"  # mask gains: no collapse
    assert got["P4"]["verdict"] == "fails"  # OPD and fkl gain 20 points with the weak teacher


def test_a_cut_seed_leaves_the_verdicts_on_the_seeds_both_sides_finished():
    runs = grid({("main", "fkl"): [0.50, 0.52, 0.49, 0.50]})  # seed 4 of fkl was cut
    part = predictions(runs)[0]["parts"][0]
    assert part["seeds"] == [0, 1, 2, 3] and part["verdict"] == "holds"
    runs = grid({("main", "fkl"): [0.50, 0.52]})
    assert predictions(runs)[0]["verdict"] == "not resolved"


def test_runs_go_seed_major_so_a_cut_takes_the_last_seeds_first():
    order = ablation_v3.cells(ablation_v3.FULL)
    assert len(order) == 40 and order[:8] == [(0, pair, method) for pair, methods in ablation_v3.DESIGN
                                              for method in methods]
    assert [seed for seed, _, _ in order] == sorted(seed for seed, _, _ in order)


def test_no_comparison_runs_on_a_pair_that_fails_a_gate(tmp_path, monkeypatch):
    import json

    for name in ("v3-teacher", "v3-teacher-weak", "v3-student", "v3-student-wide"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    gates = {"teacher_greedy_accuracy": {"pass": True}, "line_start_rejection": {"pass": False},
             "outlier_token_fraction": {"pass": False}}
    (tmp_path / "manifest-v3.json").write_text(json.dumps({"gates": gates}))
    monkeypatch.setattr(ablation_v3, "TOYLAB_ASSETS", tmp_path)
    with pytest.raises(TropdError) as error:
        ablation_v3.run_comparison(ablation_v3.FULL, tmp_path / "work", tmp_path / "out", "command", 1)
    assert str(error.value) == ("the v3 pair fails its gates (line_start_rejection, outlier_token_fraction; "
                                "manifest-v3.json): no comparison runs")
    assert not (tmp_path / "work").exists()


def test_the_long_follow_up_runs_the_main_pair_only_and_judges_p1_and_p3():
    long = ablation_v3.LONG
    order = ablation_v3.cells(long)
    assert len(order) == 20 and {pair for _, pair, _ in order} == {"main"}
    assert "train.steps=360" in long.overrides and long.predictions_file.name == "ablation-v3-long-predictions.md"
    finals = {("main", "opd"): [0.40, 0.41, 0.39, 0.40, 0.40], ("main", "fkl"): [0.50, 0.52, 0.49, 0.50, 0.51],
              ("main", "mask"): [0.45, 0.44, 0.45, 0.46, 0.45], ("main", "clip"): [0.42, 0.41, 0.43, 0.42, 0.42]}
    runs = {"main": grid(finals)["main"]}
    assert {p["key"]: p["verdict"] for p in predictions(runs, long.keys)} == {"P1": "holds", "P3": "holds"}
