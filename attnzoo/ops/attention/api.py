"""``attnzoo.attention`` and ``attnzoo.attention_with_kvcache``: validate, then dispatch to a backend."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnzoo import backends
from attnzoo.errors import InputError
from attnzoo.ops import validate as V
from attnzoo.ops.attention.reference import attention_reference, attention_with_kvcache_reference
from attnzoo.ops.masks.block_mask import BlockMask


def check_max_seqlen(name: str, m) -> None:
    """``max_seqlen_*``: None or an int >= 0 (a SymInt under torch.compile)."""
    if m is None:
        return
    if isinstance(m, bool) or not isinstance(m, (int, torch.SymInt)):
        raise InputError(f"{name}: expected an int (the longest sequence) or None, got {type(m).__name__}")
    if m < 0:
        raise InputError(f"{name}: must be >= 0, got {m}")


def _check_cu_seqlens_meta(name: str, cu, device) -> None:
    """The checks of ``check_cu_seqlens`` that need no host read of the values (used under torch.compile)."""
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 2:
        got = V.shape_str(cu) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise InputError(f"{name}: expected a 1-D integer tensor (int32) of length n_seqs + 1 >= 2, got {got}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise InputError(f"{name}: dtype {cu.dtype} is not supported; expected torch.int32 (or int64)")
    if cu.device != device:
        raise InputError(f"{name}: is on {cu.device} but the inputs are on {device}")


def _longest(cu: torch.Tensor) -> int:
    vals = cu.tolist()
    return max((b - a for a, b in zip(vals, vals[1:])), default=0)


def validate_attention(
    q, k, v, *, causal, scale, window, bias, mask, block_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q=None, max_seqlen_k=None,
):
    """SPEC §0/§1 input contract; raises InputError naming the argument. Returns ``window`` as a tuple.

    Varlen: ``cu_seqlens_*`` are read on the host to check their values (and ``max_seqlen_*``, when given,
    against the longest sequence) -- except under ``torch.compile`` when both ``max_seqlen_q`` and
    ``max_seqlen_k`` are given: then only their metadata is checked and the maxima are trusted, so the
    graph has no host sync.
    """
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    rank = 3 if varlen else 4
    layout = "[total_tokens, heads, head_dim] (varlen)" if varlen else "[batch, seq, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, t, ranks=(rank,))
        if t.dim() != rank:
            raise InputError(f"{name}: expected {layout}, got shape {V.shape_str(t)}")
    V.check_same(("q", "k", "v"), (q, k, v))
    window = V.check_window(window)
    V.check_scale(scale)
    H, D = q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    if k.shape[:-1] != v.shape[:-1]:
        raise InputError(f"v: shape {V.shape_str(v)} must match k {V.shape_str(k)} in every dim but the last")
    if k.shape[-1] != D:
        raise InputError(f"k: head dim {k.shape[-1]} must equal q's head dim {D}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise InputError(f"k: batch {k.shape[0]} must equal q's batch {q.shape[0]}")
    V.check_head_dim("q", D)
    V.check_head_dim("v", v.shape[-1])
    V.check_heads("q", H, "k", Hkv)
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            raise InputError("cu_seqlens_q, cu_seqlens_k: varlen needs both (pass the same tensor twice for self-attention)")
        check_max_seqlen("max_seqlen_q", max_seqlen_q)
        check_max_seqlen("max_seqlen_k", max_seqlen_k)
        if max_seqlen_q is not None and max_seqlen_k is not None and torch.compiler.is_compiling():
            _check_cu_seqlens_meta("cu_seqlens_q", cu_seqlens_q, q.device)
            _check_cu_seqlens_meta("cu_seqlens_k", cu_seqlens_k, q.device)
            nq, nk = cu_seqlens_q.shape[0] - 1, cu_seqlens_k.shape[0] - 1
        else:
            nq = V.check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
            nk = V.check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
            for name, m, cu in (("max_seqlen_q", max_seqlen_q, cu_seqlens_q), ("max_seqlen_k", max_seqlen_k, cu_seqlens_k)):
                if m is not None and m < _longest(cu):
                    raise InputError(
                        f"{name}: {m} is smaller than the longest sequence in cu_seqlens_{name[-1]} ({_longest(cu)})"
                    )
        if nq != nk:
            raise InputError(f"cu_seqlens_k: describes {nk} sequences but cu_seqlens_q describes {nq}")
        for name, t in (("bias", bias), ("mask", mask), ("block_mask", block_mask), ("key_padding_mask", key_padding_mask)):
            if t is not None:
                raise InputError(f"{name}: not supported with varlen (cu_seqlens); sequence boundaries already mask keys")
        return window
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None:
            raise InputError(f"{name}: only meaningful with varlen inputs (cu_seqlens_q/cu_seqlens_k)")
    B, Tq, Tk = q.shape[0], q.shape[1], k.shape[1]
    if bias is not None:
        V.check_tensor("bias", bias, ranks=(4,))
        V.check_same(("q", "bias"), (q, bias), dtype=False)
        V.check_broadcast("bias", bias, B, H, Hkv, Tq, Tk)
    if mask is not None:
        V.check_tensor("mask", mask, ranks=(4,), dtypes=(torch.bool,))
        V.check_same(("q", "mask"), (q, mask), dtype=False)
        V.check_broadcast("mask", mask, B, H, Hkv, Tq, Tk)
    if key_padding_mask is not None:
        V.check_tensor("key_padding_mask", key_padding_mask, ranks=(2,), dtypes=(torch.bool,))
        V.check_same(("q", "key_padding_mask"), (q, key_padding_mask), dtype=False)
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise InputError(
                f"key_padding_mask: expected shape (B, Tk) = ({B}, {Tk}) with True = real token, got {V.shape_str(key_padding_mask)}"
            )
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise InputError(f"block_mask: expected attnzoo BlockMask, got {type(block_mask).__name__} (convert a FlexAttention BlockMask with attnzoo.from_flex)")
        if tuple(block_mask.seq_lengths) != (Tq, Tk):
            raise InputError(f"block_mask: built for (Tq, Tk) = {tuple(block_mask.seq_lengths)}, inputs have ({Tq}, {Tk})")
        bb, bh, mq = block_mask.kv_num_blocks.shape
        if bb not in (1, B) or bh not in (1, H):
            raise InputError(f"block_mask: batch/head dims ({bb}, {bh}) must be 1 or match (B, H) = ({B}, {H})")
        if mq != -(-Tq // block_mask.block_size[0]):
            raise InputError(f"block_mask: has {mq} query blocks, expected ceil({Tq} / {block_mask.block_size[0]})")
    return window


@backends.register("attention", "reference", priority=0)
def _attention_reference_backend(**kw):
    return attention_reference(**kw)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    block_mask: Optional[BlockMask] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Softmax attention (SPEC §1), layout BTHD.

    Args:
        q: ``[B, Tq, H, D]`` (varlen: ``[Nq, H, D]``).
        k: ``[B, Tk, Hkv, D]`` (varlen: ``[Nk, Hkv, D]``), ``H % Hkv == 0``; query head ``h`` reads kv
            head ``h // (H // Hkv)``.
        v: ``[B, Tk, Hkv, Dv]``.
        causal: bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Tk - Tq``.
        scale: softmax scale, default ``1/sqrt(D)``.
        window: ``(left, right)`` keys around the same diagonal, ``-1`` = unbounded.
        bias: additive, broadcastable from ``{B|1} x {H|Hkv|1} x {Tq|1} x Tk``; not multiplied by scale.
        mask: bool, True = keep, broadcastable like ``bias``.
        block_mask: a :class:`attnzoo.masks.BlockMask` (key blocks not listed are never visited).
        key_padding_mask: ``[B, Tk]`` bool, **True = a real token** (kept), False = padding.
        cu_seqlens_q, cu_seqlens_k: int32 ``[n+1]`` prefix sums for the packed varlen layout.
        max_seqlen_q, max_seqlen_k: varlen only, optional: the longest query / key sequence (an upper
            bound works: ints ``>=`` the real maxima). Kernels size their launch grid from them instead of
            reading ``cu_seqlens`` on the host. In eager mode they are checked against ``cu_seqlens``;
            under ``torch.compile``, when both are given, ``cu_seqlens`` is never read on the host (no
            graph break, no sync) and the values are trusted -- too small a value leaves rows uncomputed.
            The reference backend ignores them.
        return_lse: also return the fp32 log-sum-exp ``[B, H, Tq]`` (varlen ``[H, Nq]``).
        backend: ``"auto"`` (the table in :data:`attnzoo.backends.AUTO_TABLE`), ``"reference"``,
            ``"torch"`` (SDPA + chunked masks, any device), ``"triton"``, ``"flash_attn"``, ``"xformers"``
            or ``"cuda"``.

    Rows that see no key output 0 with lse ``-inf`` and get zero gradients (docs/masking.md).
    """
    window = validate_attention(
        q, k, v, causal=causal, scale=scale, window=window, bias=bias, mask=mask, block_mask=block_mask,
        key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )
    return backends.dispatch(
        "attention", backend, q=q, k=k, v=v, causal=causal, scale=scale, window=window, bias=bias, mask=mask,
        block_mask=block_mask, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_lse=return_lse,
    )


