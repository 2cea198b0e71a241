"""The run configuration: presets, overrides, and one-line errors for bad keys and values."""

from pathlib import Path

import pytest
import yaml

from tropd_cli.config import PRESETS_DIR, RunConfig, load_config, preset_names, to_yaml
from tropd_cli.errors import TropdError


def test_every_preset_loads_against_the_schema():
    assert "toylab" in preset_names()
    for name in preset_names():
        config = load_config(name)
        assert isinstance(config, RunConfig)
        assert config.description


def test_every_preset_header_gives_the_commands_to_run_it():
    for path in PRESETS_DIR.glob("*.yaml"):
        header = [line for line in path.read_text().splitlines() if line.startswith("#")]
        assert any(f"tropd distill --preset {path.stem}" in line for line in header), path


def test_overrides_are_typed():
    config = load_config("toylab", ["rollout.n=8", "train.lr=3e-4", "objective.name=opd",
                                    "data.toylab.max_terms=6", "output.save_model=false"])
    assert config.rollout.n == 8 and isinstance(config.rollout.n, int)
    assert config.train.lr == 3e-4
    assert config.objective.name == "opd"
    assert config.data.toylab.max_terms == 6
    assert config.output.save_model is False


def test_defaults_live_in_the_schema():
    config = RunConfig()
    assert (config.train.steps, config.train.lr, config.rollout.n, config.objective.top_k) == (200, 5e-6, 4, 64)
    assert config.train.logit_chunk_size == "auto"
    assert load_config("toylab", ["train.logit_chunk_size=256"]).train.logit_chunk_size == 256


