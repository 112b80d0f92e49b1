"""The "triton" backend of ``kha_mlp``: what it supports, and the glue to the custom ops
``attnzoo::kha_mlp_fwd`` / ``attnzoo::kha_mlp_bwd`` (:mod:`attnzoo.ops.knocking.triton_mlp`).

Imported at package import time: it must not import triton nor the kernel module at module level; the
kernels are imported on first use (``_kernels()``), so ``import attnzoo`` works without triton or a GPU.
"""

from __future__ import annotations

from typing import List

import torch

from attnzoo import backends

def _kernels():
    """Import the kernel module (defines the custom ops and registers their autograd)."""
    from attnzoo.ops.knocking import triton_mlp

    return triton_mlp


def supports_kha_mlp(v, w_up, w_gate, w_down, **_) -> List[str]:
    return backends.triton_tensor_reasons(v, "v")


@backends.register("kha_mlp", "triton", priority=10, supports=supports_kha_mlp)
def kha_mlp_triton(v, w_up, w_gate, w_down):
    """Weights are cast to v's dtype (differentiably, so fp32 master weights get fp32 gradients)."""
    _kernels()
    dt = v.dtype
    return torch.ops.attnzoo.kha_mlp_fwd(v, w_up.to(dt), w_gate.to(dt), w_down.to(dt))
