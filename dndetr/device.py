"""Where a run computes: the device (``trainer.device``) and the autocast precision (``trainer.precision``)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .config import ConfigError

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device='cuda' is invalid: no CUDA device is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def cpu_has_bf16_units() -> bool:
    """AMX or AVX512-BF16: without them CPU bf16 is emulated and slower than fp32."""
    capability = getattr(torch._C._cpu, "_get_cpu_capability", dict)()  # private; absent -> treated as no units
    return bool(capability.get("amx_bf16") or capability.get("avx512_bf16"))


def pick_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 on a CPU with bf16 units (where it was measured 1.2-1.5x faster than fp32; its AP against
    fp32's is in docs/training.md) and fp32 everywhere else, CUDA included (the official models train in fp32)."""
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision='fp16' is invalid: fp16 autocast needs a CUDA device (use bf16 on CPU)")
    if name != "auto":
        return name
    return "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    return AUTOCAST_DTYPES[precision]
