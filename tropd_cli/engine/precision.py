"""Mixed precision: which dtype forward passes run in (`train.autocast`)."""

from __future__ import annotations

import torch


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The dtype of mixed-precision forward passes, or None for none (`train.autocast`)."""
    if setting == "auto":
        usable = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if usable else None
    return None if setting == "none" else getattr(torch, setting)


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """A context that runs forward passes in `dtype` on `device` (a no-op context when None)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
