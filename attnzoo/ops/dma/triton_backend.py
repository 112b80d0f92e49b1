"""The "triton" backend of ``dynamic_mask_attention`` (SPEC §5): no ``Tq x Tk`` mask.

Selection (:mod:`attnzoo.ops.dma.selection`, PyTorch): one ranking of the keys per (batch, bias head) by
(bias desc, position desc), and per query row the rank cutoff of its ``keep_window``-th visible key,
computed over chunks of rows (memory ``O(chunk * Tk)``). The kernels (:mod:`attnzoo.ops.dma.triton_dma`)
keep key ``j`` for row ``i`` iff ``rank[j] <= cutoff[i]`` (plus causal), evaluated in registers, and walk
visit lists built before launch -- per query tile only the key tiles whose smallest rank is within the tile's
largest cutoff (per key tile the matching query tiles, for dK/dV) -- so their cost follows ``keep_window``,
not ``Tk``, and their tile loads pipeline.

Imported at package import: no triton import at module level.
"""

from __future__ import annotations

from typing import List

from attnzoo import backends


def supports_dma(q, k, v, bias, **_) -> List[str]:
    from attnzoo.ops.attention.triton_backend import supports_attention

    return supports_attention(q, k, v, bias=bias[:, :, None, :])


@backends.register("dynamic_mask_attention", "triton", priority=10, supports=supports_dma)
def dynamic_mask_attention_triton(q, k, v, bias, *, keep_window, causal=True, scale=None, key_padding_mask=None):
    from attnzoo.ops.dma.triton_dma import dma_triton

    return dma_triton(q, k, v, bias, keep_window=keep_window, causal=causal, scale=scale,
                      key_padding_mask=key_padding_mask)
