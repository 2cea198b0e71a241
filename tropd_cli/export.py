"""`tropd export`: a run's student as a merged checkpoint or a LoRA adapter, checked against the run.

A merged export loads the student's base in full precision (float32; never the 4-bit copy a QLoRA run
trained on), applies the run's adapter and merges it, W' = W + (alpha / r) * B @ A, then casts to the
chosen dtype and saves safetensors (sharded above `max_shard_size`), the tokenizer with its chat template, a
generation config with the EOS ids, a model card (README.md), `tropd_export.json` (the card's facts for
machines) and `tropd_config.yaml` (the run's resolved configuration). A full fine-tuned run exports its
weights the same way. An adapter export writes the peft adapter (in the chosen dtype) with the same files.

Verification loads the written folder with plain transformers (peft for adapters) and compares its logits
with the run's model (base + adapter unmerged, as the run loads it, in float32) over a few prompts and the
run model's greedy answers; see `tolerance` for the bounds. Everything is written into a temporary folder
next to `--out` and renamed into place only once it verified, so a failed export leaves nothing behind.
Merging and verification run on the CPU in float32, the most exact reference there is.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, PreTrainedTokenizerBase

from tropd_cli import __version__
from tropd_cli.checkpoints import CHECKPOINTS, STEP_FOLDER, list_checkpoints, verify_checkpoint
from tropd_cli.config import RunConfig, load_config_file
from tropd_cli.data.chat import chat_prompt_ids
from tropd_cli.engine.objectives import get_objective
from tropd_cli.errors import TropdError
from tropd_cli.files import OwnedFolder, atomic_write_json, atomic_write_text, writing
from tropd_cli.models import DTYPES, load_adapter, load_causal_lm, load_tokenizer, resolve_model_path, stop_token_ids
from tropd_cli.runfolder import RunFolder

FORMATS = ("merged", "adapter")
RUN_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # student.dtype -> --dtype
EXPORT_DTYPES = {short: DTYPES[name] for name, short in RUN_DTYPES.items()}
DEFAULT_MAX_SHARD_SIZE = "5GB"
SHARD_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(KB|MB|GB|TB)\s*$", re.IGNORECASE)  # what transformers parses
FP32_TOLERANCE = 1e-4
# Unit roundoff u = 2^-p of a p-bit significand: rounding a weight changes it by at most u relative.
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
ROUNDING_FACTOR = 32
VERIFY_PROMPTS = ("What is 17 * 24? Think step by step.", "If 3x + 5 = 20, what is x?",
                  "Name three prime numbers greater than 10.")
VERIFY_MAX_NEW_TOKENS = 64


@dataclass
class ExportSource:
    """What is exported: the run (its folder, configuration, summary) and which student of it."""

    run_dir: Path
    student_dir: Path
    config: RunConfig
    summary: dict  # summary.json, or for a checkpoint the summary as of that step
    checkpoint_step: int | None  # None: the run's final student

    @property
    def is_adapter(self) -> bool:
        return (self.student_dir / "adapter_config.json").is_file()

    @property
    def steps_trained(self) -> int | None:
        return self.checkpoint_step if self.checkpoint_step is not None else self.summary.get("steps_done")


@dataclass
class Verification:
    """How closely the exported folder reproduces the run's model (logits over `positions` token positions)."""

    max_abs_diff: float
    tolerance: float
    greedy_identical: bool
    prompts: int
    positions: int
    merge_diff: float | None = None  # merged float32 weights vs base + adapter unmerged, before the dtype cast
    quantized_base_diff: float | None = None  # 4-bit runs: vs the 4-bit model the run trained (not checked)


@dataclass
class ExportResult:
    out: Path
    format: str
    dtype: str
    size_bytes: int
    provenance: dict
    verification: Verification | None = field(default=None)


