"""The typed run configuration: one schema, every default defined once, presets and overrides.

A run is described by `RunConfig` (sections teacher, student, data, rollout, objective, train, eval,
output). Presets are YAML files in `presets/`; `--set section.key=value` overrides any field, parsed as
a YAML scalar and validated by the schema. Unknown keys and bad values raise `TropdError` with one line
that names the key and what is allowed.

Validation looks names up in light tables only (objective names and traits, benchmark names, prompt
generators): it imports no objective, benchmark registry or generator, and so neither torch nor the toy lab.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tropd_cli.data import is_generator
from tropd_cli.engine.objectives import GUIDED, objective_names
from tropd_cli.errors import TropdError, first_line
from tropd_cli.evaluation import benchmark_names

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

Dtype = Literal["float32", "bfloat16", "float16"]


class Section(BaseModel):
    # No number in a configuration may be infinite or NaN (`train.lr=inf` would train every weight into NaN).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        """Numbers and booleans as written: a boolean is never a number nor a number a boolean (pydantic would
        read `true` as 1), and an integer field takes `1e3` or `1000.0` only as an exact integer."""
        kinds = scalar_kinds(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool):
            if bool not in kinds and kinds & {int, float}:
                raise PydanticCustomError("strict_number", "expects a number, not a boolean")
            return value
        if kinds & {int, float} and bool in kinds:
            return value
        if bool in kinds and isinstance(value, (int, float)):
            raise PydanticCustomError("strict_bool", "expects true or false, not a number")
        if int in kinds and float not in kinds:
            number = value
            if isinstance(value, str):
                try:
                    number = float(value.strip())
                except ValueError:
                    return value
            if isinstance(number, float):
                if not number.is_integer():
                    raise PydanticCustomError("strict_int", "expects an integer")
                return int(number)
        return value


class ModelSection(Section):
    model: str = Field(description="Hub id, local folder, or toylab:teacher / toylab:student.")
    dtype: Dtype = Field("float32", description="Weight dtype when loading.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own Python code when "
                                    "loading (only for repositories you trust; `--trust-remote-code` sets it).")


class TeacherConfig(ModelSection):
    """The frozen teacher, loaded in eval mode without gradients."""

    model: str = Field("toylab:teacher", description="Hub id, local folder, or toylab:teacher.")
    allow_template_mismatch: bool = Field(
        False, description="Run although the teacher's chat template differs from the student's (preflight "
        "warns instead of failing). The teacher then scores prompts formatted with the student's template.")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="bitsandbytes weight quantization: 4bit (nf4, double quant, compute in dtype) or "
        "8bit (LLM.int8, float16 matmuls; also runs on CPU, checked with bitsandbytes 0.50).")
    backend: Literal["hf", "vllm", "server"] = Field(
        "hf", description="What scores the teacher: hf (its forward pass here: every capability), vllm (an "
        "in-process vLLM engine) or server (a vLLM OpenAI-style server at url, see `tropd serve-teacher`). "
        "vllm and server return the sampled token's log-prob and the top-k only (not entropy or full logits).")
    url: str | None = Field(None, validate_default=True,
                            description="server: base URL of the vLLM server, e.g. http://127.0.0.1:8000.")
    timeout_s: float = Field(120.0, gt=0, description="server: seconds to wait for each read of an answer.")
    deadline_s: float = Field(300.0, gt=0, description="server: seconds for all of one request, retries included; "
                              "then the run stops.")
    retries: int = Field(3, ge=0, description="server: retries of a failed request, with exponential backoff.")
    max_concurrency: int = Field(1, ge=1, description="server: requests in flight at once; a micro-batch's "
                                 "sequences are split over them.")
    served_model: str | None = Field(None, description="server: the name the server serves the teacher under "
                                     "(vLLM's --served-model-name); default: teacher.model or the path it "
                                     "resolves to, as `tropd serve-teacher` serves it. Preflight refuses a server "
                                     "that serves another model.")
    api_key_env: str | None = Field(None, description="server: name of the environment variable that holds the "
                                    "server's API key (sent as a bearer token; the key itself is never written).")

    @field_validator("url")
    @classmethod
    def _server_needs_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("backend") == "server" and not value:
            raise ValueError("teacher.backend=server needs the server's url, e.g. http://127.0.0.1:8000")
        return value
    shard: bool = Field(False, description="On several processes, split the teacher's weights over the ranks "
                        "with FSDP2 (each layer gathered while it runs; the whole teacher while it generates) "
                        "instead of a whole copy per rank; no effect on one process. Objectives that need the "
                        "teacher's full logits (gkd) need it whole.")


class LoraConfig(Section):
    """LoRA adapters (peft) on the student: only the adapters train; the run saves the adapter."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: all-linear (every linear layer but the output "
        "head), a list of module-name suffixes (q_proj, v_proj, ...) or a regex over full module names.")


