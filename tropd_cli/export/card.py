"""Model cards (README.md): for an export, and for a run's own `student/` folder.

Both state teacher, student base, training, objective, steps, data and the held-out accuracies, each
labelled with the model it was measured on: an export's own accuracy is measured on the exported weights at
export time; a number the run measured during training is labelled as the run's (for a QLoRA run, the 4-bit
model it trained, which a merge into the full-precision base does not reproduce).
"""

from __future__ import annotations

from pathlib import Path

from tropd_cli.config import EvalConfig, RunConfig
from tropd_cli.models import TOYLAB_PREFIX

BASE_LABELS = {"full": "the full-precision base + the adapter",
               "quantized": "the 4-bit base + the adapter (the model the run trained)"}
MERGED_INTO = {"full": "the full-precision base", "quantized": "the dequantized 4-bit base"}


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _front_matter(base: str, adapter: bool) -> list[str]:
    hub_base = ":" not in base and not Path(base).is_absolute() and not base.startswith(".")
    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    front += [f"base_model: {base}"] if hub_base else []
    return front + ["tags:", "- tropd", "- distillation", "- on-policy-distillation", "---", ""]


def _provenance_rows(record: dict) -> list[tuple[str, str]]:
    options = ", ".join(f"{name}={value}" for name, value in record["objective_options"].items())
    if record["checkpoint_step"] is not None:
        steps = f"checkpoint at step {record['steps']} of {record['steps_planned']}"
    else:
        steps = f"{record['steps']} of {record['steps_planned']} (run {record['run_status'] or 'status unknown'})"
    fingerprint = record["data_fingerprint"]
    return [
        ("teacher", f"`{record['teacher']}`"),
        ("student base", f"`{record['student_base']}`"),
        ("training", record["student_training"]),
        ("objective", f"`{record['objective']}`" + (f" ({options})" if options else "")),
        ("steps", steps),
        ("seed", str(record["seed"])),
        ("data", f"`{record['data']}`" + (f", manifest fingerprint `{fingerprint}`" if fingerprint else "")),
    ]


def _accuracy_label(record: dict) -> str:
    default = EvalConfig.model_fields["benchmark"].default  # a run's own benchmark, named by no setting
    benchmark = record.get("eval_benchmark", default)
    where = "" if benchmark == default else f"{benchmark}, "
    return f"held-out accuracy ({where}{record['eval_problems']} problems)"


def _loader(adapter: bool, base: str) -> list[str]:
    if not adapter:
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'folder = "path/to/this/folder"', "tokenizer = AutoTokenizer.from_pretrained(folder)",
                "model = AutoModelForCausalLM.from_pretrained(folder)"]
    if base.startswith(TOYLAB_PREFIX):
        return ["from tropd_cli.models import load_adapter, load_causal_lm, load_tokenizer", "",
                'folder = "path/to/this/folder"', "tokenizer = load_tokenizer(folder)",
                f'model = load_adapter(load_causal_lm("{base}", trainable=False), folder)  # tropd\'s toy base']
    return ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
            'folder = "path/to/this/folder"', "tokenizer = AutoTokenizer.from_pretrained(folder)",
            "model = AutoPeftModelForCausalLM.from_pretrained(folder)"]


