"""``attnzoo.dynamic_mask_attention``: softmax attention over each row's top-``keep_window`` keys by a
query-independent bias (SPEC §5)."""

from __future__ import annotations

from typing import Optional

import torch

from attnzoo import backends
from attnzoo.errors import InputError
from attnzoo.ops import validate as V
from attnzoo.ops.attention.api import validate_attention
from attnzoo.ops.dma.reference import dynamic_mask_attention_reference


@backends.register("dynamic_mask_attention", "reference", priority=0)
def _dma_reference_backend(**kw):
    return dynamic_mask_attention_reference(**kw)


def dynamic_mask_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    *,
    keep_window: int,
    causal: bool = True,
    scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """DMA core. ``q [B, Tq, H, D]``, ``k, v [B, Tk, Hkv, D]``, ``bias [B, Hkv or H, Tk]`` (one value per key,
    shared by every query, e.g. :func:`attnzoo.ops.dma.reference.dma_bias`), ``keep_window >= 1``.

    Each query row sees the ``keep_window`` keys with the largest bias among those it may see (causal
    bottom-right, ``key_padding_mask`` True = real token); ties go to the more recent key, so a constant
    bias gives a sliding window of ``keep_window`` keys. Scores are ``scale q.k + bias`` on kept keys.
    """
    validate_attention(
        q, k, v, causal=causal, scale=scale, window=(-1, -1), bias=None, mask=None, block_mask=None,
        key_padding_mask=key_padding_mask, cu_seqlens_q=None, cu_seqlens_k=None,
    )
    V.check_tensor("bias", bias, ranks=(3,))
    V.check_same(("q", "bias"), (q, bias), dtype=False)
    B, Tk, Hkv, H = q.shape[0], k.shape[1], k.shape[2], q.shape[2]
    if bias.shape[0] != B or bias.shape[1] not in (Hkv, H) or bias.shape[2] != Tk:
        raise InputError(f"bias: expected [B, Hkv or H, Tk] = [{B}, {Hkv} or {H}, {Tk}], got {V.shape_str(bias)}")
    if not (isinstance(keep_window, int) and keep_window >= 1):
        raise InputError(f"keep_window: expected an int >= 1, got {keep_window!r}")
    return backends.dispatch(
        "dynamic_mask_attention", backend, q=q, k=k, v=v, bias=bias, keep_window=keep_window, causal=causal,
        scale=scale, key_padding_mask=key_padding_mask,
    )
