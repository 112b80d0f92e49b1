"""The "triton" backend of ``attention`` and ``attention_with_kvcache``: what it supports, and the glue from
the public arguments to the custom ops ``attnzoo::attention_fwd`` / ``attnzoo::attention_bwd`` /
``attnzoo::attention_decode``.

Imported at package import time: it must not import triton nor the kernel modules at module level; they
are imported on first use (``_kernels()``), so ``import attnzoo`` works without triton or a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch

from attnzoo import backends
from attnzoo.ops.validate import MAX_DECODE_QUERIES, default_scale

KERNEL_DTYPES = backends.KERNEL_DTYPES
MIN_BLOCK = 16  # the smallest kernel tile; BlockMask blocks must be multiples of it


def _kernels():
    """Import the kernel modules (defines the custom ops and registers their autograd)."""
    from attnzoo.ops.attention import triton_bwd  # noqa: F401  (imports triton_fwd too)

    return triton_bwd


def _decode_kernels():
    from attnzoo.ops.attention import triton_decode

    return triton_decode


def supports_attention(q, k, v, *, bias=None, mask=None, block_mask=None, **_) -> List[str]:
    reasons = backends.triton_tensor_reasons(q, "q")
    if bias is not None and bias.dtype not in KERNEL_DTYPES + (torch.float64,):
        reasons.append(f"bias dtype {bias.dtype} is not supported (a floating dtype is needed)")
    if block_mask is not None:
        bq, bk = block_mask.block_size
        if bq % MIN_BLOCK or bk % MIN_BLOCK or bq <= 0 or bk <= 0:
            reasons.append(
                f"block_mask block_size {tuple(block_mask.block_size)}: the Triton kernels need block sizes that are "
                f"multiples of {MIN_BLOCK} (kernel tiles must equal or divide the BlockMask's blocks)"
            )
    return reasons


def supports_decode(q, k_cache, v_cache, cache_seqlens, *, block_table=None, **_) -> List[str]:
    reasons = backends.triton_tensor_reasons(q, "q")
    if q.shape[1] > MAX_DECODE_QUERIES:
        reasons.append(
            f"q has {q.shape[1]} new queries; the Triton decode kernel serves 1..{MAX_DECODE_QUERIES} "
            "(use attention() with causal=True for a prefill)"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        reasons.append("the Triton decode kernel is inference-only (no backward); inputs require grad")
    return reasons


def dense_mask_block(interpreted: bool) -> int:
    """Block size a dense mask is summarised at: a multiple of every kernel tile (128 on a GPU; the
    interpreter's 16-row tiles under TRITON_INTERPRET, so small tests cross blocks)."""
    return MIN_BLOCK if interpreted else 128


def _dense_mask_as_blocks(kern, mask: torch.Tensor, B: int, H: int, Tq: int, Tk: int):
    """Block lists of a dense bool ``mask [B|1, H|Hkv|1, Tq, Tk]`` (kv heads expanded to query heads) and
    the mask as the element mask of the partial blocks. Costs one pass over the mask."""
    from attnzoo.ops.attention.reference import expand_kv_heads
    from attnzoo.ops.masks.block_mask import block_mask_from_dense

    mask = expand_kv_heads(mask, H, 1)
    size = dense_mask_block(kern.F.interpreter())
    bm = block_mask_from_dense(mask, (size, size))
    if mask.shape[2] == 1 and Tq > 1:
        # one row shared by every query: its block lists hold for every query block (summarised once,
        # never expanded to Tq rows)
        mq = -(-Tq // size)
        bm = dataclasses.replace(
            bm, kv_num_blocks=bm.kv_num_blocks.expand(-1, -1, mq), kv_indices=bm.kv_indices.expand(-1, -1, mq, -1),
            full_kv_num_blocks=bm.full_kv_num_blocks.expand(-1, -1, mq),
            full_kv_indices=bm.full_kv_indices.expand(-1, -1, mq, -1), seq_lengths=(Tq, Tk))
    bm.mask_mod = None  # the element mask is ``mask`` itself: no need to evaluate it back
    (kvn, kvi, fn, fi, _), blocks = kern.F.block_mask_tensors(bm, B, H, Tq, Tk, mask.device)
    return (kvn, kvi, fn, fi, kern.F.pad_elem_mask(mask)), blocks


def _max_len(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0


@backends.register("attention", "triton", priority=10, supports=supports_attention)
def attention_triton(
    q, k, v, *, causal=False, scale=None, window=(-1, -1), bias=None, mask=None, block_mask=None,
    key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
    return_lse=False,
):
    kern = _kernels()
    if scale is None:
        scale = default_scale(q.shape[-1])
    varlen = cu_seqlens_q is not None
    if varlen:
        # the caller's maxima (validated in eager mode) spare a host read of cu_seqlens
        max_q = max_seqlen_q if max_seqlen_q is not None else _max_len(cu_seqlens_q)
        max_k = max_seqlen_k if max_seqlen_k is not None else _max_len(cu_seqlens_k)
        cu_seqlens_q = cu_seqlens_q.to(torch.int32)
        cu_seqlens_k = cu_seqlens_k.to(torch.int32)
    else:
        max_q, max_k = q.shape[1], k.shape[1]
    kvn = kvi = fn = fi = em = None
    bq = bk = 0
    if block_mask is not None:
        (kvn, kvi, fn, fi, em), (bq, bk) = kern.F.block_mask_tensors(
            block_mask, q.shape[0], q.shape[2], max_q, max_k, q.device)
    elif mask is not None:
        # a dense bool mask runs as a block mask: tiles it empties are never visited, tiles it fills skip
        # the element test, and the mask itself is the partial tiles' element mask
        (kvn, kvi, fn, fi, em), (bq, bk) = _dense_mask_as_blocks(kern, mask, q.shape[0], q.shape[2], max_q, max_k)
        mask = None
    masks = kern.F.Masks(
        mask=mask, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        kv_num_blocks=kvn, kv_indices=kvi, full_kv_num_blocks=fn, full_kv_indices=fi, elem_mask=em,
    )
    o, lse, _stats = torch.ops.attnzoo.attention_fwd(
        q=q, k=k, v=v, bias=bias, masks=masks.pack(), scale=float(scale), causal=bool(causal),
        window=[int(window[0]), int(window[1])], max_seqlen=[max_q, max_k], block_size=[bq, bk],
    )
    return (o, lse) if return_lse else o


@backends.register("attention_with_kvcache", "triton", priority=10, supports=supports_decode)
def attention_with_kvcache_triton(
    q, k_cache, v_cache, cache_seqlens, *, block_table=None, causal=True, scale=None, window=(-1, -1),
    return_lse=False,
):
    _decode_kernels()
    if scale is None:
        scale = default_scale(q.shape[-1])
    o, lse = torch.ops.attnzoo.attention_decode(
        q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens.to(torch.int32),
        block_table=block_table.to(torch.int32) if block_table is not None else None,
        scale=float(scale), causal=bool(causal), window_left=int(window[0]), window_right=int(window[1]),
    )
    return (o, lse) if return_lse else o
