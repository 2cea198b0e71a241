"""Toy lab v3's build: snapshots cut into the shipped models, the gates, and the shipped assets against their
manifest."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from tropd_cli.errors import TropdError
from tropd_cli.models import TOYLAB_ASSETS
from tropd_cli.toylab import build, build_v3

SHIPPED = ("v3-teacher", "v3-teacher-weak", "v3-student", "v3-student-wide")


@pytest.fixture
def tiny(monkeypatch):
    for name in build_v3.RECIPES_V3:
        monkeypatch.setitem(build_v3.RECIPES_V3, name, {**build_v3.RECIPES_V3[name], "steps": 4, "warmup": 1,
                                                        "checkpoint_every": 2})
    monkeypatch.setitem(build_v3.EVAL_V3, "problems", 6)
    monkeypatch.setitem(build_v3.GATE_SAMPLES, "prompts", 3)


def test_build_v3_cuts_four_models_from_two_runs_and_gates_them(tmp_path, tiny):
    manifest = build.build_toylab(tmp_path, lab="v3")
    assert sorted(manifest["models"]) == sorted(SHIPPED) and list(manifest["runs"]) == ["v3-student", "v3-teacher"]
    for name in SHIPPED:
        entry = manifest["models"][name]
        assert entry["step"] in (2, 4) and entry["run"] == ("v3-teacher" if "teacher" in name else "v3-student")
        weights = (tmp_path / name / "model.safetensors").read_bytes()
        assert entry["sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["models"]["v3-teacher"]["step"] == 4  # the teacher is the run's end
    teacher_run = manifest["runs"]["v3-teacher"]
    # a 4-step teacher never samples 95% right: every scale is tried and the largest is kept
    assert list(teacher_run["sampled_accuracy_by_logit_scale"]) == ["1", "1.5", "2", "2.5", "3"]
    assert [manifest["models"][name]["logit_scale"] for name in SHIPPED] == [3.0, 3.0, 1.0, 1.0]
    student_run = manifest["runs"]["v3-student"]["snapshot_accuracy"]
    assert sorted(student_run) == ["2", "4"]  # every student snapshot is measured
    assert manifest["runs"]["v3-teacher"]["weak_teacher_target"] == manifest["models"]["v3-student"][
        "held_out_accuracy"]
    assert list(manifest["gates"]) == list(build_v3.GATES)
    for name, entry in manifest["gates"].items():
        low, high = build_v3.GATES[name]
        assert (entry["min"], entry["max"]) == (low, high)
        assert entry["pass"] == (entry["value"] is not None and low <= entry["value"] <= high)
    main = manifest["informational"]["v3-teacher/v3-student"]
    assert main["responses"] == 3 * build_v3.GATE_SAMPLES["samples"]
    assert manifest["gates"]["line_start_rejection"]["value"] == main["rejection"]["line_start"]["rejection"]
    assert set(manifest["informational"]) == {"v3-teacher/v3-student", "v3-teacher/v3-student-wide",
                                              "v3-teacher-weak/v3-student"}
    assert manifest["build_seconds"] == pytest.approx(sum(run["build_seconds"] for run in manifest["runs"].values())
                                                      + manifest["gates_seconds"], abs=0.2)
    assert json.loads((tmp_path / "manifest-v3.json").read_text()) == manifest
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "manifest-v2.json").exists()


def test_a_teacher_built_alone_aims_its_weak_snapshot_at_the_middle_of_the_main_range(tmp_path, tiny):
    manifest = build.build_toylab(tmp_path, lab="v3", only="v3-teacher")
    assert manifest["runs"]["v3-teacher"]["weak_teacher_target"] == 0.5
    assert "gates" not in manifest and sorted(manifest["models"]) == ["v3-teacher", "v3-teacher-weak"]


def test_latest_within_takes_the_last_snapshot_in_range_before_the_run_rises_above_it():
    accuracy = {2: 0.125, 4: 0.42, 6: 0.55, 8: 0.75, 10: 0.5, 12: 0.45}
    read = []

    def accuracy_at(step):
        read.append(step)
        return accuracy[step]

    snapshots = dict.fromkeys(accuracy)
    assert build_v3.latest_within(snapshots, accuracy_at, 0.40, 0.60) == 6  # 10 and 12 come after the rise
    assert read == [2, 4, 6, 8]
    assert build_v3.latest_within(snapshots, accuracy_at, 0.10, 0.20) == 2
    # none in range: the nearest to its middle, 0.275 (0.42 is 0.145 away, 0.125 is 0.15)
    assert build_v3.latest_within(snapshots, accuracy_at, 0.20, 0.35) == 4


def test_nearest_reads_in_step_order_and_stops_above():
    accuracy = {2: 0.125, 4: 0.375, 6: 0.625, 8: 0.875, 10: 0.5}
    read = []

    def accuracy_at(step):
        read.append(step)
        return accuracy[step]

    snapshots = dict.fromkeys(accuracy)
    assert build_v3.nearest(snapshots, accuracy_at, 0.5) == 10
    read.clear()
    # 4 and 6 are equally near (a tie goes to the earlier); 10 is never read
    assert build_v3.nearest(snapshots, accuracy_at, 0.5, stop_above=0.75) == 4
    assert set(read) == {2, 4, 6, 8}
    assert build_v3.nearest(snapshots, accuracy_at, 0.6, stop_above=0.75) == 6


def test_the_teacher_gets_the_smallest_logit_scale_that_passes_its_sampled_gate(monkeypatch):
    from tropd_cli.toylab.models import new_toy_model

    model = new_toy_model("student", 0)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    base = float(model.model.norm.weight.detach().mean())

    class Report:
        def __init__(self, model, *args, **kwargs):  # accuracy grows with the logit scale: 0.5 per unit of scale
            self.accuracy = 0.5 * float(model.model.norm.weight.detach().mean()) / base

    monkeypatch.setattr(build_v3, "toy_accuracy", Report)
    scale, tried = build_v3.teacher_logit_scale(model, state, None, [])
    assert scale == 2.0 and tried == pytest.approx({"1": 0.5, "1.5": 0.75, "2": 1.0})
    monkeypatch.setitem(build_v3.GATES, "teacher_sampled_accuracy", (1.6, 1.0))
    scale, tried = build_v3.teacher_logit_scale(model, state, None, [])
    assert scale == 3.0 and list(tried) == ["1", "1.5", "2", "2.5", "3"]


def test_sharpen_scales_every_logit():
    import torch

    from tropd_cli.toylab.models import new_toy_model

    model = new_toy_model("v3-student", 0).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        before = model(ids).logits
        build_v3.sharpen(model, 2.5)
        assert torch.allclose(model(ids).logits, 2.5 * before, atol=1e-5)


def test_gate_bounds_are_inclusive_and_a_missing_value_fails():
    assert build_v3.gate("line_start_rejection", 0.10)["pass"]
    assert not build_v3.gate("line_start_rejection", 0.1001)["pass"]
    assert build_v3.gate("outlier_token_fraction", 0.005)["pass"]
    assert not build_v3.gate("outlier_responses_wrong", None)["pass"]


def test_unknown_v3_model_is_one_line(tmp_path):
    with pytest.raises(TropdError, match="--only must be one of v3-student, v3-teacher, got 'v3-tutor'"):
        build.build_toylab(tmp_path, lab="v3", only="v3-tutor")


@pytest.fixture(scope="module")
def manifest():
    return json.loads((TOYLAB_ASSETS / "manifest-v3.json").read_text())


def test_shipped_v3_models_match_their_manifest_and_stay_small(manifest):
    total = 0
    for name in SHIPPED:
        weights = (TOYLAB_ASSETS / name / "model.safetensors").read_bytes()
        total += len(weights)
        assert hashlib.sha256(weights).hexdigest() == manifest["models"][name]["sha256"]
    assert total <= 12 * 2**20


def test_shipped_v3_models_sit_where_the_lab_wants_them(manifest):
    models = manifest["models"]
    for name, (low, high) in build_v3.STUDENT_TARGETS.items():
        assert low <= models[name]["held_out_accuracy"] <= high, name
    assert models["v3-student"]["step"] > models["v3-student-wide"]["step"]
    assert models["v3-student"]["config"]["tie_word_embeddings"] is False and models["v3-student"]["logit_scale"] == 1
    assert models["v3-teacher"]["logit_scale"] == manifest["runs"]["v3-teacher"]["logit_scale"]
    weak, main = models["v3-teacher-weak"]["held_out_accuracy"], models["v3-student"]["held_out_accuracy"]
    assert abs(weak - main) <= 0.15 and models["v3-teacher-weak"]["step"] < models["v3-teacher"]["step"]
    for name, entry in manifest["gates"].items():
        assert entry["pass"] == (entry["value"] is not None and entry["min"] <= entry["value"] <= entry["max"]), name


def test_readme_quotes_v3_figures_from_the_manifest(manifest):
    """Every decimal figure of README's toy lab v3 paragraph and gate table is a number of manifest-v3.json."""
    from test_bench_figures import figures, numbers_in, quoted

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**Toy lab v3**"):readme.index("```bash\ntropd probe --preset toylab-v3")]
    numbers = numbers_in(manifest)
    found = figures(re.sub(r"`[^`]*`", "", section))
    assert len(found) >= 20
    assert [figure for figure in found if not quoted(figure, numbers)] == []
