"""The toy-lab builder, and the shipped checkpoints against their manifest."""

import hashlib
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tropd_cli.models import TOYLAB_ASSETS
from tropd_cli.toylab import build

MANIFEST = TOYLAB_ASSETS / "manifest.json"


def test_build_writes_models_tokenizer_and_manifest(tmp_path, monkeypatch):
    for name in build.RECIPES:
        monkeypatch.setitem(build.RECIPES, name, {**build.RECIPES[name], "steps": 3, "warmup": 1})
    monkeypatch.setitem(build.EVAL, "problems", 8)
    manifest = build.build_toylab(tmp_path)
    for name in ("teacher", "student"):
        folder = tmp_path / name
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model).__name__ == "Qwen3ForCausalLM"
        assert AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>"
        entry = manifest["models"][name]
        assert entry["sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        assert entry["recipe"]["steps"] == 3 and 0.0 <= entry["held_out_accuracy"] <= 1.0
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert 0.0 <= manifest["student_outliers"]["implausible_fraction"] <= 1.0


def test_build_rejects_an_unknown_model(tmp_path):
    from tropd_cli.errors import TropdError

    with pytest.raises(TropdError, match="--only must be one of teacher, student, got 'tutor'"):
        build.build_toylab(tmp_path, only="tutor")


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())


def test_shipped_checkpoints_match_their_manifest(manifest):
    total = 0
    for name in ("teacher", "student"):
        weights = (TOYLAB_ASSETS / name / "model.safetensors").read_bytes()
        total += len(weights)
        assert hashlib.sha256(weights).hexdigest() == manifest["models"][name]["sha256"]
    assert total <= 20 * 2**20


def test_shipped_pair_has_the_promised_gap(manifest):
    teacher = manifest["models"]["teacher"]["held_out_accuracy"]
    student = manifest["models"]["student"]["held_out_accuracy"]
    assert teacher >= 0.90 and teacher - student >= 0.30
    assert manifest["student_outliers"]["implausible_fraction"] > 0.01


def test_build_v2_writes_the_teacher_three_students_and_their_mismatch(tmp_path, monkeypatch):
    for name in build.RECIPES_V2:
        monkeypatch.setitem(build.RECIPES_V2, name, {**build.RECIPES_V2[name], "steps": 2, "warmup": 1})
    monkeypatch.setitem(build.EVAL_V2, "problems", 4)
    monkeypatch.setitem(build.MISMATCH, "prompts", 4)
    manifest = build.build_toylab(tmp_path, lab="v2")
    names = ["v2-teacher", "v2-student-e0.00", "v2-student-e0.03", "v2-student-e0.10"]
    assert list(manifest["models"]) == names and list(manifest["mismatch"]) == names[1:]
    assert manifest["command"] == "tropd toylab build --lab v2" and manifest["difficulty"]["max_terms"] == 8
    students = [dict(manifest["models"][name]["recipe"]) for name in names[1:]]
    assert [r.pop("slip_rate") for r in students] == [0.0, 0.03, 0.1] and students[0] == students[1] == students[2]
    for name in names:
        assert AutoModelForCausalLM.from_pretrained(tmp_path / name).config.head_dim == 64
    stats = manifest["mismatch"]["v2-student-e0.10"]
    parts = ("slip_teacher_logprob", "after_slip_teacher_logprob", "other_teacher_logprob")
    assert stats["prompts"] == 4 and stats["tokens"] == sum(stats[part]["count"] for part in parts)
    assert json.loads((tmp_path / "manifest-v2.json").read_text()) == manifest
    assert not (tmp_path / "manifest.json").exists()


def test_unknown_lab_is_one_line(tmp_path):
    from tropd_cli.errors import TropdError

    with pytest.raises(TropdError, match="--lab must be one of v1, v2, v3, got 'v4'"):
        build.build_toylab(tmp_path, lab="v4")


def test_teacher_logit_scale_multiplies_every_logit(tmp_path):
    import torch

    from tropd_cli.toylab.models import new_toy_model

    source = tmp_path / "teacher"
    new_toy_model("v2-teacher", 0).save_pretrained(source)
    build.build_tokenizer().save_pretrained(source)
    build.scale_teacher_logits(source, tmp_path / "deep", 2.0)
    ids = torch.tensor([[5, 17, 900, 40, 3]])
    original = AutoModelForCausalLM.from_pretrained(source).eval()(ids).logits
    deep = AutoModelForCausalLM.from_pretrained(tmp_path / "deep").eval()(ids).logits
    torch.testing.assert_close(deep, 2 * original, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def manifest_v2():
    return json.loads((TOYLAB_ASSETS / "manifest-v2.json").read_text())


def test_shipped_v2_checkpoints_match_their_manifest(manifest_v2):
    total = 0
    for name, entry in manifest_v2["models"].items():
        weights = (TOYLAB_ASSETS / name / "model.safetensors").read_bytes()
        total += len(weights)
        assert hashlib.sha256(weights).hexdigest() == entry["sha256"]
        assert entry["command"] == f"tropd toylab build --lab v2 --only {name}"
    assert total <= 10 * 2**20


def test_shipped_v2_pair_is_a_mismatch_of_the_papers_kind(manifest_v2):
    """A teacher with entropy where lines start; students whose slips are rare, very implausible and growing
    with epsilon; nothing else differs between the students."""
    models, mismatch = manifest_v2["models"], manifest_v2["mismatch"]
    assert models["v2-teacher"]["held_out_accuracy"] >= 0.85
    assert models["v2-teacher"]["held_out_format_coverage"] > 0.5  # its greedy answers mix the forms
    slips = [mismatch[f"v2-student-e{e}"]["slip_token_fraction"] for e in ("0.00", "0.03", "0.10")]
    assert slips[0] == 0 and 0.002 < slips[1] < slips[2] < 0.02
    for name in ("v2-student-e0.03", "v2-student-e0.10"):
        stats = mismatch[name]
        assert -40 <= stats["slip_teacher_logprob"]["median"] <= -20
        assert stats["teacher_entropy_line_start"]["median"] > 1.0 > stats["teacher_entropy_elsewhere"]["median"]
        assert 30 <= stats["mean_response_tokens"] <= 55 and stats["format_coverage"] < 0.34
    recipes = [dict(models[f"v2-student-e{e}"]["recipe"]) for e in ("0.00", "0.03", "0.10")]
    assert [r.pop("slip_rate") for r in recipes] == [0.0, 0.03, 0.1] and recipes[0] == recipes[1] == recipes[2]