def test_resolved_yaml_round_trips(tmp_path: Path):
    config = load_config("toylab", ["train.seed=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    assert load_config(str(path)) == config
    assert list(yaml.safe_load(to_yaml(config))) == ["description", "teacher", "student", "data", "rollout",
                                                      "objective", "train", "eval", "output"]


@pytest.mark.parametrize(("override", "message"), [
    ("rollout.nn=8", "unknown config key 'rollout.nn'; rollout has: n, prompts_per_step, max_new_tokens, "
                     "temperature, top_p, batch_size, backend, importance_correction, tis_cap, "
                     "vllm_gpu_memory_utilization, vllm_sleep, vllm_max_model_len, vllm_enforce_eager, "
                     "vllm_kv_cache_gib"),
    ("bogus.key=1", "unknown config key 'bogus.key'; the configuration has: description, teacher, student, "
                    "data, rollout, objective, train, eval, output"),
    ("rollout=3", "config key 'rollout' is a section; set one of: n, prompts_per_step, max_new_tokens, "
                  "temperature, top_p, batch_size, backend, importance_correction, tis_cap, "
                  "vllm_gpu_memory_utilization, vllm_sleep, vllm_max_model_len, vllm_enforce_eager, "
                  "vllm_kv_cache_gib"),
    ("rollout.n.x=3", "unknown config key 'rollout.n.x'; rollout.n is a value, not a section"),
    ("rollout.n=abc", "invalid value for rollout.n: 'abc' (input should be a valid integer, unable to parse "
                      "string as an integer)"),
    ("rollout.n=0", "invalid value for rollout.n: 0 (input should be greater than or equal to 1)"),
    ("objective.name=ppo", "invalid value for objective.name: 'ppo' (input should be one of: tropd, entropy_opd, "
                           "eopd, fkl_topk, gkd, jsd_onpolicy, opd, reopold, seqkd, sft)"),
    ("objective.outlier=drop", "invalid value for objective.outlier: 'drop' (input should be 'fkl', 'fkl_grad', "
                               "'mask' or 'clip')"),
    ("train.steps", "--set expects section.key=value, got 'train.steps'"),
    ("train.logit_chunk_size=0", "invalid value for train.logit_chunk_size: 0 (input should be a positive "
                                 "integer or 'auto')"),
    ("train.logit_chunk_size=big", "invalid value for train.logit_chunk_size: 'big' (input should be a "
                                   "positive integer or 'auto')"),
])
def test_bad_overrides_give_one_line_naming_the_key(override, message):
    with pytest.raises(TropdError) as error:
        load_config("toylab", [override])
    assert str(error.value) == message


def test_unknown_key_in_a_preset_file_is_named(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(TropdError) as error:
        load_config(str(path))
    assert str(error.value).startswith(f"unknown config key 'train.stepz' in {path}; train has: steps, lr,")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(TropdError, match=r"^unknown preset 'nope'; known presets: .*toylab"):
        load_config("nope")


def test_malformed_yaml_is_reported(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [\n")
    with pytest.raises(TropdError, match=r"broken.yaml:2:1: not valid YAML"):
        load_config(str(path))


@pytest.mark.parametrize(("override", "expected"), [
    ("train.steps=1e3", 1000), ("train.steps=2.0", 2), ("train.steps=1_000", 1000), ("train.seed=-1e2", -100),
    ("train.logit_chunk_size=2e2", 200), ("train.lr=1e-3", 1e-3), ("train.lr=2", 2.0),
])
def test_numbers_in_overrides_are_read_exactly(override, expected):
    key, _, _ = override.partition("=")
    section, name = key.split(".")
    value = getattr(getattr(load_config("toylab", [override]), section), name)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("override", "message"), [
    ("train.steps=true", "invalid value for train.steps: true (expects a number, not a boolean)"),
    ("train.lr=false", "invalid value for train.lr: false (expects a number, not a boolean)"),
    ("train.steps=1.5e3", None),
    ("train.steps=2.5", "invalid value for train.steps: 2.5 (expects an integer)"),
    ("train.steps=1e-3", "invalid value for train.steps: '1e-3' (expects an integer)"),
    ("output.save_model=1", "invalid value for output.save_model: 1 (expects true or false, not a number)"),
    ("data.thinking=0", "invalid value for data.thinking: 0 (expects true or false, not a number)"),
])
def test_booleans_are_never_numbers_and_integers_are_exact(override, message):
    if message is None:
        assert load_config("toylab", [override]).train.steps == 1500
        return
    with pytest.raises(TropdError) as error:
        load_config("toylab", [override])
    assert str(error.value) == message and "\n" not in str(error.value)


def test_preset_files_are_read_as_strictly(tmp_path: Path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  steps: yes\n")
    with pytest.raises(TropdError, match="train.steps: true .expects a number, not a boolean"):
        load_config(str(path))


def test_the_names_only_tables_match_what_they_name():
    """Validation reads names, not modules: `GUIDED` is the objectives whose spec takes guidance, and the
    prompt generators are the names `data.prompts` and benchmarks may give instead of a folder or dataset."""
    from tropd_cli.data import GENERATORS, is_generator
    from tropd_cli.data.generators import get_generator
    from tropd_cli.engine.objectives import GUIDED, get_objective, objective_names

    assert GUIDED == {name for name in objective_names() if get_objective(name).guidance}
    assert all(get_generator(name).name == name for name in GENERATORS)
    assert is_generator(RunConfig().data.prompts) and not is_generator("prepared/toy")


@pytest.mark.parametrize(("overrides", "message"), [
    (["objective.name=opd", "objective.guidance=true"],
     "objective.guidance applies to objective.name=tropd, not opd; set objective.guidance=false"),
    (["eval.benchmark=custom"], "eval.benchmark=custom reads a local file: set eval.data to a JSONL file, or "
                                "data.prompts to a prepared folder (its eval.jsonl)"),
    (["eval.benchmark=gsm9k"], "invalid value for eval.benchmark: 'gsm9k' (input should be one of: gsm8k, "
                               "math500, aime24, aime25, amc23, gpqa-diamond, toylab, custom)"),
])
def test_rules_that_read_names_give_their_one_line(overrides, message):
    with pytest.raises(TropdError) as error:
        load_config("toylab", overrides)
    assert str(error.value) == message
