"""``DynamicMaskAttention``: trainable dynamic-mask sparse attention (SPEC §5; the Doge models)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attnzoo.errors import InputError
from attnzoo.modules.base import SoftmaxAttentionBase
from attnzoo.ops import validate as V
from attnzoo.ops.dma.api import dynamic_mask_attention
from attnzoo.ops.dma.reference import BIAS_FORMS, dma_bias


class DynamicMaskAttention(SoftmaxAttentionBase):
    """Each query attends to the ``keep_window`` keys with the largest value-derived bias
    ``A_h * softplus(dt_proj(V))`` (``bias_form="linear"``, default) or ``exp(...)`` (``"exp"``).
    ``dt_proj: Linear(Hkv*D -> Hkv)`` over each token's concatenated value heads; ``A [Hkv]`` starts at 0,
    so a fresh layer is a causal sliding window of ``keep_window`` keys. The per-key bias is cached
    beside K and V.

    Known limit: generation through the cache equals the full forward only up to which of several keys
    with (nearly) equal bias is kept. Projections of one token alone and of a whole sequence round
    differently, and the top-``keep_window`` choice among keys whose biases differ only by that rounding
    follows it (seen in trained char-LMs, whose repeated characters get near-equal biases:
    ``benchmarks/studies/NOTES.md``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        causal: bool = True,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        rope=None,
        knocking: Optional[str] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
        *,
        keep_window: int = 2048,
        bias_form: str = "linear",
        **kwargs,
    ):
        super().__init__(
            dim, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal, qkv_bias=qkv_bias,
            qk_norm=qk_norm, rope=rope, knocking=knocking, backend=backend, device=device, dtype=dtype, **kwargs,
        )
        V.check_int("keep_window", keep_window)
        if bias_form not in BIAS_FORMS:
            raise InputError(f"bias_form: expected one of {BIAS_FORMS}, got {bias_form!r}")
        if self.window != (-1, -1):
            raise InputError("window: DynamicMaskAttention selects keys by keep_window; a fixed window is not supported")
        self.keep_window, self.bias_form = keep_window, bias_form
        self.config.update(keep_window=keep_window, bias_form=bias_form)
        Hkv, D = self.num_kv_heads, self.head_dim
        self.dt_proj = nn.Linear(Hkv * D, Hkv, bias=False, device=device, dtype=dtype)
        self.A = nn.Parameter(torch.zeros(Hkv, device=device, dtype=dtype))

    def _key_extras(self, x, k, v):
        dt = self.dt_proj(v.reshape(*v.shape[:2], -1))  # [B, T, Hkv]
        return {"dma_bias": dma_bias(dt, self.A, self.bias_form)}  # [B, T, Hkv], cached beside K and V

    def _attend(self, x, q, k, v, key_padding_mask, extras, query_mask, q_raw):
        bias = extras["dma_bias"].transpose(1, 2)  # [B, Hkv, Tk]
        return dynamic_mask_attention(
            q, k, v, bias, keep_window=self.keep_window, causal=self.causal, scale=self.scale,
            key_padding_mask=key_padding_mask, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", keep_window={self.keep_window}, bias_form={self.bias_form!r}"
