"""Checking an export: reload it with plain transformers (peft for adapters) and compare its logits and greedy
answers with the model `--base` names; see `tolerance` for the bounds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from tropd_cli.config import RunConfig
from tropd_cli.data import is_generator
from tropd_cli.data.chat import chat_prompt_ids
from tropd_cli.data.generators import get_generator
from tropd_cli.errors import TropdError
from tropd_cli.models import DTYPES, resolve_model_path

RUN_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # student.dtype -> --dtype
EXPORT_DTYPES = {short: DTYPES[name] for name, short in RUN_DTYPES.items()}
FP32_TOLERANCE = 1e-4
# Unit roundoff u = 2^-p of a p-bit significand: rounding a weight changes it by at most u relative.
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
ROUNDING_FACTOR = 32
VERIFY_PROMPTS = ("What is 17 * 24? Think step by step.", "If 3x + 5 = 20, what is x?",
                  "Name three prime numbers greater than 10.")
VERIFY_MAX_NEW_TOKENS = 64


@dataclass
class Verification:
    """How closely the exported folder reproduces `reference` (logits over `positions` token positions)."""

    max_abs_diff: float
    tolerance: float
    greedy_identical: bool
    prompts: int
    positions: int
    reference: str = "the run's model"
    merge_diff: float | None = None  # merged float32 weights vs the same base + adapter unmerged, before the cast
    other_base_diff: float | None = None  # QLoRA: the other base + adapter vs the reference (not checked)
    other_base_greedy_identical: int | None = None  # QLoRA: prompts whose greedy answer the other base shares


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


def verify_texts(config: RunConfig) -> list[str]:
    """The verification prompts: three held-out problems of the run's prompt generator (the toy lab's), else a
    few generic questions."""
    if is_generator(config.data.prompts):
        problems = get_generator(config.data.prompts).held_out(config.eval.seed, 3, config)
        return [problem.prompt for problem in problems]
    return list(VERIFY_PROMPTS)


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], config: RunConfig, eos_ids: list[int],
           pad_id: int | None) -> list[int]:
    """The greedy response ids to one prompt (at most the run's max_new_tokens, capped at 64)."""
    input_ids = torch.tensor([prompt])
    generation = GenerationConfig(max_new_tokens=min(config.rollout.max_new_tokens, VERIFY_MAX_NEW_TOKENS),
                                  do_sample=False, eos_token_id=eos_ids, pad_token_id=pad_id)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                            generation_config=generation)
    return output[0, len(prompt):].tolist()


@torch.no_grad()
def logits(model: torch.nn.Module, sequences: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits at every position of each sequence, one at a time (no padding): [length, vocab] each."""
    return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in sequences]


def max_abs_diff(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(ours, reference, strict=True))


def load_export(folder: Path, format_: str, dtype: str, config: RunConfig) -> torch.nn.Module:
    """The export as a user loads it: transformers for a merged folder; for an adapter, its base (a hub id,
    a folder, or tropd's toylab: id resolved to the shipped folder) in float32 under peft."""
    from transformers import AutoModelForCausalLM

    remote_code = config.student.trust_remote_code
    if format_ == "adapter":
        import json

        from peft import PeftModel

        base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(base), dtype=torch.float32,
                                                     trust_remote_code=remote_code)
        return PeftModel.from_pretrained(model, folder).eval()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=remote_code)
    if model.dtype != EXPORT_DTYPES[dtype]:
        raise TropdError(f"verification failed: the export loads as {model.dtype}, not {dtype}")
    return model.eval()


def verify(model: torch.nn.Module, folder: Path, dtype: str, texts: list[str], probes: list[list[int]],
           reference: list[torch.Tensor], config: RunConfig, eos_ids: list[int],
           run_tokenizer: PreTrainedTokenizerBase, reference_dtype: str = "fp32") -> Verification:
    """Compare the reloaded export `model` with the reference's logits and greedy answers (`probes`).

    Logits are compared in float32 (the loaded weights upcast, exactly) so that the difference measures what
    the export did to the weights; greedy answers come from the model as loaded, in the exported dtype. A
    reference computed in a lower precision (a 4-bit base computing in bfloat16) widens the bound to its own.
    Leaves `model` in float32.
    """
    from transformers import AutoTokenizer

    exported_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=config.student.trust_remote_code)
    prompts = [chat_prompt_ids(exported_tokenizer, text) for text in texts]
    if prompts != [chat_prompt_ids(run_tokenizer, text) for text in texts]:
        raise TropdError("verification failed: the exported tokenizer encodes the verification prompts "
                         "differently from the run's; nothing was written")
    identical = all(prompt + greedy(model, prompt, config, eos_ids, run_tokenizer.pad_token_id) == probe
                    for prompt, probe in zip(prompts, probes, strict=True))
    model.float()
    diff = max_abs_diff(logits(model, probes), reference)
    scale = max(float(values.abs().max()) for values in reference)
    bound = max(tolerance(dtype, scale), tolerance(reference_dtype, scale))
    return Verification(max_abs_diff=diff, tolerance=bound, greedy_identical=identical,
                        prompts=len(probes), positions=sum(len(ids) for ids in probes))
