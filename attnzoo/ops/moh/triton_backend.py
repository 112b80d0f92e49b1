"""The "triton" backend of ``moh_attention``: head-sparse kernels (:mod:`attnzoo.ops.moh.triton_moh`).

Imported at package import: it must not import triton or the kernel module at module level.
"""

from __future__ import annotations

import math
from typing import List

import torch

from attnzoo import backends

def supports_moh(q, k, v, gates, **_) -> List[str]:
    reasons = backends.triton_tensor_reasons(q, "q")
    if not gates.is_floating_point() or gates.dtype == torch.float64:
        reasons.append(f"gates dtype {gates.dtype} is not supported (float16, bfloat16, float32)")
    return reasons


@backends.register("moh_attention", "triton", priority=10, supports=supports_moh)
def moh_attention_triton(q, k, v, gates, *, causal=False, scale=None, window=(-1, -1), key_padding_mask=None):
    from attnzoo.ops.moh import triton_moh

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, _lse, _rows, _counts, _offs = triton_moh.moh_attention_fwd(
        q, k, v, gates, key_padding_mask, scale, bool(causal), int(window[0]), int(window[1])
    )
    return o
