"""The "triton" backend of ``moh_attention``: head-sparse kernels (:mod:`attnzoo.ops.moh.triton_moh`).

Imported at package import: it must not import triton or the kernel module at module level.
"""

from __future__ import annotations

from typing import List

import torch

from attnzoo import backends
from attnzoo.ops.validate import MAX_DECODE_QUERIES, default_scale


def supports_moh(q, k, v, gates, **_) -> List[str]:
    reasons = backends.triton_tensor_reasons(q, "q")
    if not gates.is_floating_point() or gates.dtype == torch.float64:
        reasons.append(f"gates dtype {gates.dtype} is not supported (float16, bfloat16, float32)")
    return reasons


def decoding(q, k, v, gates, key_padding_mask) -> bool:
    """A few queries, no padding and no gradient go through the split-K decode kernel (with gates): the
    packed-row kernel would read each K/V tile once per active query head and not split long caches."""
    return (
        q.shape[1] <= MAX_DECODE_QUERIES
        and key_padding_mask is None
        and k.shape[1] > 0
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, gates)))
    )


@backends.register("moh_attention", "triton", priority=10, supports=supports_moh)
def moh_attention_triton(q, k, v, gates, *, causal=False, scale=None, window=(-1, -1), key_padding_mask=None):
    from attnzoo.ops.moh import triton_moh

    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    if decoding(q, k, v, gates, key_padding_mask):
        return triton_moh.moh_decode(q=q, k=k, v=v, gates=gates, scale=scale, causal=bool(causal),
                                     window_left=int(window[0]), window_right=int(window[1]))
    o, _lse, _rows, _counts, _offs = triton_moh.moh_attention_fwd(
        q=q, k=k, v=v, gates=gates, key_padding_mask=key_padding_mask, scale=scale, causal=bool(causal),
        window_left=int(window[0]), window_right=int(window[1]),
    )
    return o
