"""Tests of `tropd_cli.models`: the bitsandbytes CPU-repacking guard on 4-bit layers, and load errors.

bitsandbytes 0.49/0.50 on CPUs with AVX512-BF16 repack a `Linear4bit` weight in place on its first
eval-mode forward without gradients. The repacked path has no autograd through the base weight (so
LoRA gradients upstream of it are wrong) and its state_dict is a lossy re-quantisation. Each guarded
test has an unguarded counterpart showing that, on this CPU, the same steps do go wrong without the guard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from tropd_cli.errors import TropdError
from tropd_cli.models import LoraSpec, disable_cpu_weight_repacking, load_causal_lm, resolve_model_path
from tropd_cli.toylab.models import SIZES, new_toy_model
from tropd_cli.toylab.tokenizer import build_tokenizer

# q, k, v, o, gate, up and down projections; the tied lm_head stays unquantised.
LINEARS_PER_LAYER = 7
N_LINEAR4BIT = SIZES["student"]["num_hidden_layers"] * LINEARS_PER_LAYER
CPU_HAS_AVX512BF16 = bool(has_avx512bf16())
NO_AVX512BF16 = "this CPU lacks AVX512-BF16, so bitsandbytes never repacks 4-bit weights here"
# The save round trip reloads a checkpoint that carries its own quantization_config.
IGNORE_QUANT_CONFIG_WARNING = pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
# Backward through a repacked layer: torch warns that the CPU kernel has no autograd ("::" would split
# the filter, hence the dots).
IGNORE_NO_AUTOGRAD_WARNING = pytest.mark.filterwarnings("ignore:bitsandbytes..gemv_4bit")


@pytest.fixture(scope="session")
def student_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The toy student (seed 0) and its tokenizer in save_pretrained format."""
    path = tmp_path_factory.mktemp("student")
    new_toy_model("student", 0).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def batch() -> torch.Tensor:
    """A fixed batch of token ids (numbers of the toy vocabulary), used as input and labels."""
    return torch.randint(4, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def linear4bit_layers(model: torch.nn.Module) -> list[bnb.nn.Linear4bit]:
    """The bitsandbytes 4-bit linear layers of a model (inside LoRA wrappers too)."""
    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def is_repacked(layer: bnb.nn.Linear4bit) -> bool:
    """Whether bitsandbytes has switched this layer to its AVX512-BF16 CPU layout."""
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def undo_guard(model: torch.nn.Module) -> None:
    """Re-enable bitsandbytes' CPU repacking on every 4-bit layer (the state without the guard)."""
    for layer in linear4bit_layers(model):
        layer.support_avx512bf16_for_cpu = True


def load_lora_student(path: str) -> torch.nn.Module:
    """A fresh 4-bit + LoRA student whose adapters hold the same seeded non-zero values on every load."""
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    model = load_causal_lm(path, "float32", "cpu", quantization="4bit", lora=lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # A is randomly initialised per load and B is zero: make both fixed
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def load_frozen_student(path: str) -> torch.nn.Module:
    """A fresh 4-bit student without adapters, frozen in eval mode."""
    return load_causal_lm(path, "float32", "cpu", quantization="4bit", trainable=False)


def eval_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of an eval-mode forward without gradients: the forward that triggers the repacking."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def lora_gradients(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the language-model loss on `input_ids` w.r.t. every trainable (LoRA) parameter."""
    model.train()
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_loaded_4bit_layers_have_repacking_disabled(student_path: str) -> None:
    """load_causal_lm quantises every projection to Linear4bit and switches its CPU repacking off."""
    model = load_lora_student(student_path)
    layers = linear4bit_layers(model)
    assert len(layers) == N_LINEAR4BIT
    assert [layer.support_avx512bf16_for_cpu for layer in layers] == [False] * N_LINEAR4BIT


def test_disable_cpu_weight_repacking_counts_changed_layers(student_path: str) -> None:
    """A plain transformers 4-bit load enables repacking on this CPU; the guard turns it off and counts."""
    if not CPU_HAS_AVX512BF16:
        pytest.skip(NO_AVX512BF16)
    raw = AutoModelForCausalLM.from_pretrained(
        student_path, dtype=torch.float32, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32),
    )
    layers = linear4bit_layers(raw)
    assert len(layers) == N_LINEAR4BIT
    assert all(layer.support_avx512bf16_for_cpu for layer in layers)
    assert disable_cpu_weight_repacking(raw) == N_LINEAR4BIT
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)
    assert disable_cpu_weight_repacking(raw) == 0


