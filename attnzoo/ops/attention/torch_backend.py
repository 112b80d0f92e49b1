"""The "torch" backend of ``attention`` and ``attention_with_kvcache``: PyTorch-native, any device, never a
``Tq x Tk`` matrix per head.

- The softmax core is ``F.scaled_dot_product_attention`` with ``enable_gqa`` (no copy of the kv heads).
- Plain, top-left-equals-bottom-right causal (``Tq == Tk``, or ``Tq > Tk`` after dropping the rows that see
  nothing) and no lse: one SDPA call (``is_causal``), whatever sub-backend SDPA picks (flash on CPU/CUDA).
- Anything with a mask (bias, bool mask, block mask, key padding, window, bottom-right causal with
  ``Tq < Tk``) runs in chunks of query rows: each chunk builds its own ``[.., chunk, keys]`` mask over
  just the key range its rows may see (a window or causal chunk slices the keys), so memory is
  O(chunk x Tk). With gradients each chunk is checkpointed: its mask is rebuilt in the backward instead
  of being saved, so the backward stays O(chunk x Tk) too.
- ``return_lse`` runs the same chunks through explicit matmul/softmax (SDPA does not return the lse).
- Varlen runs each sequence on its own (a host read of ``cu_seqlens``).

Masking contract (``docs/masking.md``): a row that may see no key (all excluded, or a bias of ``-inf`` on
every key) outputs 0 with lse ``-inf`` and zero gradients; K/V slots excluded by key padding, varlen bounds
or the cache length are zeroed before use, so NaN/inf there never leaks; a finite bias is arithmetic.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from attnzoo import backends
from attnzoo.ops.attention.reference import diagonal_mask, logsumexp
from attnzoo.ops.masks.block_mask import BlockMask
from attnzoo.ops.validate import default_scale

#: elements of one chunk's mask / score tile ``[B, H, chunk, keys]`` (bounds memory per chunk)
CHUNK_ELEMS = 1 << 23
MIN_CHUNK, MAX_CHUNK = 16, 1024
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def chunk_rows(B: int, H: int, Tk: int) -> int:
    """Query rows per chunk: a power of two in [16, 1024] keeping ``B*H*rows*Tk`` near ``CHUNK_ELEMS``."""
    rows = CHUNK_ELEMS // max(B * H * max(Tk, 1), 1)
    c = MIN_CHUNK
    while c * 2 <= min(rows, MAX_CHUNK):
        c *= 2
    return c


def supports_attention(q, k, v, **_) -> List[str]:
    if q.dtype not in FLOAT_DTYPES:
        return [f"q: dtype {q.dtype} is not a floating dtype"]
    return []


# ---------------------------------------------------------------------------------------------------
# the core: SDPA (or explicit math for lse) on one chunk, with empty rows made safe


def _expand_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    n = t.shape[1]
    return t if n in (1, H) else t.repeat_interleave(H // n, dim=1)


def _safe_mask(mask: torch.Tensor):
    """``(mask', row)``: ``row [.., C, 1]`` True where the row sees some key; empty rows' masks are opened
    (all visible, finite) so nothing non-finite is computed -- their output is zeroed afterwards."""
    if mask.dtype == torch.bool:
        row = mask.any(-1, keepdim=True)
        return mask | ~row, row
    row = (mask > float("-inf")).any(-1, keepdim=True)
    return mask.masked_fill(~row, 0.0), row


def sdpa_chunk(q, k, v, scale: float, mask: Optional[torch.Tensor], is_causal: bool = False,
               may_be_empty: bool = True):
    """``q [B, H, C, D]``, ``k, v [B, Hkv, S, D]`` (BHTD views), ``mask`` None, bool (True = keep) or additive
    float, broadcastable to ``[B, H, C, S]``. Rows that see no key give 0 (``may_be_empty=False``: the
    caller knows every row sees a key, and the two passes that make empty rows safe are skipped)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None or not may_be_empty:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)
    mask, row = _safe_mask(mask)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.masked_fill(~row, 0.0)


