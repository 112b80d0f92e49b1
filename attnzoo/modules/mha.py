"""``MultiHeadAttention`` (MHA, GQA/MQA through ``num_kv_heads``, WGQA) and its knocking-heads form
``KnockingHeadsAttention``. The pipeline they share is in ``base.py``."""

from __future__ import annotations

from attnzoo.errors import InputError
from attnzoo.modules.base import SoftmaxAttentionBase


class MultiHeadAttention(SoftmaxAttentionBase):
    """Multi-head softmax attention; GQA/MQA through ``num_kv_heads``, WGQA through ``kv_weights="wgqa"``,
    knocking heads through ``knocking="linear"|"mlp"``."""


class KnockingHeadsAttention(MultiHeadAttention):
    """Knocking heads (SPEC §4, arXiv 2510.23052): ``MultiHeadAttention`` with ``knocking="linear"`` by
    default (every softmax module also accepts ``knocking=``). ``fold()`` removes KHA-Linear for inference.

    It lives here, beside the class it extends, rather than in ``knocking.py`` (the transform): the base
    imports the transform, so the transform's file cannot import the modules built on the base."""

    def __init__(self, dim, num_heads, num_kv_heads=None, head_dim=None, causal=True, qkv_bias=False,
                 qk_norm=False, rope=None, knocking="linear", backend="auto", device=None, dtype=None, **kwargs):
        if knocking is None:
            raise InputError("knocking: KnockingHeadsAttention needs 'linear' or 'mlp' (use MultiHeadAttention for none)")
        super().__init__(dim, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal,
                         qkv_bias=qkv_bias, qk_norm=qk_norm, rope=rope, knocking=knocking, backend=backend,
                         device=device, dtype=dtype, **kwargs)

    def fold(self):
        """As ``MultiHeadAttention.fold``; once no knocking is left the result is a plain
        ``MultiHeadAttention`` (which is what it computes)."""
        new = super().fold()
        if new.knocking is None:
            new.__class__ = MultiHeadAttention
        return new