def test_eval_forward_leaves_lora_gradients_unchanged(student_path: str, batch: torch.Tensor) -> None:
    """With the guard, an eval forward under no_grad changes neither the 4-bit weights nor LoRA gradients."""
    expected = lora_gradients(load_lora_student(student_path), batch)
    model = load_lora_student(student_path)
    layers = linear4bit_layers(model)
    weights = [layer.weight.data.clone() for layer in layers]
    eval_logits(model, batch)
    assert not any(is_repacked(layer) for layer in layers)
    torch.testing.assert_close([layer.weight.data for layer in layers], weights, rtol=0, atol=0)
    gradients = lora_gradients(model, batch)
    assert any(g.abs().max() > 0 for g in gradients.values())
    torch.testing.assert_close(gradients, expected, rtol=1e-6, atol=1e-7)


@IGNORE_NO_AUTOGRAD_WARNING
def test_unguarded_eval_forward_corrupts_lora_gradients(student_path: str, batch: torch.Tensor) -> None:
    """Counterpart: without the guard the same eval forward repacks the weights and the gradients differ."""
    if not CPU_HAS_AVX512BF16:
        pytest.skip(NO_AVX512BF16)
    expected = lora_gradients(load_lora_student(student_path), batch)
    model = load_lora_student(student_path)
    undo_guard(model)
    layers = linear4bit_layers(model)
    shapes = [layer.weight.shape for layer in layers]
    eval_logits(model, batch)
    if not any(is_repacked(layer) for layer in layers):
        pytest.skip(f"bitsandbytes {bnb.__version__} did not repack 4-bit weights on an eval forward here")
    assert [layer.weight.shape for layer in layers] != shapes
    with pytest.raises(AssertionError):
        torch.testing.assert_close(lora_gradients(model, batch), expected, rtol=1e-6, atol=1e-7)


@IGNORE_QUANT_CONFIG_WARNING
def test_save_after_eval_forward_round_trips(student_path: str, batch: torch.Tensor, tmp_path: Path) -> None:
    """With the guard, a 4-bit model saved after an eval forward has the original state and logits."""
    model = load_frozen_student(student_path)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    logits = eval_logits(model, batch)
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = load_frozen_student(str(tmp_path))
    assert len(linear4bit_layers(reloaded)) == N_LINEAR4BIT
    torch.testing.assert_close(reloaded.state_dict(), state, rtol=0, atol=0)
    torch.testing.assert_close(eval_logits(reloaded, batch), logits, rtol=0, atol=0)


@IGNORE_QUANT_CONFIG_WARNING
def test_unguarded_save_after_eval_forward_differs(student_path: str, batch: torch.Tensor,
                                                   tmp_path: Path) -> None:
    """Counterpart: without the guard the saved quantisation state and the reloaded logits change."""
    if not CPU_HAS_AVX512BF16:
        pytest.skip(NO_AVX512BF16)
    model = load_frozen_student(student_path)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    logits = eval_logits(load_frozen_student(student_path), batch)
    undo_guard(model)
    eval_logits(model, batch)
    if not any(is_repacked(layer) for layer in linear4bit_layers(model)):
        pytest.skip(f"bitsandbytes {bnb.__version__} did not repack 4-bit weights on an eval forward here")
    model.save_pretrained(tmp_path)
    reloaded = load_frozen_student(str(tmp_path))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(reloaded.state_dict(), state, rtol=0, atol=0)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(eval_logits(reloaded, batch), logits, rtol=1e-5, atol=1e-5)