@backends.register("attention_with_kvcache", "reference", priority=0)
def _decode_reference_backend(**kw):
    return attention_with_kvcache_reference(**kw)


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    backend: str = "auto",
):
    """Decode: a few new queries against a KV cache (SPEC §2), contiguous or paged.

    Args:
        q: ``[B, Tn, H, D]`` new queries (``Tn`` = 1..16 typically).
        k_cache, v_cache: contiguous ``[B, Tmax, Hkv, D]``, or paged ``[num_pages, page_size, Hkv, D]``
            with ``block_table``.
        cache_seqlens: ``[B]`` int32, valid tokens per batch *including* the ``Tn`` new ones (already
            written into the cache). Read on the host for validation in eager mode, not under
            ``torch.compile`` (there each entry is trusted to lie in ``[Tn, capacity]``).
        block_table: ``[B, max_pages]`` int32 page ids, for a paged cache.
        causal: bottom-right per batch: query ``i`` sees key ``j`` iff ``j <= i + cache_seqlens[b] - Tn``
            (default True: decoding is causal).
        scale, window: as in :func:`attention`.
        return_lse: also return the fp32 log-sum-exp ``[B, H, Tn]``.
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` or ``"flash_attn"`` (the Triton
            and flash-attn decode paths are inference-only).

    Returns ``o [B, Tn, H, Dv]`` (and ``lse``).
    """
    V.check_tensor("q", q, ranks=(4,))
    V.check_tensor("k_cache", k_cache, ranks=(4,))
    V.check_tensor("v_cache", v_cache, ranks=(4,))
    V.check_same(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    window = V.check_window(window)
    V.check_scale(scale)
    B, Tn, H, D = q.shape
    if k_cache.shape[:-1] != v_cache.shape[:-1]:
        raise InputError(f"v_cache: shape {V.shape_str(v_cache)} must match k_cache {V.shape_str(k_cache)} but in the last dim")
    if k_cache.shape[-1] != D:
        raise InputError(f"k_cache: head dim {k_cache.shape[-1]} must equal q's head dim {D}")
    V.check_head_dim("q", D)
    V.check_head_dim("v_cache", v_cache.shape[-1])
    V.check_heads("q", H, "k_cache", k_cache.shape[2])
    V.check_tensor("cache_seqlens", cache_seqlens, ranks=(1,), dtypes=(torch.int32, torch.int64))
    if cache_seqlens.shape[0] != B or cache_seqlens.device != q.device:
        raise InputError(f"cache_seqlens: expected shape ({B},) on {q.device}, got {V.shape_str(cache_seqlens)} on {cache_seqlens.device}")
    compiling = torch.compiler.is_compiling()
    if block_table is not None:
        V.check_tensor("block_table", block_table, ranks=(2,), dtypes=(torch.int32, torch.int64))
        if block_table.shape[0] != B or block_table.device != q.device:
            raise InputError(
                f"block_table: expected {B} rows (one per batch) on {q.device}, got {V.shape_str(block_table)} "
                f"on {block_table.device}"
            )
        if not compiling and block_table.numel() and not (
            0 <= int(block_table.min()) and int(block_table.max()) < k_cache.shape[0]
        ):
            raise InputError(f"block_table: page ids must lie in [0, {k_cache.shape[0]}) (the pages of k_cache)")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        if k_cache.shape[0] != B:
            raise InputError(f"k_cache: batch {k_cache.shape[0]} must equal q's batch {B} (or pass block_table for a paged cache)")
        capacity = k_cache.shape[1]
    if not compiling:  # a host read: skipped under torch.compile so decoding compiles without a graph break
        lens = cache_seqlens.tolist()
        if any(n < Tn or n > capacity for n in lens):
            raise InputError(f"cache_seqlens: each entry must be in [Tn, capacity] = [{Tn}, {capacity}], got {lens}")
    return backends.dispatch(
        "attention_with_kvcache", backend, q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
        block_table=block_table, causal=causal, scale=scale, window=window, return_lse=return_lse,
    )