class StudentConfig(ModelSection):
    """The trained student: every weight, LoRA adapters, or LoRA on a 4-bit base (QLoRA)."""

    model: str = Field("toylab:student", description="Hub id, local folder, or toylab:student.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit: frozen nf4 base (double quant, compute in dtype) under LoRA adapters "
        "(QLoRA); needs lora.enabled.")

    @field_validator("quantization")
    @classmethod
    def _quantized_student_needs_lora(cls, value: str, info: ValidationInfo) -> str:
        lora = info.data.get("lora")
        if value != "none" and lora is not None and not lora.enabled:
            raise ValueError("a 4-bit student trains through LoRA adapters (QLoRA): also set "
                             "student.lora.enabled=true")
        return value


class ToyTaskConfig(Section):
    """Knobs of the toy-task generator (`data.toylab`; the toy lab's `Difficulty`)."""

    min_terms: int = Field(3, ge=2, description="Fewest numbers in an expression.")
    max_terms: int = Field(5, ge=2, description="Most numbers in an expression.")
    max_operand: int = Field(9, ge=1, description="Largest number added or subtracted after the first.")
    max_value: int = Field(59, ge=2, le=999, description="Largest first term and intermediate result.")


class DataConfig(Section):
    """Where prompts come from, and how `tropd prepare` turns a dataset into a prepared folder."""

    prompts: str = Field("toylab", description="Prompt source of `distill`: toylab (the built-in toy-task "
                         "generator) or the path of a folder written by `tropd prepare`.")
    toylab: ToyTaskConfig = Field(default_factory=ToyTaskConfig, description="Toy-task difficulty knobs.")
    max_prompt_tokens: int = Field(1024, ge=1, description="prepare: drop prompts longer than this many "
                                   "tokens once chat-formatted.")
    system_prompt: str = Field("", description="prepare: system message added to prompts that have none "
                               "(empty: none).")
    thinking: bool | None = Field(None, description="prepare: enable_thinking for chat templates that read it "
                                  "(null: the template's default).")
    dedupe: bool | None = Field(None, description="prepare: drop exact duplicate prompts, keeping the first "
                                "(null: yes for files and hub datasets; no for toylab, whose generator draws with "
                                "replacement like the built-in run).")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="prepare: share of prompts held out in "
                                 "eval.jsonl (toylab uses the task's own held-out split instead).")
    seed: int | None = Field(None, description="prepare: seed of the train/eval split and of the order of "
                             "prepared prompts (null: train.seed).")
    max_train_prompts: int = Field(0, ge=0, description="prepare: keep at most this many training prompts, a "
                                   "seeded sample (0: all); bounds the cost of --teacher-drafts.")
    toylab_prompts: int = Field(0, ge=0, description="prepare --data toylab: training prompts to draw "
                                "(0: train.steps x rollout.prompts_per_step, one pass per run).")
    draft_shard_size: int = Field(64, ge=1, description="prepare --teacher-drafts: drafts per shard file; "
                                  "an interrupted prepare resumes at the first missing shard.")


