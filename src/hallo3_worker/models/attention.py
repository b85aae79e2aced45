"""The one place attention kernels are called from.

Every attention in the Hallo3 networks goes through :func:`dispatch_attention`, so a faster kernel
can be swapped in for all of them at once (and tested against this plain path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dispatch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full (unmasked) attention, softmax scale 1/sqrt(dh).

    q: (B, nh, Sq, dh); k, v: (B, nh, Sk, dh) -> (B, nh, Sq, dh).
    """
    return F.scaled_dot_product_attention(q, k, v)