def model_card(record: dict) -> str:
    """README.md of an export: front matter for the hub, the run's provenance, what was measured on this
    export and on what, and how to load it."""
    adapter = record["format"] == "adapter"
    base = record["student_base"]
    quantized_run = record.get("quantized_base", False)
    rows = _provenance_rows(record)
    evaluation = record["eval"]
    scores = [(label, evaluation[key]) for label, key in (("teacher", "teacher_accuracy"),
                                                          ("student before", "student_accuracy_before"))
              if key in evaluation]
    if "export_accuracy" in evaluation:
        scores.append(("this model (measured on it at export)", evaluation["export_accuracy"]))
        if "other_base_accuracy" in evaluation:
            other = "quantized" if record["base"] == "full" else "full"
            scores.append((BASE_LABELS[other], evaluation["other_base_accuracy"]))
    elif "run_accuracy" in evaluation:
        trained = "the 4-bit model the run trained, not this export" if quantized_run else "the run's model"
        scores.append((f"{trained} (measured during the run)", evaluation["run_accuracy"]))
    if scores:
        rows.append((_accuracy_label(record), ", ".join(f"{label} {_percent(value)}" for label, value in scores)))
    rows.append(("export", f"{record['format']}, {record['dtype']}, tropd {record['tropd_version']}"
                 + (f", merged into {MERGED_INTO[record['base']]}" if quantized_run and not adapter else "")))
    check = record.get("verification")
    if check:
        greedy = "identical" if check["greedy_identical"] else "differ"
        rows.append(("verification", f"max absolute logit difference {check['max_abs_diff']:.3g} from "
                     f"{check['reference']} over {check['positions']} positions of {check['prompts']} prompts "
                     f"(tolerance {check['tolerance']:.3g}); greedy answers {greedy}"))
        if check.get("other_base_diff") is not None:
            other = "quantized" if record["base"] == "full" else "full"
            rows.append(("the other base", f"{BASE_LABELS[other]}: max absolute logit difference "
                         f"{check['other_base_diff']:.3g}; greedy answers identical on "
                         f"{check['other_base_greedy_identical']} of {check['prompts']} prompts"))
    title = f"# {record['objective']} student of `{record['teacher']}`"
    lines = [*_front_matter(base, adapter), title, "",
             f"`{base}` distilled from `{record['teacher']}` on its own samples (on-policy) with tropd.", "",
             "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    if quantized_run and not adapter:
        if record["base"] == "full":
            lines += ["The adapter was trained over a 4-bit copy of the base and is merged here into the "
                      "full-precision base (`tropd export --base full`): a different model from the one the run "
                      "trained. `--base quantized` merges it into the dequantized 4-bit weights instead, "
                      "reproducing the trained model.", ""]
        else:
            lines += ["The adapter was trained over a 4-bit copy of the base and is merged here into those "
                      "4-bit weights, dequantized (`tropd export --base quantized`), so this model reproduces the "
                      "one the run trained.", ""]
    lines += ["## Use", "", "```python", *_loader(adapter, base), "```", "",
              "`tropd_config.yaml` is the run's resolved configuration; `tropd_export.json` holds these facts for "
              "machines.", ""]
    return "\n".join(lines)


def student_card(config: RunConfig, summary: dict, run_dir: Path) -> str:
    """README.md of a run's `student/` folder (in place of peft's or transformers' placeholder)."""
    from tropd_cli.export.source import run_facts

    record = run_facts(config, summary, run_dir)
    adapter = config.student.lora.enabled
    base = record["student_base"]
    rows = _provenance_rows(record)
    stopped = " (interrupted)" if summary.get("status") == "interrupted" else ""
    rows[4] = ("steps", f"{record['steps']} of {record['steps_planned']}{stopped}")
    evaluation = record["eval"]
    after = "student after" + (" (4-bit base + this adapter)" if record["quantized_base"] else "")
    scores = [(label, evaluation[key]) for label, key in (("teacher", "teacher_accuracy"),
                                                          ("student before", "student_accuracy_before"),
                                                          (after, "run_accuracy")) if key in evaluation]
    if scores:
        rows.append((_accuracy_label(record), ", ".join(f"{label} {_percent(value)}" for label, value in scores)))
    what = "LoRA adapter" if adapter else "model"
    lines = [*_front_matter(base, adapter), f"# {record['objective']} student of `{record['teacher']}`", "",
             f"The {what} of a tropd run: `{base}` distilled from `{record['teacher']}` on its own samples "
             f"(on-policy). `tropd export {run_dir}` writes a verified, self-contained copy.", "",
             "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), "",
             "## Use", "", "```python", *_loader(adapter, base), "```", "",
             "The run's `config.yaml`, `summary.json` and `metrics.jsonl` are in the run folder above this one.", ""]
    return "\n".join(lines)
