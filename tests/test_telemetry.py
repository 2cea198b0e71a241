"""metrics.jsonl is strict JSON: non-finite values are null and named."""

import json
import math

from tropd_cli.telemetry import JsonlSink, json_line


def test_finite_records_are_plain_json():
    assert json.loads(json_line({"step": 1, "loss": 0.5})) == {"step": 1, "loss": 0.5}


def test_non_finite_values_become_null_and_are_named(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    sink.log({"step": 3, "loss": 1.0, "reward_min": -math.inf, "trust_fraction": math.nan, "grad_norm": math.inf})
    sink.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "Infinity" not in line and "NaN" not in line
    record = json.loads(line, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert record == {"step": 3, "loss": 1.0, "reward_min": None, "trust_fraction": None, "grad_norm": None,
                      "nonfinite": ["reward_min", "trust_fraction", "grad_norm"]}
