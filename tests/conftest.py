"""Shared fixtures: offline, single-threaded, tiny models built in memory or shipped with the toy lab."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tests also start subprocesses, and two busy torch pools on two cores slow each other 100x.
torch.set_num_threads(1)


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
