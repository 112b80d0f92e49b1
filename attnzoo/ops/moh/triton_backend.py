"""The "triton" backends of MoH: ``moh_attention`` (head-sparse kernels, :mod:`attnzoo.ops.moh.triton_moh`),
``moh_router`` (:mod:`attnzoo.ops.moh.triton_router`) and ``moh_pack_rows`` (:mod:`attnzoo.ops.moh.triton_packing`).

Imported at package import: it must not import triton or the kernel module at module level.
"""

from __future__ import annotations

from typing import List

import torch

from attnzoo import backends
from attnzoo.ops.moh.router import RouterOutput
from attnzoo.ops.validate import MAX_DECODE_QUERIES, default_scale

KERNEL_DTYPES = backends.KERNEL_DTYPES
MAX_HEADS = 256  # per kind (routed or shared) in the Triton router: one register tile per token block


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


# ----------------------------------------------------------------------------------------------------
# the router and the row packing


def _router_device(logits_routed, logits_shared, **_):
    return (logits_routed if logits_routed is not None else logits_shared).device


def supports_router_triton(logits_routed, logits_shared, logits_mix, gates_dtype=None, **_) -> List[str]:
    reasons = list(backends.triton_device_reasons(_router_device(logits_routed, logits_shared)))
    for name, t in (("logits_routed", logits_routed), ("logits_shared", logits_shared), ("logits_mix", logits_mix)):
        if t is not None and t.dtype not in KERNEL_DTYPES:
            reasons.append(f"{name} dtype {t.dtype} is not supported by the Triton router (float16, bfloat16, float32)")
        if t is not None and name != "logits_mix" and t.shape[-1] > MAX_HEADS:
            reasons.append(f"{name} has {t.shape[-1]} heads; the Triton router handles at most {MAX_HEADS} per kind")
    if gates_dtype is not None and gates_dtype not in KERNEL_DTYPES:
        reasons.append(f"gates_dtype {gates_dtype} is not supported by the Triton router (float16, bfloat16, float32)")
    return reasons


@backends.register("moh_router", "triton", priority=10, supports=supports_router_triton)
def _router_triton_backend(logits_routed, logits_shared, logits_mix, top_k, normalize="code", gates_dtype=None):
    from attnzoo.ops.moh import triton_router

    ref = logits_routed if logits_routed is not None else logits_shared
    gates, probs, selected = triton_router.moh_router_fwd(
        logits_routed, logits_shared, logits_mix, int(top_k) if logits_routed is not None else 0,
        normalize == "code", gates_dtype or ref.dtype,
    )
    return RouterOutput(gates, probs if logits_routed is not None else None, selected)


def supports_pack_triton(gates, **_) -> List[str]:
    reasons = list(backends.triton_device_reasons(gates.device))
    if gates.dtype not in KERNEL_DTYPES + (torch.float64,):
        reasons.append(f"gates dtype {gates.dtype} is not supported by the Triton packing kernel")
    return reasons


@backends.register("moh_pack_rows", "triton", priority=10, supports=supports_pack_triton)
def _pack_triton_backend(gates, block_m, num_shared=0):
    from attnzoo.ops.moh import triton_packing

    return triton_packing.pack_active_rows_triton(gates, block_m, num_shared)