def find_source(path: Path, step: int | None = None) -> ExportSource:
    """The run folder and student folder named by a run folder (plus `step`) or a checkpoint folder."""
    if not path.exists():
        raise TropdError(f"'{path}' does not exist")
    checkpoint_step = None
    state: dict = {}
    folder_step = STEP_FOLDER.match(path.name)
    if folder_step and path.parent.name == CHECKPOINTS and (path / "student").is_dir():
        run = RunFolder(path.parent.parent)
        student_dir = path / "student"
        state = verify_checkpoint(path)
        checkpoint_step = state["step"] if isinstance(state.get("step"), int) else int(folder_step.group(1))
        if step is not None and step != checkpoint_step:
            raise TropdError(f"--step {step} disagrees with checkpoint folder '{path}' (step {checkpoint_step})")
        if not run.is_run():
            raise TropdError(f"checkpoint folder '{path}' is not inside a run folder (no {run.config})")
    elif RunFolder(path).is_run():
        run = RunFolder(path)
        if step is None:
            student_dir = run.student
            if not student_dir.is_dir():
                raise TropdError(f"run folder '{path}' holds no student/ (the run saved no model)"
                                 f"{_saved_steps_hint(path)}")
        else:
            checkpoint_step = step
            student_dir = run.checkpoint(step) / "student"
            if not student_dir.is_dir():
                raise TropdError(f"run folder '{path}' has no checkpoint at step {step}{_saved_steps_hint(path)}")
            state = verify_checkpoint(student_dir.parent)
    else:
        raise TropdError(f"'{path}' is not a tropd run folder (no config.yaml) or checkpoint folder "
                         f"(RUN/checkpoints/step-NNNNNN with student/)")
    config = load_config_file(run.config)
    summary = state.get("summary") if isinstance(state.get("summary"), dict) else run.read_summary()
    return ExportSource(run.path, student_dir, config, summary, checkpoint_step)


def _saved_steps_hint(run_dir: Path) -> str:
    steps = [step for step, folder in list_checkpoints(run_dir) if (folder / "student").is_dir()]
    return f"; saved checkpoints: {', '.join(map(str, steps))}" if steps else "; it saved no checkpoints"


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} when the file is missing or holds something else."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def tolerance(dtype: str, reference_scale: float) -> float:
    """Largest max |logit difference| accepted between the export and the run's model.

    fp32 exports differ from the run only by the merge's float rounding: 1e-4 absolute. Rounding a weight to
    bf16 or fp16 moves it by at most its unit roundoff u (2^-8, 2^-11) relative, and the logits move in
    proportion to their own size, so the bound is 32 * u * max|reference logit| (bf16: 12.5%, fp16: 1.6% of
    the largest logit). Rounding the shipped toy models exactly (logits in float32) moved them by up to
    4.9% (bf16) and 0.32% (fp16) of the largest logit, the toy teacher being the most sensitive; the factor
    leaves 2.5x (bf16) and 5x (fp16) room above that. The bound catches wrong or missing weights; the exact
    check of the merge itself is done in float32 before the cast (`Verification.merge_diff`).
    """
    if dtype == "fp32":
        return FP32_TOLERANCE
    return ROUNDING_FACTOR * UNIT_ROUNDOFF[dtype] * max(1.0, reference_scale)


