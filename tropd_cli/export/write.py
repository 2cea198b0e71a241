"""Writing an export: the run's model as `--base` names it, merged (or its adapter alone), saved and checked.

`--base full` (default) merges a LoRA adapter into the full-precision base, W' = W + (alpha / r) B @ A, in
float32. For a QLoRA run that is not the model the run trained: its adapter learned against the 4-bit
weights. `--base quantized` merges into those weights, dequantized (the very values the 4-bit layers
compute with) and held in float32, and so reproduces the trained model; the reference it is checked
against is the 4-bit base with the adapter, as the run computes it. Both bases are measured, so the card
can put the other one beside this export. Each base is read from disk once: the dequantized model is made
from the full-precision and 4-bit models already loaded for the comparison.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from tropd_cli.data.chat import chat_prompt_ids
from tropd_cli.errors import TropdError
from tropd_cli.evaluation.heldout import HeldOut
from tropd_cli.export.card import BASE_LABELS
from tropd_cli.export.source import ExportSource
from tropd_cli.export.verify import (
    EXPORT_DTYPES,
    FP32_TOLERANCE,
    RUN_DTYPES,
    Verification,
    greedy,
    load_export,
    logits,
    max_abs_diff,
    verify,
    verify_texts,
)
from tropd_cli.files import writing
from tropd_cli.models import load_adapter, load_causal_lm, load_tokenizer, stop_token_ids


def run_tokenizer(source: ExportSource) -> PreTrainedTokenizerBase:
    """The tokenizer the run saved with its student, else the base model's."""
    remote_code = source.config.student.trust_remote_code
    if (source.student_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(str(source.student_dir), trust_remote_code=remote_code)
    return load_tokenizer(source.config.student.model, trust_remote_code=remote_code)


def run_model(source: ExportSource, base: str = "full") -> torch.nn.Module:
    """The run's student: the saved model, or a base with the adapter unmerged, in eval mode.

    `base`: full (float32 base), quantized (the 4-bit base computing in student.dtype, as the run trained it)
    or dequantized (the 4-bit base's weights in float32, the form a quantized merge starts from).
    """
    if not source.is_adapter:
        return load_causal_lm(str(source.student_dir), "float32", "cpu", trainable=False,
                              trust_remote_code=source.config.student.trust_remote_code)
    if base == "dequantized":
        model = dequantize_into(load_base(source, "full"), load_base(source, "quantized"))
    else:
        model = load_base(source, base)
    return load_adapter(model, source.student_dir).eval()


def load_base(source: ExportSource, base: str) -> torch.nn.Module:
    """The student's base alone: full (float32) or quantized (4 bits, nf4 with double quant, computing in
    student.dtype, as a QLoRA run loads it)."""
    student = source.config.student
    quantized = base == "quantized"
    return load_causal_lm(student.model, student.dtype if quantized else "float32", "cpu",
                          quantization="4bit" if quantized else "none", trainable=False,
                          trust_remote_code=student.trust_remote_code)


def dequantized_run_model(source: ExportSource, full_run: torch.nn.Module,
                          quantized_run: torch.nn.Module) -> torch.nn.Module:
    """`run_model(source, "dequantized")` made from the run's model over the full base and over the 4-bit base,
    already loaded, so that no base is read again; both are used up (their adapters removed, the full one's
    weights overwritten)."""
    return load_adapter(dequantize_into(full_run.unload(), quantized_run.unload()), source.student_dir).eval()


@torch.no_grad()
def dequantize_into(full: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """`full` (the float32 base) given the weights of `quantized` (the same base in 4 bits): every quantized
    linear weight dequantized, every other weight as the 4-bit model holds it."""
    import bitsandbytes as bnb

    done = set()
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            full.get_submodule(name).weight.copy_(weight.float())
            done.add(f"{name}.weight")
    for name, parameter in full.named_parameters():
        if name not in done:
            parameter.copy_(quantized.get_parameter(name).float())
    return full


def write_adapter(source: ExportSource, folder: Path, dtype: torch.dtype) -> None:
    """The run's peft adapter with its tensors cast to `dtype`; adapter_config.json as the run wrote it."""
    tensors = load_file(str(source.student_dir / "adapter_model.safetensors"))
    with writing(f"the adapter to {folder}"):
        save_file({name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                   for name, tensor in tensors.items()}, str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        shutil.copyfile(source.student_dir / "adapter_config.json", folder / "adapter_config.json")


def save_merged(model: torch.nn.Module, folder: Path, dtype: torch.dtype, eos_ids: list[int], pad_id: int | None,
                max_shard_size: str) -> None:
    """Cast and save the model as safetensors with a generation config that stops on every EOS id."""
    model.to(dtype)
    generation = model.generation_config
    generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if pad_id is not None:
        generation.pad_token_id = pad_id
    with writing(f"the merged model to {folder}"):
        model.save_pretrained(folder, max_shard_size=max_shard_size)


def write_and_verify(source: ExportSource, folder: Path, format_: str, dtype: str, base: str, verify_: bool,
                     evaluate: bool, max_shard_size: str, console: Console) -> tuple[Verification | None, dict]:
    """Write the export into `folder`; unless `verify_` is False, compare it with the model `base` names and,
    when `evaluate` and the run has a held-out evaluation, measure its accuracy (and for a QLoRA run the
    other base's). Returns the verification and the accuracies measured here."""
    tokenizer = run_tokenizer(source)
    eos_ids = stop_token_ids(source.config.student.model, tokenizer)
    config = source.config
    quantized_run = source.is_quantized
    reference_base = base if source.is_adapter else "full"
    model = None  # an adapter written without verification needs no model
    full_run = None  # --base quantized: the full base + adapter, kept to make the dequantized model from
    if verify_:
        with console.status(f"loading {'the 4-bit' if reference_base == 'quantized' else 'the float32'} run model"):
            model = run_model(source, reference_base)
    texts = verify_texts(config)
    probes: list[list[int]] = []
    reference: list[torch.Tensor] = []
    measured: dict = {}
    held_out = HeldOut(config, tokenizer, eos_ids) if verify_ and evaluate else None
    other: dict = {}
    if verify_:
        with console.status("running the run's model on the verification prompts"):
            probes = [prompt + greedy(model, prompt, config, eos_ids, tokenizer.pad_token_id)
                      for prompt in (chat_prompt_ids(tokenizer, text) for text in texts)]
            reference = logits(model, probes)
        if quantized_run:
            other_base = "full" if base == "quantized" else "quantized"
            with console.status(f"running the {other_base} base + adapter for comparison"):
                other_model = run_model(source, other_base)
                other["diff"] = max_abs_diff(logits(other_model, probes), reference)
                other["greedy"] = sum(prompt + greedy(other_model, prompt, config, eos_ids, tokenizer.pad_token_id)
                                      == probe for prompt, probe in zip(
                                          (chat_prompt_ids(tokenizer, text) for text in texts), probes))
                if held_out is not None and held_out.enabled:
                    measured["other_base_accuracy"] = held_out.accuracy(other_model)
            if base == "quantized":
                full_run = other_model
            del other_model
    merge_diff = None
    if format_ == "adapter":
        del model
        write_adapter(source, folder, EXPORT_DTYPES[dtype])
    else:
        if source.is_adapter:
            merge_base = "dequantized" if base == "quantized" else "full"
            reused = model is not None and merge_base == reference_base  # its logits are `reference`
            if not reused:
                with console.status(f"loading the {merge_base} base with the adapter"):
                    model = (dequantized_run_model(source, full_run, model) if full_run is not None
                             else run_model(source, merge_base))
                    del full_run
            with console.status(f"merging the adapter into the {merge_base} float32 base"):
                unmerged = reference if reused else logits(model, probes) if verify_ else []
                model = model.merge_and_unload()
                if verify_:
                    merge_diff = max_abs_diff(logits(model, probes), unmerged)
            if verify_ and merge_diff > FP32_TOLERANCE:
                raise TropdError(f"verification failed: merging the adapter moved the float32 logits by "
                                 f"{merge_diff:.3g} (tolerance {FP32_TOLERANCE:g}); nothing was written")
        elif model is None:
            model = run_model(source)
        with console.status(f"saving {dtype} weights"):
            save_merged(model, folder, EXPORT_DTYPES[dtype], eos_ids, tokenizer.pad_token_id, max_shard_size)
            del model
    with writing(f"the tokenizer to {folder}"):
        tokenizer.save_pretrained(folder)
    if not verify_:
        return None, measured
    with console.status("verifying the export against the run's model"):
        exported = load_export(folder, format_, dtype, config)
        if held_out is not None and held_out.enabled:
            measured["export_accuracy"] = held_out.accuracy(exported)
        reference_dtype = RUN_DTYPES[config.student.dtype] if reference_base == "quantized" else "fp32"
        verification = verify(exported, folder, dtype, texts, probes, reference, config, eos_ids, tokenizer,
                              reference_dtype)
    verification.reference = BASE_LABELS[base] if quantized_run else "the run's model"
    verification.merge_diff = merge_diff
    if other:
        verification.other_base_diff, verification.other_base_greedy_identical = other["diff"], other["greedy"]
    if verification.max_abs_diff > verification.tolerance:
        raise TropdError(f"verification failed: the exported {dtype} logits differ from "
                         f"{verification.reference} by {verification.max_abs_diff:.3g} (tolerance "
                         f"{verification.tolerance:.3g}); nothing was written (pass --no-verify to write it anyway)")
    return verification, measured
