"""Greedy parity of vLLM's engine with HF generate on the shipped v2 toy models (head_dim 64), the vLLM lane only:
the same responses token for token and the same held-out accuracy, graded as the toy lab grades; and a frozen
teacher's engine measuring a run's held-out accuracy through `HeldOut`, as a `teacher.backend: vllm` run does."""

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM lane, `make test-vllm`, has it)")

from tropd_cli.config import load_config  # noqa: E402
from tropd_cli.engine.generation import generate_texts  # noqa: E402
from tropd_cli.engine.rollout import SamplingParams  # noqa: E402
from tropd_cli.engine.rollout.vllm import VLLMRolloutBackend  # noqa: E402
from tropd_cli.engine.vllm_engine import EngineOptions  # noqa: E402
from tropd_cli.evaluation.heldout import HeldOut  # noqa: E402
from tropd_cli.models import TOYLAB_ASSETS, load_causal_lm, load_tokenizer  # noqa: E402
from tropd_cli.toylab.accuracy import prompt_token_ids, toy_accuracy  # noqa: E402
from tropd_cli.toylab.build import EVAL_V2  # noqa: E402
from tropd_cli.toylab.tasks import V2_DIFFICULTY, sample_problems  # noqa: E402

PROBLEMS = 60
OPTIONS = EngineOptions(dtype="float32", enforce_eager=True, kv_cache_gib=0.25, max_model_len=256)


@pytest.mark.parametrize("name", ["v2-teacher", "v2-student-e0.03"])
def test_greedy_answers_and_held_out_accuracy_through_vllm_equal_hf_on_the_v2_models(name):
    folder = TOYLAB_ASSETS / name
    tokenizer = load_tokenizer(str(folder))
    problems = sample_problems(EVAL_V2["seed"], PROBLEMS, V2_DIFFICULTY, held_out=True)
    model = load_causal_lm(f"toylab:{name}", "float32", torch.device("cpu"), trainable=False)
    engine = VLLMRolloutBackend(str(folder), None, [tokenizer.eos_token_id], OPTIONS)
    try:
        prompts = [prompt_token_ids(tokenizer, problem) for problem in problems]
        greedy = SamplingParams(EVAL_V2["max_new_tokens"], temperature=0.0)
        there, _ = generate_texts(engine, tokenizer, prompts, 1, greedy, 0)
        here, _ = generate_texts(model, tokenizer, prompts, 1, greedy, 0)
        assert there.response_ids == here.response_ids and there.finished == here.finished
        sampled = engine.generate(prompts * 2, 4, SamplingParams(EVAL_V2["max_new_tokens"], 1.0), 3)
        assert len(sampled.response_ids) == 8 * PROBLEMS  # seeded requests beyond one engine step's token budget
        by_engine = toy_accuracy(engine, tokenizer, problems, max_new_tokens=EVAL_V2["max_new_tokens"])
        by_hf = toy_accuracy(model, tokenizer, problems, max_new_tokens=EVAL_V2["max_new_tokens"])
        assert by_engine.correct_per_problem == by_hf.correct_per_problem and 0 < by_hf.accuracy
        if name == "v2-teacher":  # a run's held-out evaluation with the teacher's engine as its sampler
            config = load_config("toylab-v2", ["eval.problems=24", "eval.temperature=0"])
            held_out = HeldOut(config, tokenizer, [tokenizer.eos_token_id])
            assert held_out.accuracy(engine) == held_out.accuracy(model)
    finally:
        engine.shut_down()


def test_evaluate_with_the_vllm_backend_equals_hf_on_a_v2_model_and_its_lora_adapter(tmp_path):
    """`tropd evaluate --backend vllm` gives the HF backend's greedy answers and metrics, for a model folder and for a
    LoRA adapter over it (served by the engine as an adapter, merged by HF)."""
    import json

    from peft import LoraConfig, get_peft_model

    from tropd_cli import cli

    adapter = tmp_path / "adapter"
    base = load_causal_lm("toylab:v2-student-e0.03", "float32", torch.device("cpu"), trainable=False)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "toylab:v2-student-e0.03"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    reports = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        assert cli.main(["evaluate", "-m", "toylab:v2-student-e0.03", "-m", str(adapter), "-b", "toylab",
                         "--limit", "40", "--max-new-tokens", "64", "--backend", backend, "--out", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        results = report["benchmarks"]["toylab"]["results"]
        for metrics in results.values():
            metrics.pop("seconds")
        samples = [json.loads(line)["response"] for line in (out / "samples.jsonl").read_text().splitlines()]
        reports[backend] = (results, samples, report["protocol"]["backend"])
    assert reports["vllm"][2] == "vllm" and reports["hf"][2] == "hf"
    assert reports["vllm"][:2] == reports["hf"][:2]
    results = reports["hf"][0]
    assert results["toylab:v2-student-e0.03"]["greedy"] != results[str(adapter)]["greedy"] or \
        reports["hf"][1][:40] != reports["hf"][1][40:]  # the adapter changes the answers


def test_teacher_drafts_from_a_vllm_engine_equal_hf_drafts_near_greedy(tmp_path, monkeypatch):
    """`prepare --teacher-drafts --backend vllm` on the v2 pair: the engine's drafts equal HF generate's at a
    near-greedy temperature, and no torch copy of the teacher loads."""
    import json

    from tropd_cli import cli
    from tropd_cli.data import drafts

    settings = ["teacher.model=toylab:v2-teacher", "student.model=toylab:v2-student-e0.03", "train.steps=2",
                "rollout.prompts_per_step=3", "rollout.max_new_tokens=64", "rollout.temperature=1e-6",
                "data.draft_shard_size=2", "rollout.vllm_kv_cache_gib=0.25", "rollout.vllm_enforce_eager=true"]
    loads, real_load = [], drafts.load_causal_lm
    monkeypatch.setattr(drafts, "load_causal_lm", lambda spec, *a, **k: loads.append(spec) or real_load(spec, *a, **k))
    found = {}
    for backend in ("hf", "vllm"):
        argv = ["prepare", "--preset", "toylab-v2", "--data", "toylab", "--out", str(tmp_path / backend),
                "--teacher-drafts", "--backend", backend]
        assert cli.main(argv + [arg for setting in settings for arg in ("--set", setting)]) == 0
        found[backend] = json.loads((tmp_path / backend / "manifest.json").read_text())["drafts"]
    assert loads == ["toylab:v2-teacher"]  # for the hf drafts only
    assert found["vllm"].pop("backend") == "vllm" and found["hf"].pop("backend") == "hf"
    assert found["vllm"] == found["hf"] and found["hf"]["prompts"] == 6
