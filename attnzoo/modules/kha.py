"""``KnockingHeadsAttention``: the named entry point for knocking heads (SPEC §4, arXiv 2510.23052).

It is ``MultiHeadAttention`` with ``knocking="linear"`` by default; every softmax module also accepts
``knocking=``. ``fold()`` removes KHA-Linear for inference.
"""

from __future__ import annotations

from attnzoo.errors import InputError
from attnzoo.modules.base import MultiHeadAttention


class KnockingHeadsAttention(MultiHeadAttention):
    def __init__(self, dim, num_heads, num_kv_heads=None, head_dim=None, causal=True, qkv_bias=False,
                 qk_norm=False, rope=None, knocking="linear", backend="auto", device=None, dtype=None, **kwargs):
        if knocking is None:
            raise InputError("knocking: KnockingHeadsAttention needs 'linear' or 'mlp' (use MultiHeadAttention for none)")
        super().__init__(dim, num_heads, num_kv_heads, head_dim, causal, qkv_bias, qk_norm, rope, knocking,
                         backend, device, dtype, **kwargs)

    def fold(self):
        """As ``MultiHeadAttention.fold``; once no knocking is left the result is a plain
        ``MultiHeadAttention`` (which is what it computes)."""
        new = super().fold()
        if new.knocking is None:
            new.__class__ = MultiHeadAttention
        return new
