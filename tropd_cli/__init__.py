"""tropd: trust region on-policy distillation from the command line."""

import logging

__version__ = "0.1.0"


class _DropMessage(logging.Filter):
    """Drops a logger's records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes, imported by peft and by transformers' schedulers, logs on AVX512-BF16 CPUs that an optional
# faster 4-bit kernel package is missing; tropd needs none, 4-bit or not. Set before anything imports it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))