def export(path: Path, out: Path, format_: str | None = None, dtype: str | None = None, step: int | None = None,
           verify: bool = True, overwrite: bool = False, max_shard_size: str | None = None,
           trust_remote_code: bool = False, console: Console | None = None) -> ExportResult:
    """Export a run's student (or a checkpoint's) to `out` as a merged checkpoint or an adapter;
    `trust_remote_code` lets the student's repository run its own code even when the run did not."""
    console = console or Console()
    format_ = format_ or "merged"
    if format_ not in FORMATS:
        raise TropdError(f"--format must be merged or adapter, got '{format_}'")
    source = find_source(Path(path), step)
    if trust_remote_code:
        source.config.student.trust_remote_code = True
    dtype = dtype or RUN_DTYPES[source.config.student.dtype]
    if dtype not in EXPORT_DTYPES:
        raise TropdError(f"--dtype must be bf16, fp16 or fp32, got '{dtype}'")
    if format_ == "adapter" and not source.is_adapter:
        raise TropdError(f"--format adapter needs a LoRA run; '{source.run_dir}' trained every weight "
                         f"(export it with --format merged)")
    max_shard_size = max_shard_size or DEFAULT_MAX_SHARD_SIZE
    if not SHARD_SIZE.match(max_shard_size):
        raise TropdError(f"--max-shard-size must be a size such as 5GB or 500MB, got '{max_shard_size}'")
    if source.is_adapter and not (source.student_dir / "adapter_model.safetensors").is_file():
        raise TropdError(f"adapter folder '{source.student_dir}' has no adapter_model.safetensors")
    out = Path(out)
    provenance = describe(source, format_, dtype)
    result = ExportResult(out, format_, dtype, 0, provenance)

    def fill(folder: Path) -> None:
        result.verification = _write_and_verify(source, folder, format_, dtype, verify, max_shard_size, console)
        record = {**provenance, "verification": asdict(result.verification) if result.verification else None}
        with writing(f"the export to {folder}"):
            atomic_write_json(folder / "tropd_export.json", record)
            atomic_write_text(folder / "tropd_config.yaml", RunFolder(source.run_dir).config.read_text())
            atomic_write_text(folder / "README.md", model_card(record))

    with OwnedFolder(out, "export") as target:
        _check_target(target, source, overwrite)
        with writing(f"the export {out}"):
            target.replace(fill)
    result.size_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print_export(console, result)
    return result


def _check_target(output: OwnedFolder, source: ExportSource, overwrite: bool) -> None:
    """Refuse a target that is a file, non-empty without --overwrite, or holds what is being exported."""
    out = output.target
    target = out.resolve()
    inputs = [("the run folder", source.run_dir)]
    base = Path(resolve_model_path(source.config.student.model))
    if source.is_adapter and base.is_dir():
        inputs.append(("the student's base model", base))
    for what, folder in inputs:
        folder = folder.resolve()
        if target == folder or target in folder.parents:
            raise TropdError(f"--out {out} would replace {what} it exports from; choose another --out")
    output.claim(overwrite)


def describe(source: ExportSource, format_: str, dtype: str) -> dict:
    """The facts a model card records: teacher, student base, objective, steps, data, evaluation."""
    config, summary = source.config, source.summary
    objective = config.objective
    options = get_objective(objective.name).options  # what changes what it computes; the whole section is kept too
    if not objective.guidance:
        options = tuple(name for name in options if name != "guidance_beta")
    student = config.student
    if not student.lora.enabled:
        training = "full fine-tuning"
    else:
        training = f"LoRA r={student.lora.r} alpha={student.lora.alpha} on {student.lora.target_modules}"
        if student.quantization == "4bit":
            training += " over a 4-bit (nf4) base (QLoRA)"
    evaluation = {key: summary[key] for key in ("teacher_accuracy", "student_accuracy_before") if key in summary}
    if source.checkpoint_step is None:
        if "student_accuracy_after" in summary:
            evaluation["student_accuracy"] = summary["student_accuracy_after"]
    else:
        at_step = _eval_at_step(RunFolder(source.run_dir).metrics, source.checkpoint_step)
        if at_step is not None:
            evaluation["student_accuracy"] = at_step
    return {
        "tropd_version": __version__,
        "format": format_,
        "dtype": dtype,
        "teacher": config.teacher.model,
        "student_base": student.model,
        "student_training": training,
        "objective": objective.name,
        "objective_options": {name: getattr(objective, name) for name in options},
        "objective_config": objective.model_dump(mode="json"),
        "seed": config.train.seed,
        "steps": source.steps_trained,
        "steps_planned": config.train.steps,
        "checkpoint_step": source.checkpoint_step,
        "run_status": summary.get("status"),
        "run_dir": str(source.run_dir.resolve()),
        "data": source.config.data.prompts,
        "data_fingerprint": data_fingerprint(source.config.data.prompts),
        "eval": evaluation,
        "eval_problems": config.eval.problems,
    }


def data_fingerprint(prompts: str) -> str | None:
    """The `fingerprint` of a prepared dataset's manifest.json, when `prompts` names such a folder."""
    if prompts == "toylab":
        return None
    value = _read_json(Path(prompts) / "manifest.json").get("fingerprint")
    return str(value) if value is not None else None


