"""tropd: trust region on-policy distillation from the command line."""

import logging
import os

__version__ = "0.1.0"


class DropMessage(logging.Filter):
    """Drops a logger's records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes, imported by peft and by transformers' schedulers, asks on AVX512-BF16 CPUs for an optional faster
# 4-bit kernel from the hub and logs that it is missing; tropd needs none, 4-bit or not. With the hub offline,
# the `kernels` package (bitsandbytes >= 0.50) first logs that it skips the kernel's publisher check. Set
# before anything imports them.
_OPTIONAL_KERNEL = "kernels-community/quantization-bitsandbytes"
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(DropMessage("Failed to load CPU gemm_4bit_forward"))
logging.getLogger("kernels._internals.hf_hub").addFilter(
    DropMessage(f"Skipping publisher trust check for '{_OPTIONAL_KERNEL}'"))

# transformers >= 5.25 swaps layers for kernels fetched from the hub at the first forward on CUDA whenever the
# `kernels` package is installed (bitsandbytes >= 0.50 installs it): offline that stops a run at its first step,
# online it runs unpinned code whose numbers differ from the CPU's. tropd's models compute with transformers'
# own layers; `USE_HUB_KERNELS=YES` in the environment turns the hub's kernels back on.
os.environ.setdefault("USE_HUB_KERNELS", "NO")
