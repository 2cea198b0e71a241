"""The manifest's promise: `tropd evaluate` on the shipped toy models reproduces their recorded accuracies."""

import json

import pytest

from tropd_cli import cli
from tropd_cli.models import TOYLAB_ASSETS


@pytest.mark.slow
def test_shipped_teacher_and_student_reproduce_the_manifest(tmp_path):
    manifest = json.loads((TOYLAB_ASSETS / "manifest.json").read_text())
    out = tmp_path / "eval"
    # The README's command: the defaults are the manifest's protocol (see the test below).
    assert cli.main(["evaluate", "--model", "toylab:teacher", "--model", "toylab:student", "--benchmark", "toylab",
                     "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["seed"] == manifest["eval"]["seed"]
    assert report["benchmarks"]["toylab"]["problems"] == manifest["eval"]["problems"]
    results = report["benchmarks"]["toylab"]["results"]
    for name in ("teacher", "student"):
        recorded = manifest["models"][name]
        assert results[f"toylab:{name}"]["greedy"] == recorded["held_out_accuracy"]
        correct = sum(json.loads(line)["correct"] for line in (out / "samples.jsonl").read_text().splitlines()
                      if json.loads(line)["model"] == f"toylab:{name}")
        assert correct == recorded["held_out_verdicts"]["correct"]


def test_toylab_defaults_are_the_manifest_protocol():
    from tropd_cli.evaluation.registry import get_benchmark
    from tropd_cli.evaluation.settings import EvalSettings

    protocol = json.loads((TOYLAB_ASSETS / "manifest.json").read_text())["eval"]
    toylab = get_benchmark("toylab")
    assert (toylab.problems, toylab.max_new_tokens) == (protocol["problems"], protocol["max_new_tokens"])
    assert EvalSettings.seed == protocol["seed"] and EvalSettings.temperature == 0.0
