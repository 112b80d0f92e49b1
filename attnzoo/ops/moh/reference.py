"""MoH attention reference (SPEC §3): dense attention over every head, times the gates.

This is what the MoH paper's public code computes; the kernels compute only the active rows and must
match it. ``gates [B, Tq, H]``: 0 = inactive ``(token, head)`` (output row 0).

Gradient contract: an inactive pair's attention is never computed, so its gate receives no gradient
(``dgate = rowsum(dO * O_unscaled)`` for active pairs only). Routers never need it: the learned router's
inactive gates are multiplied by a zero top-k mask, and the qnorm router's straight-through soft gate
still receives gradient through the active heads (its softmax couples every head).
"""

from __future__ import annotations

import torch

from attnzoo.ops.attention.reference import attention_reference


def moh_attention_reference(q, k, v, gates, *, causal=False, scale=None, window=(-1, -1), key_padding_mask=None):
    o = attention_reference(q, k, v, causal=causal, scale=scale, window=window, key_padding_mask=key_padding_mask)
    gates = torch.where(gates != 0, gates, gates.detach())  # same values; no gradient into inactive gates
    return o * gates[..., None].to(o.dtype)