class RolloutConfig(Section):
    n: int = Field(4, ge=1, description="Rollouts sampled per prompt.")
    prompts_per_step: int = Field(16, ge=1, description="Prompts per optimizer step.")
    max_new_tokens: int = Field(64, ge=1, description="Longest response sampled.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int = Field(256, ge=1, description="Most sequences per generate call.")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="What samples the rollouts: hf (transformers' generate on the training model) or "
        "vllm (an in-process vLLM engine beside training, given the new weights after every optimizer step; "
        "pip install 'tropd[vllm]').")
    importance_correction: Literal["none", "tis"] = Field(
        "none", description="Correction for a sampler whose numerics differ from the trainer's (vllm): tis "
        "multiplies each sampled token's loss by min(exp(sbar - log p_sampler), tis_cap), detached (truncated "
        "importance sampling, as verl and TRL).")
    tis_cap: float = Field(2.0, gt=0, description="Cap of the truncated importance-sampling weight.")
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vllm: fraction of the GPU's memory the engine may hold (weights and KV "
        "cache); training shares the GPU.")
    vllm_sleep: bool = Field(True, description="vllm on CUDA: release the engine's KV cache and weights while "
                             "training (sleep mode), woken for each sync and rollout; a no-op on a CPU.")
    vllm_max_model_len: int | None = Field(None, ge=1, description="vllm: longest prompt+response the engine "
                                           "plans for (null: the model's own maximum).")
    vllm_enforce_eager: bool = Field(False, description="vllm: no CUDA graphs or compilation: faster start-up, "
                                     "slower decoding.")
    vllm_kv_cache_gib: float | None = Field(None, gt=0, description="vllm: KV cache size in GiB (null: vLLM "
                                            "sizes it from vllm_gpu_memory_utilization).")

    @field_validator("importance_correction")
    @classmethod
    def _correction_needs_a_sampler(cls, value: str, info: ValidationInfo) -> str:
        if value != "none" and info.data.get("backend") == "hf":
            raise ValueError("importance correction needs a sampler other than the trainer; also set "
                             "rollout.backend=vllm")
        return value


class ObjectiveConfig(Section):
    """The loss; fields prefixed with an objective's name only apply to that objective."""

    name: str = Field("tropd", description="The distillation objective (one module of "
                      "tropd_cli/engine/objectives/ each).")
    trust: Literal["bernoulli", "hard"] = Field(
        "bernoulli", description="TrOPD trust test: M ~ Bernoulli(min(pi_T/pi_S, 1)) or [tau >= sbar].")
    outlier: Literal["fkl", "fkl_grad", "mask", "clip"] = Field(
        "fkl", description="TrOPD treatment of untrusted tokens: detached top-k forward-KL advantage, "
        "differentiable top-k forward KL, no signal, or the reward floored at log(lambda/(1-lambda)).")
    top_k: int = Field(64, ge=1, description="Teacher top-k for the forward-KL terms (tropd, fkl_topk).")
    clip_lambda: float = Field(0.2, gt=0, lt=1, description="lambda of the reward floor "
                               "c = log(lambda/(1-lambda)) (tropd clip outliers, reopold).")
    eopd_top_k: int = Field(16, ge=1, description="eopd: teacher top-k of its forward-KL term.")
    eopd_entropy_min: float = Field(0.8, ge=0, description="eopd: teacher entropy (nats) above which a "
                                    "token gets the forward-KL term.")
    reopold_beta: float = Field(0.5, gt=0, le=1, description="reopold: fraction of tokens kept by student "
                                "entropy from reopold_switch_step on.")
    reopold_switch_step: int = Field(100, ge=0, description="reopold: T_switch, the step (0-based) from "
                                     "which tokens are kept by entropy instead of by the reward floor.")
    entropy_top_fraction: float = Field(0.2, gt=0, le=1, description="entropy_opd: fraction of tokens, "
                                        "highest student entropy first, that carry the OPD loss.")
    gkd_beta: float = Field(0.5, ge=0, le=1, description="gkd: generalized JSD interpolation (0 forward KL, "
                            "1 reverse KL).")
    gkd_lambda: float = Field(0.5, ge=0, le=1, description="gkd: fraction of steps trained on student "
                              "rollouts; the others on teacher-sampled responses.")
    guidance: bool = Field(False, description="tropd: off-policy guidance; rollouts start from a cached "
                           "teacher response's first l_i tokens, l_i shrinking from all to none on a cosine "
                           "schedule over train.steps.")
    guidance_beta: float = Field(0.001, ge=0, description="tropd with guidance: beta of the imitation term "
                                 "beta * CE(pi_S, y[:l_i]) on the prefix tokens.")
    fkl_form: Literal["grad", "advantage"] = Field(
        "grad", description="fkl_topk: grad, the differentiable top-k forward KL; advantage, -A_t rho_t with "
        "the detached top-k forward-KL advantage on every token (the form the paper's collapse fits).")
    reopold_form: Literal["two_stage", "static_floor"] = Field(
        "two_stage", description="reopold: two_stage (the floor mask, then student entropy from "
        "reopold_switch_step); static_floor, the floored reward on every token (the paper's \"clip outliers\" row).")
    jsd_beta: float = Field(0.5, ge=0, le=1, description="jsd_onpolicy: weight of the K1 reverse-KL term; the "
                            "top-k forward KL gets 1 - jsd_beta (0.5: the paper's JSD row).")

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in objective_names():
            raise PydanticCustomError("objective", "input should be one of: {names}",
                                      {"names": ", ".join(objective_names())})
        return value