def _eval_at_step(metrics: Path, step: int) -> float | None:
    """The held-out accuracy logged at `step` (eval.every), if any."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step") == step and "eval_accuracy" in record:
            return record["eval_accuracy"]
    return None


# ---- writing and verifying ------------------------------------------------------------------------------------


def _write_and_verify(source: ExportSource, folder: Path, format_: str, dtype: str, verify: bool,
                      max_shard_size: str, console: Console) -> Verification | None:
    """Write the export into `folder`; compare it with the run's model unless `verify` is False."""
    tokenizer = _run_tokenizer(source)
    eos_ids = stop_token_ids(source.config.student.model, tokenizer)
    model = None  # an adapter written without verification needs no model
    if verify or format_ == "merged":
        with console.status("loading the run's model in float32"):
            model = _run_model(source)
    texts = verify_texts(source)
    probes: list[list[int]] = []
    reference: list[torch.Tensor] = []
    merge_diff = quantized = None
    if verify:
        with console.status("running the run's model on the verification prompts"):
            probes = [prompt + _greedy(model, prompt, source.config, eos_ids, tokenizer.pad_token_id)
                      for prompt in (chat_prompt_ids(tokenizer, text) for text in texts)]
            reference = _logits(model, probes)
        if source.config.student.quantization == "4bit":
            with console.status("running the 4-bit model the run trained"):
                quantized_model = _run_model(source, quantized=True)
                quantized = _max_abs_diff(_logits(quantized_model, probes), reference)
                del quantized_model
    if format_ == "adapter":
        del model
        _write_adapter(source, folder, EXPORT_DTYPES[dtype])
    else:
        if source.is_adapter:
            with console.status("merging the adapter into the float32 base"):
                model = model.merge_and_unload()
                if verify:
                    merge_diff = _max_abs_diff(_logits(model, probes), reference)
            if verify and merge_diff > FP32_TOLERANCE:
                raise TropdError(f"verification failed: merging the adapter moved the float32 logits by "
                                 f"{merge_diff:.3g} (tolerance {FP32_TOLERANCE:g}); nothing was written")
        with console.status(f"saving {dtype} weights"):
            _save_merged(model, folder, EXPORT_DTYPES[dtype], eos_ids, tokenizer.pad_token_id, max_shard_size)
            del model
    with writing(f"the tokenizer to {folder}"):
        tokenizer.save_pretrained(folder)
    if not verify:
        return None
    with console.status("verifying the export against the run's model"):
        verification = _verify(folder, format_, dtype, texts, probes, reference, source.config, eos_ids, tokenizer)
    verification.merge_diff, verification.quantized_base_diff = merge_diff, quantized
    if verification.max_abs_diff > verification.tolerance:
        raise TropdError(f"verification failed: the exported {dtype} logits differ from the run's model by "
                         f"{verification.max_abs_diff:.3g} (tolerance {verification.tolerance:.3g}); nothing was "
                         f"written (pass --no-verify to write it anyway)")
    return verification


