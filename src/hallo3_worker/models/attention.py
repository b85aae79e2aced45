"""The one place attention kernels are called from.

Every attention in the Hallo3 networks goes through :func:`dispatch_attention`, so a faster kernel
can be swapped in for all of them at once (and tested against the plain path).

Backends (:data:`BACKENDS`), chosen once per process with :func:`set_attention_backend`:

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with PyTorch's own choice of
  kernel (the plain path, and the default until a backend is set);
* ``cudnn``, ``flash``, ``efficient``, ``math``: the same call restricted to one SDPA kernel;
* ``fa3``: FlashAttention-3 (``flash_attn_interface``, Hopper GPUs), when that package is importable;
* ``sage``: SageAttention's 8-bit kernel (``sageattention``, CUDA GPUs) for the long self-attention;
  attentions over fewer than :data:`SAGE_MIN_KEYS` keys (face and audio cross-attention) stay on
  SDPA. It is an approximation (int8 q/k): only the speed presets select it, never ``auto``.

``auto`` (:func:`choose_backend`) picks FlashAttention-3 on a Hopper GPU that has it, else cuDNN
attention on a CUDA GPU that supports it, else ``sdpa``. Every backend computes the same
softmax(q k^T / sqrt(dh)) v; they differ in rounding only.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "math", "fa3", "sage")
SAGE_MIN_KEYS = 128
_SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_backend = "sdpa"
_fa3_func = None
_sage_func = None


def dispatch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention, softmax scale 1/sqrt(dh).

    q: (B, nh, Sq, dh); k, v: (B, nh, Sk, dh) -> (B, nh, Sq, dh).
    """
    if _backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if _backend == "fa3":
        # FlashAttention-3 takes (B, S, nh, dh) and returns the output (first item of a tuple in some versions).
        out = _fa3_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return out.transpose(1, 2)
    if _backend == "sage":
        if k.shape[-2] < SAGE_MIN_KEYS:
            return F.scaled_dot_product_attention(q, k, v)
        return _sage_func(q, k, v, tensor_layout="HND", is_causal=False)
    with sdpa_kernel(_SDPA_KERNELS[_backend]):
        return F.scaled_dot_product_attention(q, k, v)


def fa3_available() -> bool:
    return importlib.util.find_spec("flash_attn_interface") is not None


def sage_available() -> bool:
    return importlib.util.find_spec("sageattention") is not None


def choose_backend(requested: str, device: torch.device) -> str:
    """The backend for ``requested`` (``auto`` or one of :data:`BACKENDS`) on ``device``.

    Raises ValueError for an unknown name, or for ``fa3`` without its package or off CUDA.
    """
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"attention backend must be 'auto' or one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "fa3" and (device.type != "cuda" or not fa3_available()):
        raise ValueError("attention backend 'fa3' needs a CUDA GPU and the flash_attn_interface package")
    if requested == "sage" and (device.type != "cuda" or not sage_available()):
        raise ValueError("attention backend 'sage' needs a CUDA GPU and the sageattention package")
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "sdpa"
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9 and fa3_available():
        return "fa3"
    if major >= 8 and torch.backends.cuda.cudnn_sdp_enabled():
        return "cudnn"
    return "sdpa"


def set_attention_backend(name: str) -> str:
    """Route every attention through backend ``name`` (one of :data:`BACKENDS`); returns the previous one."""
    global _backend, _fa3_func, _sage_func
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "fa3":
        from flash_attn_interface import flash_attn_func  # noqa: PLC0415 - optional package

        _fa3_func = flash_attn_func
    if name == "sage":
        from sageattention import sageattn  # noqa: PLC0415 - optional package

        _sage_func = sageattn
    previous, _backend = _backend, name
    if name != previous:
        logger.info("attention backend: %s", name)
    return previous


def attention_backend() -> str:
    return _backend


__all__ = ["BACKENDS", "attention_backend", "choose_backend", "dispatch_attention", "sage_available",
           "set_attention_backend"]
