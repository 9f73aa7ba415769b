"""Mixed precision: bf16 autocast on CUDA (fp16 with a GradScaler where bf16 is unsupported), fp32 on CPU.

The heads keep fp32 weights (the token learner casts its input with `.float()`); under autocast the
backbone's matmuls run in half precision. Latent caches store half precision on any device.
"""
from __future__ import annotations

import contextlib

import torch


def amp_dtype(device) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 on CUDA with bf16 support, fp16 on older GPUs, None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device):
    """A context manager: autocast in amp_dtype(device), or nothing (fp32) on CPU."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)


LATENT_DTYPE = torch.float16  # what latent caches store (halves memory; heads cast back to fp32)
