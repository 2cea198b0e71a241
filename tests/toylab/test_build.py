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