def math_chunk(q, k, v, scale: float, mask: Optional[torch.Tensor]):
    """As :func:`sdpa_chunk` (no ``is_causal``) but explicit, returning ``(o [B, H, C, Dv], lse [B, H, C])``
    in fp32 (fp64 stays fp64); empty rows give 0 and lse ``-inf``."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    H = q.shape[1]
    k, v = _expand_heads(k, H).to(ct), _expand_heads(v, H).to(ct)
    s = torch.matmul(q.to(ct), k.transpose(-1, -2)) * scale
    row = None
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(ct)
        row = (s > float("-inf")).any(-1, keepdim=True)
        s = s.masked_fill(~row, 0.0)
    lse = logsumexp(s, dim=-1, keepdim=True)
    # softmax, not exp(s - lse): with huge finite biases (finfo.min, -1e9) lse loses the scores' spread
    o = torch.matmul(torch.softmax(s, dim=-1), v)
    if row is not None:
        o = o.masked_fill(~row, 0.0)
        lse = lse.masked_fill(~row, float("-inf"))
    return o.to(q.dtype), lse[..., 0]


# ---------------------------------------------------------------------------------------------------
# masks of one chunk of query rows [r0, r1) over keys [lo, hi)


def key_range(r0: int, r1: int, Tk: int, offset: int, causal: bool, window: Tuple[int, int]) -> Tuple[int, int]:
    """The keys rows ``[r0, r1)`` may see by causal/window alone (bottom-right diagonal ``offset``)."""
    left, right = window
    lo, hi = 0, Tk
    if causal:
        hi = min(hi, r1 - 1 + offset + 1)
    if right >= 0:
        hi = min(hi, r1 - 1 + offset + right + 1)
    if left >= 0:
        lo = max(lo, r0 + offset - left)
    return lo, max(lo, hi)


def diagonal_rows(r0, r1, lo, hi, offset, causal, window, device) -> Optional[torch.Tensor]:
    """``[C, S]`` (or ``[B, 1, C, S]`` for a per-batch ``offset`` tensor) causal/window keep mask of query
    rows ``[r0, r1)`` over keys ``[lo, hi)``: the reference's :func:`diagonal_mask`, restricted."""
    return diagonal_mask(0, 0, causal=causal, window=window, offset=offset, device=device, rows=(r0, r1),
                         cols=(lo, hi))