class TrainConfig(Section):
    steps: int = Field(200, ge=1, description="Rollout batches (each gets updates_per_batch optimizer steps).")
    lr: float = Field(5e-6, gt=0, description="AdamW peak learning rate (see lr_schedule).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up: step i of the first "
                              "warmup_steps trains at lr x i / warmup_steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    updates_per_batch: int = Field(1, ge=1, description="Optimizer steps per rollout batch; after the first, "
                                   "rho = exp(s - sbar) departs from 1.")
    clip_epsilon: float | None = Field(0.2, gt=0, lt=1, description="PPO clip of rho to [1-eps, 1+eps] in "
                                       "policy-gradient objectives (null: no clip; inactive on the first "
                                       "update).")
    seed: int = Field(0, description="Seed for prompts, sampling and the trust mask.")
    micro_batch_size: int = Field(64, ge=1, description="Sequences per scoring/backward pass.")
    logit_chunk_size: int | Literal["auto"] = Field(
        "auto", description="Token positions per chunk of vocabulary logits; auto: as many as keep one "
        "[chunk, vocab] float32 buffer near 128 MiB (1024 at a 32k vocabulary, 192 at 152k).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train (`--device`).")
    autocast: Literal["auto", "none", "bfloat16", "float16"] = Field(
        "auto", description="Mixed-precision forward passes; auto: bfloat16 on a CUDA device that supports "
        "it, none elsewhere. Weights, gradients and optimizer states keep their dtype.")
    gradient_checkpointing: bool = Field(False, description="Recompute the student's layer activations in "
                                         "the backward pass: less memory, about a third more compute.")
    checkpoint_every: int = Field(50, ge=0, description="Save a resumable checkpoint every N steps (and at "
                                  "the end and on Ctrl-C); 0: only at the end and on Ctrl-C.")
    checkpoint_keep: int = Field(2, ge=0, description="Newest checkpoints kept in checkpoints/ (0: all).")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: torch's default).")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Learning rate after the warm-up: constant, or a linear or cosine decay to "
        "lr_min_ratio x lr at the last step (transformers' schedulers).")
    lr_min_ratio: float = Field(0.0, ge=0, le=1, description="linear and cosine: the floor, as a fraction of lr "
                                "(warm-up starts from it too).")
    strategy: Literal["auto", "single", "ddp", "fsdp2"] = Field(
        "auto", description="How the student trains on the processes torchrun starts (`--nproc N`): single "
        "(one process), ddp (a whole replica per rank, gradients summed), fsdp2 (weights, gradients and AdamW "
        "states sharded over the ranks); auto: single on one process, else fsdp2 for a full student and ddp "
        "for LoRA/QLoRA.")
    grad_norm_split: bool = Field(
        False, description="Also report grad_norm_trusted and grad_norm_outlier, the norms (before clipping) of "
        "the gradient's trusted and outlier parts, and outlier_grad_share; outliers are tropd's tokens with "
        "M = 0, and for other objectives each token weighted by 1 - min(pi_T/pi_S, 1). One extra backward pass "
        "per micro-batch and one more gradient-sized buffer; one process only.")

    @field_validator("logit_chunk_size", mode="before")
    @classmethod
    def _positive_or_auto(cls, value: Any) -> int | str:
        if isinstance(value, (str, float)) and value != "auto":
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            value = int(number) if number.is_integer() else value
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise PydanticCustomError("chunk_size", "input should be a positive integer or 'auto'")


