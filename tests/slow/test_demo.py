"""The demo's promise: TrOPD on the toy lab gains at least 10 points of held-out accuracy (3 seeds)."""

import json

import pytest

from tropd_cli import cli


@pytest.mark.slow
def test_toylab_preset_gains_ten_points_on_average_over_three_seeds(tmp_path, capsys):
    gains = []
    for seed in (0, 1, 2):
        out = tmp_path / f"seed{seed}"
        assert cli.main(["distill", "--preset", "toylab", "--set", f"train.seed={seed}", "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        gains.append(summary["student_accuracy_after"] - summary["student_accuracy_before"])
        with capsys.disabled():
            print(f"\nseed {seed}: before {summary['student_accuracy_before']:.3f} "
                  f"after {summary['student_accuracy_after']:.3f} ({summary['train_seconds']:.0f}s)")
    assert sum(gains) / len(gains) >= 0.10, gains