def broken_model_folder(kind: str, tmp_path: Path, student_path: str) -> Path:
    """A model folder that cannot load: missing, without weights, or with corrupt weights."""
    folder = tmp_path / kind
    if kind != "missing":
        folder.mkdir()
        (folder / "config.json").write_text((Path(student_path) / "config.json").read_text())
    if kind == "corrupt-weights":
        (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    return folder


@pytest.mark.parametrize("quantization", ["none", "4bit"])
@pytest.mark.parametrize("kind", ["missing", "no-weights", "corrupt-weights"])
def test_unloadable_folder_is_a_one_line_tropd_error(kind: str, quantization: str, tmp_path: Path,
                                                     student_path: str) -> None:
    """A folder that cannot be loaded is a user error: one line naming the spec, no traceback."""
    spec = str(broken_model_folder(kind, tmp_path, student_path))
    with pytest.raises(TropdError) as error:
        load_causal_lm(spec, "float32", "cpu", quantization=quantization)
    message = str(error.value)
    assert spec in message
    assert "\n" not in message
    if kind == "missing":  # not transformers' "Repo id must be in the form ..." about a typed path
        assert "does not exist" in message


def test_unknown_toylab_model_is_a_tropd_error() -> None:
    """`toylab:NAME` must name a shipped checkpoint; the error names the spec."""
    with pytest.raises(TropdError, match="toylab:nope"):
        resolve_model_path("toylab:nope")


def test_lora_adapter_names_its_base_by_its_spec(tmp_path: Path) -> None:
    """A toy adapter's adapter_config.json says toylab:student, never a path inside the package, and loads."""
    from tropd_cli.evaluation.loading import resolve_model_source
    from tropd_cli.models import LoraSpec, load_causal_lm

    model = load_causal_lm("toylab:student", lora=LoraSpec(r=2, alpha=4, dropout=0.0, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "toylab:student"
    source = resolve_model_source(str(tmp_path / "adapter"))
    assert source.model == "toylab:student"
    merged = load_causal_lm(source.model, trainable=False, merge_adapter=source.adapter)
    assert sum(p.numel() for p in merged.parameters()) > 0


def test_a_lora_student_prints_no_bitsandbytes_warning() -> None:
    """Importing peft (and with it bitsandbytes) through tropd's loader is silent on the CPU."""
    code = ("from tropd_cli.models import LoraSpec, load_causal_lm; "
            "load_causal_lm('toylab:student', lora=LoraSpec(2, 4, 0.0, 'all-linear'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr and "bitsandbytes" not in result.stderr


def test_the_kernels_offline_notice_is_silenced_and_only_with_tropd() -> None:
    """bitsandbytes >= 0.50 asks the `kernels` package for an optional CPU kernel on AVX512-BF16 machines; offline,
    `kernels` logs that it skips the publisher check. The same real call prints it without tropd and not with it
    (so the filter names the logger that really speaks)."""
    pytest.importorskip("kernels", reason="bitsandbytes < 0.50 does not install the kernels package")
    call = ("import kernels\ntry:\n    kernels.get_kernel('kernels-community/quantization-bitsandbytes', version=1)\n"
            "except Exception:\n    pass\n")
    stderr = {}
    for name, code in (("plain", call), ("tropd", "import tropd_cli\n" + call)):
        stderr[name] = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"}).stderr
    assert "Skipping publisher trust check" in stderr["plain"]
    assert stderr["tropd"] == ""


def test_models_load_without_the_hubs_kernels_unless_the_user_asks() -> None:
    """With `kernels` installed, transformers swaps layers for kernels fetched from the hub (on CUDA at the first
    forward, which fails offline). tropd turns that off by default and leaves `USE_HUB_KERNELS=YES` to the user."""
    pytest.importorskip("kernels", reason="without the kernels package transformers uses its own layers anyway")
    load = ("from transformers import AutoModelForCausalLM\n"
            f"print(AutoModelForCausalLM.from_pretrained({str(Path(resolve_model_path('toylab:student')))!r}).use_kernels)\n")
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"} | {"HF_HUB_OFFLINE": "1"}
    runs = {"plain": (load, env), "tropd": ("import tropd_cli\n" + load, env),
            "asked": ("import tropd_cli\n" + load, env | {"USE_HUB_KERNELS": "YES"})}
    used = {name: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                 env=run_env).stdout.strip() for name, (code, run_env) in runs.items()}
    assert used == {"plain": "True", "tropd": "False", "asked": "True"}