def block_mask_rows(bm: BlockMask, B: int, H: int, r0: int, r1: int, lo: int, hi: int, device) -> torch.Tensor:
    """The dense ``[B|1, H|1, r1-r0, hi-lo]`` element mask of rows ``[r0, r1)`` and keys ``[lo, hi)`` of a
    block mask (only the query blocks those rows fall in are expanded)."""
    Tq, Tk = bm.seq_lengths
    bq, bk = bm.block_size
    nk = -(-Tk // bk)
    m0, m1 = r0 // bq, -(-r1 // bq)

    def listed(num, idx):
        if num is None:
            return None
        num, idx = num[:, :, m0:m1].to(device), idx[:, :, m0:m1].to(device)
        pos = torch.arange(idx.shape[-1], device=device)
        valid = pos < num[..., None]
        out = torch.zeros(*idx.shape[:3], nk + 1, dtype=torch.bool, device=device)
        out.scatter_(-1, torch.where(valid, idx.long().clamp(0, nk - 1), torch.full_like(idx.long(), nk)), True)
        out = out[..., :nk].repeat_interleave(bq, dim=2).repeat_interleave(bk, dim=3)
        return out[:, :, r0 - m0 * bq : r1 - m0 * bq, lo:hi]

    part = listed(bm.kv_num_blocks, bm.kv_indices)
    full = listed(bm.full_kv_num_blocks, bm.full_kv_indices)
    if bm.mask_mod is not None:
        b = torch.arange(B, device=device).view(B, 1, 1, 1)
        h = torch.arange(H, device=device).view(1, H, 1, 1)
        qi = torch.arange(r0, r1, device=device).view(1, 1, -1, 1)
        ki = torch.arange(lo, hi, device=device).view(1, 1, 1, -1)
        part = part & torch.as_tensor(bm.mask_mod(b, h, qi, ki), device=device).bool()
    return part if full is None else (part | full)


def _cast_bias(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``bias`` in the dtype SDPA needs; finite values saturate at ``finfo(dtype).min/max`` (a finite bias
    never becomes ``-inf``, i.e. never turns into exclusion, by the cast)."""
    if bias.dtype == dtype:
        return bias
    fi = torch.finfo(dtype)
    finite = torch.isfinite(bias)
    return torch.where(finite, bias.clamp(fi.min, fi.max), bias).to(dtype)


def _chunk_mask(r0, r1, lo, hi, *, B, H, Tq, offset, causal, window, bias, mask, block_mask, key_padding_mask,
                dtype, device):
    """The combined mask of one chunk: None, bool ``[.., C, S]`` or additive float (with a bias)."""
    keep = diagonal_rows(r0, r1, lo, hi, offset, causal, window, device)

    def both(a, b):
        return b if a is None else a & b

    if mask is not None:
        m = mask[:, :, r0:r1] if mask.shape[2] == Tq else mask
        keep = both(keep, _expand_heads(m[..., lo:hi], H))
    if block_mask is not None:
        keep = both(keep, block_mask_rows(block_mask, B, H, r0, r1, lo, hi, device))
    if key_padding_mask is not None:
        keep = both(keep, key_padding_mask[:, None, None, lo:hi])
    if bias is None:
        return keep
    b = bias[:, :, r0:r1] if bias.shape[2] == Tq else bias
    b = _expand_heads(_cast_bias(b[..., lo:hi], dtype), H)
    return b if keep is None else b.masked_fill(~keep, float("-inf"))


def graph_anchor(*ts) -> torch.Tensor:
    """An exact 0 that depends on ``ts`` (a sum over an empty slice): added to an output that no input
    reached (every row empty or inactive), it keeps the inputs in the autograd graph with zero gradients,
    as the reference does, without ``0 * NaN``."""
    return sum(t.reshape(-1)[:0].sum() for t in ts)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _zero_excluded(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``t [B, T, Hkv, D]`` with the slots where ``keep [B, T]`` is False set to 0 (NaN/inf there never
    reaches a row through ``0 * NaN``)."""
    return torch.where(keep[:, :, None, None], t, torch.zeros((), dtype=t.dtype, device=t.device))


# ---------------------------------------------------------------------------------------------------
# dense (non-varlen) attention


def _dense(q, k, v, *, causal, scale, window, bias, mask, block_mask, key_padding_mask, return_lse):
    """BTHD in, ``(o BTHD, lse [B, H, Tq] or None)`` out."""
    B, Tq, H, _ = q.shape
    Tk = k.shape[1]
    Dv = v.shape[-1]
    offset = Tk - Tq
    if Tq == 0 or Tk == 0:  # nothing to compute: no rows, or rows that see no key
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        anchor = graph_anchor(q, k, v)
        lse = torch.full((B, H, Tq), float("-inf"), device=q.device, dtype=lse_dtype) + anchor.to(lse_dtype)
        return q.new_zeros(B, Tq, H, Dv) + anchor, lse
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool()
        k, v = _zero_excluded(k, key_padding_mask), _zero_excluded(v, key_padding_mask)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BHTD views
    masked = bias is not None or mask is not None or block_mask is not None or key_padding_mask is not None
    unbounded = window[0] < 0 and window[1] < 0
    if not masked and unbounded and not return_lse:
        if not causal or Tq == Tk:
            o = sdpa_chunk(qt, kt, vt, scale, None, is_causal=causal)
            return o.transpose(1, 2), None
        if Tq > Tk:  # rows < Tq - Tk see no key; the rest is a square top-left causal problem
            o_tail = sdpa_chunk(qt[:, :, Tq - Tk :], kt, vt, scale, None, is_causal=True) if Tk > 0 else None
            o = q.new_zeros(B, H, Tq, Dv)
            if o_tail is not None:
                o = torch.cat([o[:, :, : Tq - Tk], o_tail], dim=2)
            return o.transpose(1, 2), None
    C = chunk_rows(B, H, Tk)
    grad = _needs_grad(q, k, v, bias)
    outs, lses = [], []
    for r0 in range(0, Tq, C):
        r1 = min(Tq, r0 + C)
        lo, hi = key_range(r0, r1, Tk, offset, causal, window)
        if hi <= lo:  # no row of this chunk sees a key
            outs.append(q.new_zeros(B, H, r1 - r0, Dv))
            lses.append(torch.full((B, H, r1 - r0), float("-inf"), device=q.device,
                                   dtype=torch.float64 if q.dtype == torch.float64 else torch.float32))
            continue

        def run(qc, kc, vc, bias_, r0=r0, r1=r1, lo=lo, hi=hi):
            m = _chunk_mask(r0, r1, lo, hi, B=B, H=H, Tq=Tq, offset=offset, causal=causal, window=window,
                            bias=bias_, mask=mask, block_mask=block_mask, key_padding_mask=key_padding_mask,
                            dtype=q.dtype, device=q.device)
            if return_lse:
                return math_chunk(qc, kc, vc, scale, m)
            return sdpa_chunk(qc, kc, vc, scale, m), None

        args = (qt[:, :, r0:r1], kt[:, :, lo:hi], vt[:, :, lo:hi], bias)
        if grad:
            o_c, lse_c = checkpoint(run, *args, use_reentrant=False)
        else:
            o_c, lse_c = run(*args)
        outs.append(o_c)
        lses.append(lse_c)
    anchor = graph_anchor(q, k, v)  # chunks whose rows see no key are constants: keep the graph whole
    o = torch.cat(outs, dim=2).transpose(1, 2) + anchor
    return o, (torch.cat(lses, dim=2) + anchor.to(lses[0].dtype) if return_lse else None)


def _varlen(q, k, v, cu_q, cu_k, *, causal, scale, window, return_lse):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        o_i, lse_i = _dense(
            q[cq[i] : cq[i + 1]][None], k[ck[i] : ck[i + 1]][None], v[ck[i] : ck[i + 1]][None], causal=causal,
            scale=scale, window=window, bias=None, mask=None, block_mask=None, key_padding_mask=None,
            return_lse=return_lse,
        )
        outs.append(o_i[0])
        if return_lse:
            lses.append(lse_i[0])
    o = torch.cat(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    lse = None
    if return_lse:
        lse = torch.cat(lses, -1) if lses else torch.zeros(q.shape[1], 0, device=q.device)
    return o, lse


@backends.register("attention", "torch", priority=5, supports=supports_attention)
def attention_torch(
    q, k, v, *, causal=False, scale=None, window=(-1, -1), bias=None, mask=None, block_mask=None,
    key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
    return_lse=False,
):
    if scale is None:
        scale = default_scale(q.shape[-1])
    scale = float(scale)
    window = (int(window[0]), int(window[1]))
    if cu_seqlens_q is not None:
        o, lse = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale, window=window,
                         return_lse=return_lse)
    else:
        o, lse = _dense(q, k, v, causal=causal, scale=scale, window=window, bias=bias, mask=mask,
                        block_mask=block_mask, key_padding_mask=key_padding_mask, return_lse=return_lse)
    return (o, lse) if return_lse else o


# ---------------------------------------------------------------------------------------------------
# KV-cache decode


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, n_pages: int) -> torch.Tensor:
    """The first ``n_pages`` pages of each row of ``block_table`` as a contiguous ``[B, n*page, Hkv, D]``."""
    B = block_table.shape[0]
    pages = cache[block_table[:, :n_pages].long().reshape(-1)]
    return pages.view(B, n_pages * cache.shape[1], *cache.shape[2:])


def supports_decode(q, k_cache, v_cache, cache_seqlens, **_) -> List[str]:
    if q.dtype not in FLOAT_DTYPES:
        return [f"q: dtype {q.dtype} is not a floating dtype"]
    return []


@backends.register("attention_with_kvcache", "torch", priority=5, supports=supports_decode)
def attention_with_kvcache_torch(
    q, k_cache, v_cache, cache_seqlens, *, block_table=None, causal=True, scale=None, window=(-1, -1),
    return_lse=False,
):
    if scale is None:
        scale = default_scale(q.shape[-1])
    scale = float(scale)
    B, Tn, H, _ = q.shape
    lens = cache_seqlens.to(q.device).long()
    compiling = torch.compiler.is_compiling()
    if block_table is not None:
        page = k_cache.shape[1]
        n_pages = block_table.shape[1] if compiling else max(1, -(-int(lens.max()) // page))
        k_cache, v_cache = gather_pages(k_cache, block_table, n_pages), gather_pages(v_cache, block_table, n_pages)
    L = k_cache.shape[1] if compiling else int(lens.max())
    k_cache, v_cache = k_cache[:, :L], v_cache[:, :L]
    valid = torch.arange(L, device=q.device)[None, :] < lens[:, None]  # [B, L]
    k_cache, v_cache = _zero_excluded(k_cache, valid), _zero_excluded(v_cache, valid)
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    C = chunk_rows(B, H, L)
    outs, lses = [], []
    for r0 in range(0, Tn, C):
        r1 = min(Tn, r0 + C)
        keep = valid[:, None, None, :]
        diag = diagonal_rows(r0, r1, 0, L, lens - Tn, causal, window, q.device)
        if diag is not None:
            keep = keep & diag
        if return_lse:
            o_c, lse_c = math_chunk(qt[:, :, r0:r1], kt, vt, scale, keep)
            lses.append(lse_c)
        else:
            o_c = sdpa_chunk(qt[:, :, r0:r1], kt, vt, scale, keep)
        outs.append(o_c)
    o = torch.cat(outs, dim=2).transpose(1, 2)
    return (o, torch.cat(lses, dim=2)) if return_lse else o
