"""MoH attention reference (SPEC §3): dense attention over every head, times the gates.

This is what the MoH paper's public code computes; the kernels compute only the active rows and must
match it. ``gates [B, Tq, H]``: 0 = inactive ``(token, head)`` (output row 0).
"""

from __future__ import annotations

from attnzoo.ops.attention.reference import attention_reference


def moh_attention_reference(q, k, v, gates, *, causal=False, scale=None, window=(-1, -1), key_padding_mask=None):
    o = attention_reference(q, k, v, causal=causal, scale=scale, window=window, key_padding_mask=key_padding_mask)
    return o * gates[..., None].to(o.dtype)