class EvalConfig(Section):
    problems: int = Field(200, ge=0, description="Held-out problems graded before and after training (and every "
                          "eval.every steps); 0: no held-out evaluation.")
    every: int = Field(0, ge=0, description="Also evaluate every N steps (0: only before and after).")
    k: int = Field(1, ge=1, description="Samples per problem (avg@k); 1 with temperature 0 is greedy.")
    temperature: float = Field(0.0, ge=0, description="Evaluation sampling temperature (0: greedy).")
    greedy: bool = Field(False, description="With a sampling temperature, also grade one greedy answer per "
                         "problem (eval_greedy_accuracy).")
    seed: int = Field(1234, description="Seed of the held-out problem draw and of eval sampling.")
    teacher: bool = Field(True, description="Also report the teacher's accuracy.")
    benchmark: str = Field("toylab", description="What the held-out evaluation asks: toylab (the toy lab's "
                           "held-out problems) or any `tropd evaluate` benchmark (custom, math500, gsm8k, ...), a "
                           "seeded subset of eval.problems of its problems.")
    data: str | None = Field(None, description="Local JSONL copy of eval.benchmark (its registry fields); null: "
                             "custom reads the prepared folder's eval.jsonl (data.prompts), hub benchmarks the hub.")

    @field_validator("benchmark")
    @classmethod
    def _known_benchmark(cls, value: str) -> str:
        if value not in benchmark_names():
            raise PydanticCustomError("benchmark", "input should be one of: {names}",
                                      {"names": ", ".join(benchmark_names())})
        return value


class OutputConfig(Section):
    dir: str = Field("runs/{preset}-{objective}-seed{seed}", description="Run folder (placeholders: "
                     "{preset}, {objective}, {seed}).")
    save_model: bool = Field(True, description="Save the final student in save_pretrained format.")
    log_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Metric sinks besides metrics.jsonl: tensorboard (event files in "
        "RUN/tensorboard; pip install 'tropd[tensorboard]') and wandb (pip install wandb; WANDB_MODE=offline "
        "needs no network).")
    wandb_project: str = Field("tropd", description="Weights & Biases project of the run.")


class RunConfig(Section):
    """Everything a distillation run needs; see `tropd presets show toylab` for an example."""

    description: str = Field("", description="One line shown by `tropd presets list`.")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _combinations(self) -> RunConfig:
        """Rules across fields, checked with the rest of the configuration (before anything is created)."""
        objective = self.objective
        if objective.guidance and objective.name not in GUIDED:
            raise PydanticCustomError("combination", "objective.guidance applies to objective.name={guided}, not "
                                      "{name}; set objective.guidance=false",
                                      {"guided": ", ".join(sorted(GUIDED)), "name": objective.name})
        if (self.eval.problems and self.eval.benchmark == "custom" and self.eval.data is None
                and is_generator(self.data.prompts)):
            raise PydanticCustomError("combination", "eval.benchmark=custom reads a local file: set eval.data to a "
                                      "JSONL file, or data.prompts to a prepared folder (its eval.jsonl)")
        if self.teacher.shard and self.teacher.backend != "hf":
            raise PydanticCustomError("combination", "teacher.shard splits the teacher loaded here, but teacher."
                                      "backend={backend} scores elsewhere; set teacher.shard=false",
                                      {"backend": self.teacher.backend})
        if self.train.grad_norm_split and self.train.strategy in ("ddp", "fsdp2"):
            raise PydanticCustomError("combination", "train.grad_norm_split needs one process (its outlier "
                                      "gradient is not summed over ranks); with train.strategy={strategy} set "
                                      "train.grad_norm_split=false", {"strategy": self.train.strategy})
        return self


def scalar_kinds(annotation: Any) -> set[type]:
    """The scalar types a field annotation admits among bool, int, float and str (Literal members by type)."""
    if annotation in (bool, int, float, str):
        return {annotation}
    kinds: set[type] = set()
    for argument in get_args(annotation):
        if get_origin(annotation) is Literal:
            kinds.add(type(argument))
        else:
            kinds |= scalar_kinds(argument)
    return kinds


