"""Shared fixtures: offline, single-threaded, tiny models built in memory or shipped with the toy lab."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tests also start subprocesses, and two busy torch pools on two cores slow each other 100x.
# TROPD_TEST_THREADS sets another count, for measuring how numbers move with it (bench/pinned_drift.py).
torch.set_num_threads(int(os.environ.get("TROPD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def toy_tokenizer():
    from tropd_cli.toylab.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def random_pair_dir(tmp_path_factory, toy_tokenizer):
    """Randomly initialised toy teacher and student saved with their tokenizer."""
    from tropd_cli.toylab.models import new_toy_model

    root = tmp_path_factory.mktemp("pair")
    for size in ("teacher", "student"):
        model = new_toy_model(size, seed=0)
        model.save_pretrained(root / size)
        toy_tokenizer.save_pretrained(root / size)
    return root


@pytest.fixture(scope="session")
def vllm_pair_dir(tmp_path_factory, toy_tokenizer):
    """A random float32 Qwen3 teacher and student with head_dim 64 (vLLM's CPU attention refuses the toy lab's
    32), saved with the toy tokenizer, for the tests that run a real vLLM engine."""
    from transformers import Qwen3ForCausalLM

    from tropd_cli.toylab.models import toy_config

    root = tmp_path_factory.mktemp("vllm_pair")
    sizes = {"teacher": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=64),
             "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                             num_key_value_heads=1, head_dim=64)}
    for seed, (name, size) in enumerate(sizes.items()):
        config = toy_config("student")
        for key, value in size.items():
            setattr(config, key, value)
        torch.manual_seed(seed)
        Qwen3ForCausalLM(config).save_pretrained(root / name)
        toy_tokenizer.save_pretrained(root / name)
    return root


# The vLLM lane (`make test-vllm` sets TROPD_VLLM_LANE) must not pass by skipping: a test module that skips
# there (vLLM failed to import) fails the run instead.
_lane_skips: list[str] = []


def pytest_collectreport(report):
    if os.environ.get("TROPD_VLLM_LANE") and report.skipped:
        _lane_skips.append(f"{report.nodeid}: {report.longrepr[-1] if report.longrepr else ''}")


def pytest_sessionfinish(session, exitstatus):
    if _lane_skips:
        print("\nthe vLLM lane skipped test modules:\n" + "\n".join(_lane_skips))
        session.exitstatus = 1
