"""bench/ablation_v2.py's verdicts on made-up runs: each prediction's rule as the predictions file states it."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import ablation_v2  # noqa: E402
from ablation_v2 import Cell, predictions, verdict_of  # noqa: E402


def run(seed, final, start=0.5, peak=None, tail_ratio=2.0, entropy=(0.5, 0.4), kl=(1.0, 1.0), slip=0.05,
        coverage=0.34, status="finished"):
    return {"seed": seed, "status": status, "final": final, "start": start, "peak": peak or max(final, start),
            "tail_ratio": tail_ratio, "entropy_first": entropy[0], "entropy_last": entropy[1], "kl_first": kl[0],
            "kl_last": kl[1], "final_slip": slip, "coverage_early": coverage}


def grid(by_cell=None):
    """Every pre-registered cell with three seeds of `run(...)`, overridden per (condition, method)."""
    runs = {}
    for cell in ablation_v2.full_cells():
        extra = dict((by_cell or {}).get((cell.condition, cell.method), {}))
        finals = extra.pop("finals", [0.5, 0.5, 0.5])
        runs.setdefault(cell.condition, {})[cell.method] = [run(seed, finals[seed], **extra) for seed in range(3)]
    return runs


def verdicts(runs):
    return {p["key"]: p["verdict"] for p in predictions(runs)}


E0, E03, E1 = (Cell(e, "opd").condition for e in (0.0, 0.03, 0.1))


def test_verdict_rule_needs_two_standard_errors_and_every_seed():
    assert verdict_of([3.0, 4.0, 5.0])["verdict"] == "holds"
    assert verdict_of([-3.0, -4.0, -5.0])["verdict"] == "reversed"
    assert verdict_of([3.0, 4.0, -0.5])["verdict"] == "not resolved"
    assert verdict_of([1.0, 9.0, 1.0])["verdict"] == "not resolved"  # mean 3.7 < 2 SE 5.3
    assert verdict_of([2.0])["verdict"] == "not resolved"  # one seed resolves nothing


def test_equal_methods_leave_p0_holding_and_the_rest_unresolved():
    got = verdicts(grid())
    assert got["P0"] == "holds"
    assert got["P1"] == "reversed"  # OPD's grad norm is not heavy-tailed (p99/median 2)
    assert got["P6"] == "not resolved"  # nothing degrades


def test_p0_is_reversed_by_a_resolved_difference_at_epsilon_zero():
    assert verdicts(grid({(E0, "mask"): {"finals": [0.60, 0.62, 0.61]}}))["P0"] == "reversed"


def test_p1_holds_when_opd_is_heavy_tailed_loses_entropy_and_loses_to_fkl():
    cells = {}
    for condition in (E03, E1):
        cells[(condition, "opd")] = {"finals": [0.40, 0.42, 0.41], "tail_ratio": 8.0, "entropy": (0.5, 0.1)}
        cells[(condition, "fkl")] = {"finals": [0.60, 0.63, 0.61]}
    assert verdicts(grid(cells))["P1"] == "holds"
    cells[(E03, "opd")]["tail_ratio"] = 4.0  # one part fails while the others hold: not resolved
    assert verdicts(grid(cells))["P1"] == "not resolved"


def test_p2_needs_the_gap_to_widen_with_epsilon_and_tail_depth():
    deep = Cell(0.1, "opd", scale=ablation_v2.TAIL_SCALE).condition
    cells = {(E0, "fkl"): {"finals": [0.50, 0.51, 0.50]},
             (E03, "fkl"): {"finals": [0.55, 0.56, 0.56]},
             (E1, "fkl"): {"finals": [0.60, 0.62, 0.61]},
             (deep, "fkl"): {"finals": [0.70, 0.71, 0.72]}}
    assert verdicts(grid(cells))["P2"] == "holds"
    cells[(deep, "fkl")] = {"finals": [0.50, 0.51, 0.50]}  # the tail part reversed, the others hold
    assert verdicts(grid(cells))["P2"] == "not resolved"
    shrinking = {(E0, "fkl"): {"finals": [0.70, 0.71, 0.72]}, (E03, "fkl"): {"finals": [0.60, 0.62, 0.61]}}
    assert verdicts(grid(shrinking))["P2"] == "reversed"


def test_p4_advantage_form_falling_with_growing_kl_and_gradient_form_rising():
    cells = {}
    for condition in (E03, E1):
        cells[(condition, "topk_advantage")] = {"finals": [0.40, 0.45, 0.42], "kl": (1.0, 2.0)}
        cells[(condition, "topk_grad")] = {"finals": [0.60, 0.62, 0.61]}
    assert verdicts(grid(cells))["P4"] == "holds"
    cells[(E1, "topk_advantage")] = {"finals": [0.60, 0.65, 0.62], "kl": (1.0, 2.0)}
    assert verdicts(grid(cells))["P4"] == "not resolved"  # one part reversed, the others hold
    rising = {(c, "topk_advantage"): {"finals": [0.60, 0.65, 0.62], "kl": (2.0, 1.0)} for c in (E03, E1)}
    assert verdicts(grid(rising))["P4"] == "reversed"


@pytest.mark.parametrize(("opd_drop_at", "mask_drop_at", "expected"), [
    (1e-4, 3e-4, "holds"), (3e-4, 1e-4, "reversed"), (1e-4, 1e-4, "not resolved"), (None, None, "not resolved")])
def test_p6_compares_the_lowest_degrading_learning_rate(opd_drop_at, mask_drop_at, expected):
    cells = {}
    for method, lr in (("opd", opd_drop_at), ("mask", mask_drop_at), ("fkl", mask_drop_at)):
        if lr is not None:
            cells[(Cell(0.1, method, lr=lr).condition, method)] = {"finals": [0.30, 0.31, 0.30], "peak": 0.60}
    assert verdicts(grid(cells))["P6"] == expected
