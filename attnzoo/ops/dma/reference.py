"""Dynamic Mask Attention reference (SPEC §5; "Trainable Dynamic Mask Sparse Attention", the Doge models).

The bias comes from the values and is the same for every query: ``bias [B, Hb, Tk]`` with ``Hb`` = the kv
heads (or the query heads). Each query row keeps the ``keep_window`` visible keys (causal, padding) with
the largest bias -- ties toward the more recent key -- and attends to them with the bias added.
Selection uses the detached bias; gradients reach the bias at kept positions.
"""

from __future__ import annotations

from typing import Optional

import torch

from attnzoo.errors import InputError
from attnzoo.ops.attention.reference import attention_reference, compute_dtype, visibility

BIAS_FORMS = ("linear", "exp")


def dma_bias(dt: torch.Tensor, A: torch.Tensor, bias_form: str = "linear") -> torch.Tensor:
    """``dt [B, Tk, Hkv]`` (``dt_proj(V)``) and ``A [Hkv]`` -> ``bias [B, Tk, Hkv]`` (transpose it for
    :func:`attnzoo.dynamic_mask_attention`, which takes ``[B, Hkv, Tk]``):
    ``A softplus(dt)`` (``"linear"``, the current form) or ``exp(A softplus(dt))`` (``"exp"``, the original)."""
    if bias_form not in BIAS_FORMS:
        raise InputError(f"bias_form: expected one of {BIAS_FORMS}, got {bias_form!r}")
    dt = dt.to(compute_dtype(dt.dtype))  # fp32, fp64 stays fp64
    # softplus as logaddexp(dt, 0): same values; its backward keeps strides that torch.compile's
    # aot_eager tracing agrees with (aten.softplus_backward's output strides did not)
    b = A * torch.logaddexp(dt, torch.zeros((), dtype=dt.dtype, device=dt.device))
    if bias_form == "exp":
        b = torch.exp(b)
    return b


def dma_keep_mask(bias: torch.Tensor, visible: Optional[torch.Tensor], keep_window: int, Tq: int) -> torch.Tensor:
    """``[B, Hb, Tq, Tk]`` bool: per query row, the top ``keep_window`` visible keys by ``bias [B, Hb, Tk]``
    (ties toward the more recent key); every visible key when no more than ``keep_window`` are visible.
    ``visible`` broadcasts to ``[B, Hb, Tq, Tk]`` (None = all visible)."""
    B, Hb, Tk = bias.shape
    vis = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=bias.device) if visible is None else visible
    vis = vis.expand(B, Hb, Tq, Tk)
    if keep_window >= Tk:
        return vis
    scores = bias.detach()[:, :, None, :].expand(B, Hb, Tq, Tk).masked_fill(~vis, float("-inf"))
    # stable sort of the key axis reversed: among equal biases the more recent key comes first
    order = scores.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :keep_window]
    keep = torch.zeros_like(vis).scatter_(-1, Tk - 1 - order, True)
    return keep & vis


def dma_selection(q, k, bias, keep_window, causal, key_padding_mask) -> torch.Tensor:
    """The kept keys ``[B, Hb, Tq, Tk]`` bool of every query row: the top ``keep_window`` by ``bias`` among
    the keys the row may see (causal bottom-right, key padding)."""
    B, Tq, H, _ = q.shape
    Tk = k.shape[1]
    vis = visibility(B, H, Tq, Tk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    vis = None if vis is None else vis.expand(B, 1, Tq, Tk)  # causal/padding masks do not depend on the head
    return dma_keep_mask(bias, vis, keep_window, Tq)


def dynamic_mask_attention_reference(
    q, k, v, bias, *, keep_window, causal=True, scale=None, key_padding_mask=None
):
    keep = dma_selection(q, k, bias, keep_window, causal, key_padding_mask)
    return attention_reference(q, k, v, scale=scale, bias=bias[:, :, None, :], mask=keep,
                               key_padding_mask=key_padding_mask)