def _run_tokenizer(source: ExportSource) -> PreTrainedTokenizerBase:
    """The tokenizer the run saved with its student, else the base model's."""
    remote_code = source.config.student.trust_remote_code
    if (source.student_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(str(source.student_dir), trust_remote_code=remote_code)
    return load_tokenizer(source.config.student.model, trust_remote_code=remote_code)


def _run_model(source: ExportSource, quantized: bool = False) -> torch.nn.Module:
    """The run's student as the run loads it: the saved model, or its base with the adapter unmerged.

    The base loads in float32 (the reference), or in 4 bits with the run's compute dtype when `quantized`.
    """
    student = source.config.student
    if not source.is_adapter:
        return load_causal_lm(str(source.student_dir), "float32", "cpu", trainable=False,
                              trust_remote_code=student.trust_remote_code)
    base = load_causal_lm(student.model, student.dtype if quantized else "float32", "cpu",
                          quantization="4bit" if quantized else "none", trainable=False,
                          trust_remote_code=student.trust_remote_code)
    return load_adapter(base, source.student_dir).eval()


def _write_adapter(source: ExportSource, folder: Path, dtype: torch.dtype) -> None:
    """The run's peft adapter with its tensors cast to `dtype`; adapter_config.json as the run wrote it."""
    tensors = load_file(str(source.student_dir / "adapter_model.safetensors"))
    with writing(f"the adapter to {folder}"):
        save_file({name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                   for name, tensor in tensors.items()}, str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copyfile(source.student_dir / "adapter_config.json", folder / "adapter_config.json")


def _save_merged(model: torch.nn.Module, folder: Path, dtype: torch.dtype, eos_ids: list[int], pad_id: int | None,
                 max_shard_size: str) -> None:
    """Cast and save the model as safetensors with a generation config that stops on every EOS id."""
    model.to(dtype)
    generation = model.generation_config
    generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if pad_id is not None:
        generation.pad_token_id = pad_id
    with writing(f"the merged model to {folder}"):
        model.save_pretrained(folder, max_shard_size=max_shard_size)


def verify_texts(source: ExportSource) -> list[str]:
    """The verification prompts: held-out toy problems on the toy lab, else a few generic questions."""
    config = source.config
    if source.config.data.prompts == "toylab":
        from tropd_cli.toylab.tasks import sample_problems

        return [problem.prompt for problem in sample_problems(config.eval.seed, 3, config.data.toylab,
                                                              held_out=True)]
    return list(VERIFY_PROMPTS)


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: list[int], config: RunConfig, eos_ids: list[int],
            pad_id: int | None) -> list[int]:
    """The greedy response ids to one prompt (at most the run's max_new_tokens, capped at 64)."""
    input_ids = torch.tensor([prompt])
    generation = GenerationConfig(max_new_tokens=min(config.rollout.max_new_tokens, VERIFY_MAX_NEW_TOKENS),
                                  do_sample=False, eos_token_id=eos_ids, pad_token_id=pad_id)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            generation_config=generation)
    return output[0, len(prompt):].tolist()


@torch.no_grad()
def _logits(model: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits at every position of each sequence, one at a time (no padding): [length, vocab] each."""
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in sequences]


def _max_abs_diff(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(ours, reference, strict=True))


def _verify(folder: Path, format_: str, dtype: str, texts: list[str], probes: list[list[int]],
            reference: list[torch.Tensor], config: RunConfig, eos_ids: list[int],
            run_tokenizer: PreTrainedTokenizerBase) -> Verification:
    """Load the export with plain transformers (peft for adapters) and compare it with the run's model.

    Logits are compared in float32 (the loaded weights upcast, exactly) so that the difference measures what
    the export did to the weights; greedy answers come from the model as loaded, in the exported dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote_code = config.student.trust_remote_code
    exported_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote_code)
    prompts = [chat_prompt_ids(exported_tokenizer, text) for text in texts]
    if prompts != [chat_prompt_ids(run_tokenizer, text) for text in texts]:
        raise TropdError("verification failed: the exported tokenizer encodes the verification prompts "
                         "differently from the run's; nothing was written")
    if format_ == "adapter":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=remote_code)
        if model.dtype != EXPORT_DTYPES[dtype]:
            raise TropdError(f"verification failed: the export loads as {model.dtype}, not {dtype}")
    model.eval()
    identical = all(prompt + _greedy(model, prompt, config, eos_ids, run_tokenizer.pad_token_id) == probe
                    for prompt, probe in zip(prompts, probes, strict=True))
    model.float()
    diff = _max_abs_diff(_logits(model, probes), reference)
    scale = max(float(logits.abs().max()) for logits in reference)
    return Verification(max_abs_diff=diff, tolerance=tolerance(dtype, scale), greedy_identical=identical,
                        prompts=len(probes), positions=sum(len(ids) for ids in probes))


# ---- reporting ------------------------------------------------------------------------------------------------


