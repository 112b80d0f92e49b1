"""The "triton" backend of ``dynamic_mask_attention``: the softmax core's Triton kernels with the DMA bias
(``[B, Hkv, 1, Tk]``, one value per key) and the selected keys as a dense boolean mask.

First version: the selection is built in PyTorch as a ``[B, Hkv, Tq, Tk]`` bool mask (``Tq * Tk`` bytes
per kv head) and the kernel still visits every key tile of the causal band, so its cost follows ``Tk``,
not ``keep_window``. The kernel SPEC §5 asks for -- per-row thresholds on the query-independent bias,
skipping key blocks whose largest bias is below the tile's smallest threshold -- is future work.

Imported at package import: no triton import at module level.
"""

from __future__ import annotations

from typing import List

from attnzoo import backends
from attnzoo.ops.dma.reference import dma_selection


def supports_dma(q, k, v, bias, **_) -> List[str]:
    from attnzoo.ops.attention.triton_backend import supports_attention

    return supports_attention(q, k, v, bias=bias[:, :, None, :])


@backends.register("dynamic_mask_attention", "triton", priority=10, supports=supports_dma)
def dynamic_mask_attention_triton(q, k, v, bias, *, keep_window, causal=True, scale=None, key_padding_mask=None):
    from attnzoo.ops.attention.triton_backend import attention_triton

    keep = dma_selection(q, k, bias, keep_window, causal, key_padding_mask)
    return attention_triton(q, k, v, scale=scale, bias=bias[:, :, None, :], mask=keep)