def preset_path(name: str) -> Path:
    """A preset's YAML file: a name from presets/ or a path to a .yaml file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise TropdError(f"preset file not found: {candidate}")
        return candidate
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(preset_names()) or "none"
        raise TropdError(f"unknown preset '{name}'; known presets: {known}")
    return path


def preset_names() -> list[str]:
    """Names of the presets shipped in presets/."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(preset: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset, apply `section.key=value` overrides, and validate the result."""
    return load_config_file(preset_path(preset), overrides)


def load_config_file(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """A configuration file (a preset, or a run's config.yaml) with `overrides` applied, validated."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = error.problem or error.context or first_line(error)
        raise TropdError(f"{path}{where}: not valid YAML ({problem})") from None
    except yaml.YAMLError as error:
        raise TropdError(f"{path}: not valid YAML ({first_line(error)})") from None
    if not isinstance(raw, dict):
        raise TropdError(f"{path}: a configuration must be a mapping of sections")
    for override in overrides or []:
        apply_override(raw, override)
    return validate(raw, source=str(path))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `section.key=value` in a raw config mapping; the value is read as a YAML scalar."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise TropdError(f"--set expects section.key=value, got '{override}'")
    _check_key(key)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _check_key(key: str) -> None:
    """Reject a dotted key that names no field, listing the fields that exist at that level."""
    model: type[BaseModel] = RunConfig
    walked = []
    for part in key.split("."):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(walked) or "the configuration"
            raise TropdError(f"unknown config key '{key}'; {where} has: {', '.join(fields)}")
        walked.append(part)
        annotation = fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif part != key.split(".")[-1]:
            raise TropdError(f"unknown config key '{key}'; {'.'.join(walked)} is a value, not a section")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        raise TropdError(f"config key '{key}' is a section; set one of: {', '.join(model.model_fields)}")


def validate(raw: dict[str, Any], source: str) -> RunConfig:
    """Validate a raw mapping into a RunConfig, turning the first error into one line."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        if not key:  # a rule across fields: its message names them
            raise TropdError(first["msg"].removeprefix("Value error, ")) from None
        if first["type"] == "extra_forbidden":
            parent = ".".join(str(p) for p in first["loc"][:-1])
            raise TropdError(f"unknown config key '{key}' in {source}; "
                             f"{parent or 'the configuration'} has: {', '.join(_fields_at(parent))}"
                             ) from None
        raise TropdError(f"invalid value for {key}: {_shown(first['input'])} ({first['msg'].lower()})"
                         ) from None


def _shown(value: Any) -> str:
    """A rejected value as the user wrote it: YAML's true/false/null, repr for the rest."""
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).split("\n")[0]
    return repr(value)


def _fields_at(dotted: str) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in filter(None, dotted.split(".")):
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def dotted(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested configuration mapping as {"section.key": value} (a raw file's, or a model_dump's)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_yaml(config: RunConfig) -> str:
    """The fully resolved configuration as YAML, sections in schema order."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def explain_yaml(config: RunConfig, preset: str, overrides: list[str] | None = None) -> str:
    """The resolved configuration as YAML with, above each field, its description and where its value came
    from: `default` (the schema), `preset` (the preset file) or `--set`."""
    raw = yaml.safe_load(preset_path(preset).read_text()) or {}
    overridden = {override.partition("=")[0].strip() for override in overrides or []}
    lines: list[str] = []

    def walk(model: BaseModel, path: list[str], indent: str) -> None:
        for name, info in type(model).model_fields.items():
            value = getattr(model, name)
            key = ".".join([*path, name])
            if isinstance(value, BaseModel):
                doc = info.description or (type(value).__doc__ or "").strip().split("\n")[0]
                lines.append(f"{indent}# {doc}" if doc else f"{indent}#")
                lines.append(f"{indent}{name}:")
                walk(value, [*path, name], indent + "  ")
                continue
            node: Any = raw
            for part in [*path, name]:
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            origin = "--set" if key in overridden else "preset" if node is not _MISSING else "default"
            lines.append(f"{indent}# {info.description or ''} [{origin}]".replace("#  [", "# ["))
            dumped = yaml.safe_dump({name: model.model_dump(mode="json")[name]},
                                    sort_keys=False, width=1000).rstrip("\n")
            lines.extend(indent + line for line in dumped.split("\n"))

    walk(config, [], "")
    return "\n".join(lines) + "\n"


_MISSING = object()