def model_card(record: dict) -> str:
    """README.md of the export: front matter for the hub, the run's provenance, and how to load it."""
    adapter = record["format"] == "adapter"
    base = record["student_base"]
    hub_base = ":" not in base and not Path(base).is_absolute() and not base.startswith(".")
    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    front += [f"base_model: {base}"] if hub_base else []
    front += ["tags:", "- tropd", "- distillation", "- on-policy-distillation", "---", ""]
    options = ", ".join(f"{name}={value}" for name, value in record["objective_options"].items())
    if record["checkpoint_step"] is not None:
        steps = f"checkpoint at step {record['steps']} of {record['steps_planned']}"
    else:
        steps = f"{record['steps']} of {record['steps_planned']} (run {record['run_status'] or 'status unknown'})"
    fingerprint = record["data_fingerprint"]
    rows = [
        ("teacher", f"`{record['teacher']}`"),
        ("student base", f"`{base}`"),
        ("training", record["student_training"]),
        ("objective", f"`{record['objective']}`" + (f" ({options})" if options else "")),
        ("steps", steps),
        ("seed", str(record["seed"])),
        ("data", f"`{record['data']}`" + (f", manifest fingerprint `{fingerprint}`" if fingerprint else "")),
    ]
    scores = [(label, record["eval"][key]) for label, key in (
        ("teacher", "teacher_accuracy"), ("student before", "student_accuracy_before"),
        ("this model", "student_accuracy"),
    ) if key in record["eval"]]
    if scores:
        rows.append((f"held-out accuracy ({record['eval_problems']} problems)",
                     ", ".join(f"{label} {100 * value:.1f}%" for label, value in scores)))
    rows.append(("export", f"{record['format']}, {record['dtype']}, tropd {record['tropd_version']}"))
    check = record.get("verification")
    if check:
        greedy = "identical" if check["greedy_identical"] else "differ"
        rows.append(("verification", f"max absolute logit difference {check['max_abs_diff']:.3g} from the run's "
                     f"model over {check['positions']} positions of {check['prompts']} prompts (tolerance "
                     f"{check['tolerance']:.3g}); greedy answers {greedy}"))
    lines = [*front, f"# {record['objective']} student of `{record['teacher']}`", "",
             f"`{base}` distilled from `{record['teacher']}` on its own samples (on-policy) with tropd.", "",
             "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    if "4-bit" in record["student_training"] and not adapter:
        lines += ["The adapter was trained on a 4-bit copy of the base and is merged here into the "
                  "full-precision base, never into quantized weights."
                  + (f" This model's logits differ from the 4-bit model the run trained by up to "
                     f"{check['quantized_base_diff']:.3g} (the base's quantization error)."
                     if check and check.get("quantized_base_diff") is not None else ""), ""]
    loader = ("from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained(folder)"
              if adapter else "model = AutoModelForCausalLM.from_pretrained(folder)")
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "", 'folder = "path/to/this/folder"', "tokenizer = AutoTokenizer.from_pretrained(folder)", loader,
              "```", "", "`tropd_config.yaml` is the run's resolved configuration; `tropd_export.json` holds these "
              "facts for machines.", ""]
    return "\n".join(lines)


def print_export(console: Console, result: ExportResult) -> None:
    """A short table: format, dtype, size and what verification measured."""
    table = Table(title=f"export of {result.provenance['run_dir']}", show_header=False)
    table.add_column("")
    table.add_column("")
    table.add_row("format", result.format)
    table.add_row("dtype", result.dtype)
    table.add_row("size", _human_size(result.size_bytes))
    check = result.verification
    if check is None:
        table.add_row("verification", "skipped (--no-verify)")
    else:
        table.add_row("max |diff|", f"{check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g}, "
                      f"{check.positions} positions)")
        if check.merge_diff is not None:
            table.add_row("merge, float32", f"{check.merge_diff:.3g} (tolerance {FP32_TOLERANCE:g})")
        if check.quantized_base_diff is not None:
            table.add_row("vs the 4-bit model", f"{check.quantized_base_diff:.3g} (quantization, not checked)")
        table.add_row("greedy text identical", "yes" if check.greedy_identical else "no")
    console.print(table)
    console.print(f"exported to {result.out}", soft_wrap=True, highlight=False)


def _human_size(size: int) -> str:
    if size < 1000:
        return f"{size} B"
    value = size / 1000
    for unit in ("KB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
