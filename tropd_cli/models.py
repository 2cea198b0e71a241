"""The one place that loads models and tokenizers: dtype, device, 4-/8-bit, LoRA.

Model specs are hub ids, local folders, or `toylab:teacher` / `toylab:student` for the toy lab's
shipped checkpoints. A new LoRA adapter names its base by the spec it was given (`toylab:student`, a hub id),
so that a saved adapter_config.json never points into the installed package; `resolve_model_path` turns such
an id back into the shipped folder wherever an adapter's base is loaded. Loading 4-bit layers also
neutralises a bitsandbytes CPU defect (see
`disable_cpu_weight_repacking`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from tropd_cli.errors import TropdError, first_line

TOYLAB_PREFIX = "toylab:"
TOYLAB_ASSETS = Path(__file__).resolve().parent / "toylab" / "assets"
# Our own progress bars and errors speak for loading and saving; transformers' would interleave with them.
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()
# LLM.int8 layers cast float32 inputs to float16 on every call and warn each time; the cast is expected.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
# peft asks transformers for the old name of the checkpointing flag on every adapter load.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# Saving an adapter whose base is a toylab: id, peft looks for that id's config.json to see whether the
# vocabulary changed; it did not (tropd never resizes embeddings).
warnings.filterwarnings("ignore", message="Could not find a config file in toylab:", category=UserWarning)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(spec: str) -> str:
    """A loadable path or hub id for a model spec; `toylab:NAME` maps to the shipped checkpoint.

    A spec written as a path (`/`, `./`, `../`) must name an existing folder.
    """
    if spec.startswith(TOYLAB_PREFIX):
        name = spec[len(TOYLAB_PREFIX):]
        path = TOYLAB_ASSETS / name
        if not (path / "config.json").is_file():
            known = sorted(p.name for p in TOYLAB_ASSETS.iterdir() if (p / "config.json").is_file()) \
                if TOYLAB_ASSETS.is_dir() else []
            shipped = ", ".join(TOYLAB_PREFIX + k for k in known) or "none (run tropd toylab build)"
            raise TropdError(f"unknown toy-lab model '{spec}'; shipped: {shipped}")
        return str(path)
    if spec.startswith(("/", "./", "../")) and not Path(spec).is_dir():
        # Otherwise transformers reports a missing folder as a malformed hub id.
        raise TropdError(f"model folder '{spec}' does not exist")
    return spec


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safetensors(spec: str) -> None:
    """Refuse a local model folder whose weights are pickle files only (tropd never unpickles weights), saying
    how to convert it. Hub ids and folders with safetensors pass (a hub repository without safetensors fails
    when loading, with the same advice)."""
    path = Path(resolve_model_path(spec))
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise TropdError(f"model '{spec}' has pickle weights only ({', '.join(pickles[:3])}); tropd loads "
                         f"safetensors only. {_convert_hint(str(path))}")


def _convert_hint(path: str) -> str:
    return (f"If you trust the files, convert them once with: python -c \"from transformers import "
            f"AutoModelForCausalLM as M; M.from_pretrained('{path}', use_safetensors=False)"
            f".save_pretrained('{path.rstrip('/')}-safetensors')\" and use that folder")


def _load_error(what: str, spec: str, error: BaseException) -> TropdError:
    """One line for a loading failure, with what to do for custom code and missing safetensors."""
    text = first_line(error)
    if "trust_remote_code" in str(error):
        return TropdError(f"{what} '{spec}' needs its repository's own Python code (a custom architecture); if you "
                          f"trust it, pass --trust-remote-code (or set trust_remote_code: true in the model's "
                          f"section)")
    if "safetensors" in text and ("no file named" in text or "does not appear to have" in text):
        return TropdError(f"cannot load {what} '{spec}': it has no safetensors weights and tropd never reads "
                          f"pickle weights. {_convert_hint(spec)}")
    return TropdError(f"cannot load {what} '{spec}': {text}")


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last components of a model's linear module names (what LoRA target_modules can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else CPU; `cuda` without a GPU is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise TropdError("train.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def auto_dtype(device: torch.device) -> str:
    """The dtype `auto` means on `device`: bfloat16 on a GPU that computes in it, float32 elsewhere."""
    return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec, padding on the left (generation) with a pad token set."""
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error("the tokenizer of", spec, error) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@dataclass
class LoraSpec:
    """LoRA adapter settings (peft); the defaults live in the config schema (`student.lora`)."""

    r: int
    alpha: int
    dropout: float
    target_modules: list[str] | str


def load_causal_lm(spec: str, dtype: str = "float32", device: torch.device | str = "cpu",
                   quantization: str = "none", lora: LoraSpec | None = None,
                   trainable: bool = True, merge_adapter: str | None = None,
                   trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a causal LM; frozen in eval mode unless `trainable`; new LoRA adapters when `lora` is given;
    a saved peft adapter folder merged into the weights when `merge_adapter` is given. Weights are read
    from safetensors only; the repository's own code runs only with `trust_remote_code`."""
    path = resolve_model_path(spec)
    check_safetensors(spec)
    kwargs: dict = {"dtype": DTYPES[dtype], "use_safetensors": True, "trust_remote_code": trust_remote_code}
    device = torch.device(device)
    if quantization in ("4bit", "8bit"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype],
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        raise _load_error("model", spec, error) from None
    disable_cpu_weight_repacking(model)
    if quantization == "none":
        model.to(device)
    if merge_adapter is not None:
        model = load_adapter(model, merge_adapter).merge_and_unload()
    if lora is not None:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantization != "none":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        try:
            model = get_peft_model(model, LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.target_modules, task_type="CAUSAL_LM",
            ))
        except ValueError as error:
            raise TropdError(f"student.lora.target_modules {lora.target_modules!r} does not fit '{spec}' "
                             f"({first_line(error)}); its linear modules are: "
                             f"{', '.join(linear_module_names(model))} (or use all-linear)") from None
        for settings in model.peft_config.values():
            settings.base_model_name_or_path = spec  # a hub id or toylab:NAME, never a path inside the package
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def load_adapter(model: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """`model` with a saved peft adapter attached, unmerged."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, KeyError) as error:
        raise TropdError(f"cannot load adapter '{folder}': {first_line(error)}") from None


def load_model_config(spec: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The transformers configuration of a model spec (no weights are read)."""
    path = resolve_model_path(spec)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error("the config of model", spec, error) from None


def empty_model(spec: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of a spec on the meta device: its modules and parameter shapes, no memory, no weights."""
    return meta_model(load_model_config(spec, trust_remote_code), trust_remote_code)


def meta_model(config: PretrainedConfig, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of a configuration on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def stop_token_ids(spec: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation-config EOS ids
    (chat models often stop at an end-of-turn token that differs from the tokenizer's EOS)."""
    from transformers import GenerationConfig

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    try:
        generation = GenerationConfig.from_pretrained(resolve_model_path(spec))
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS alone
        return ids
    extra = generation.eos_token_id
    for token_id in extra if isinstance(extra, list) else [extra]:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights; return how many layers were changed.

    bitsandbytes 0.49/0.50 on CPUs with AVX512-BF16 repack a `Linear4bit` weight in place on its first
    eval-mode forward without gradients; afterwards training forwards compute wrong gradients and saves
    are corrupt. Layers expose the switch as `support_avx512bf16_for_cpu` (older releases lack the path).
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
