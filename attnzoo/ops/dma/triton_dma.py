"""Triton kernels of Dynamic Mask Attention (SPEC §5) that never build a ``Tq x Tk`` mask, and their custom ops.

Inputs from :mod:`attnzoo.ops.dma.selection`: ``rank [B, Hb, Tk]`` (padded keys ``PAD_RANK``),
``cutoff [B, Hb, Tq]`` and ``block_min [B, Hb, ceil(Tk/16)]``. Row ``i`` keeps key ``j`` iff
``rank[j] <= cutoff[i]`` and (causal) ``j <= i + Tk - Tq``; the kernels evaluate that in registers from a
rank vector of the key tile and a cutoff vector of the query tile. Scores are ``scale q.k + bias[j]``.

* forward: one program per (query tile, batch, query head), FlashAttention-2 online softmax over key tiles
  of the causal band; a key tile is skipped (K/V never loaded) when its smallest rank exceeds the query
  tile's largest cutoff.
* dQ: same loop and skip. dK/dV/dbias: one program per (key tile, batch, kv head), looping over the G query
  heads and the query tiles of the causal band, skipping query tiles whose largest cutoff is below the key
  tile's smallest rank. dbias per key = sum over rows of dS, accumulated in registers, written per query
  head into an fp32 ``[B, H, Tk]`` buffer that the host sums to the bias' heads.

So the work per query tile follows the number of key tiles that hold a kept key (about
``keep_window / BLOCK_N`` plus scatter), not ``Tk``. Keys that no row of the tile keeps (padded keys among
them) are never loaded, so NaN/inf in their K/V slots stays out (SPEC §0.3). Head dims are constexprs
(128-bit tile loads); the skipped-tile test guards every K/V load, so these loops are not cp.async-pipelined
(a visit list built before the loop would allow it). The softmax arithmetic comes from
``attention/triton_common_jit``. Imports triton: import lazily.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops import triton_common as TC
from attnzoo.ops.attention import triton_fwd as F
from attnzoo.ops.attention.triton_common_jit import (
    LOG2E as LOG2E_C, dkdv_step, dq_step, lse_log2, softmax_finish, softmax_step,
)
from attnzoo.ops.dma.selection import PAD_RANK, SKIP_BLOCK
from attnzoo.ops.validate import default_scale

_NO_SPEC = ["H", "G", "HB_DIV", "Tq", "Tk", "NBLK"]
_PAD_RANK = tl.constexpr(PAD_RANK)


@triton.jit
def _keep(offs_m, offs_n, cut, rk, Tq, Tk, CAUSAL: tl.constexpr):
    """[M, N] keep mask from the query tile's cutoffs and the key tile's ranks (out-of-range rows have
    cutoff -1, out-of-range keys rank PAD_RANK: never kept)."""
    keep = (rk[None, :] <= cut[:, None]) & (offs_n[None, :] < Tk) & (offs_m[:, None] < Tq)
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None] + (Tk - Tq))
    return keep


@triton.jit
def _tile_min_rank(BMin, start_n, NBLK, BLOCK_N: tl.constexpr, SKIP: tl.constexpr):
    idx = start_n // SKIP + tl.arange(0, BLOCK_N // SKIP)
    return tl.min(tl.load(BMin + idx, mask=idx < NBLK, other=_PAD_RANK), 0)


@triton.jit
def _query_tile(Q, sqb, sqt, sqh, sqd, H, G, HB_DIV, Tq, D,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Prologue of a query-tile program (grid ``(query tile, B * H)``): its query head ``h``, kv head
    ``hkv``, bias/selection head ``hb``, first row ``start_m``, int64 batch ``b64``, the row / head-dim
    offsets, the int64 rows and row mask, and the loaded ``q`` tile ``[BLOCK_M, BLOCK_D]``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // G
    hb = h // HB_DIV
    start_m = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_q = offs_m.to(tl.int64)
    row_ok = offs_m < Tq
    q = tl.load(Q + b64 * sqb + h * sqh + rows_q[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return h, hkv, hb, start_m, b64, offs_m, offs_d, offs_dv, rows_q, row_ok, q


@triton.jit
def _key_walk(K, V, Bias, Rank, Cut, BMin, skb, skh, svb, svh, sbb, sbh,
              b64, hkv, hb, start_m, offs_m, row_ok, H, HB_DIV, Tq, Tk, NBLK,
              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """What a query-tile program needs to walk its key tiles: the rows' cutoffs and their max, the base
    pointers of the selection's ranks and block minima, of this kv head's K and V and of the bias row, and
    ``hi``, the end of the key range (the causal band's end with CAUSAL)."""
    sel = (b64 * (H // HB_DIV) + hb)
    cut = tl.load(Cut + sel * Tq + offs_m, mask=row_ok, other=-1)
    max_cut = tl.max(cut, 0)
    rank_base = Rank + sel * Tk
    bmin_base = BMin + sel * NBLK
    k_base = K + b64 * skb + hkv * skh
    v_base = V + b64 * svb + hkv * svh
    bias_base = Bias + b64 * sbb + hb * sbh
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(tl.minimum(start_m + BLOCK_M, Tq) + Tk - Tq, Tk)
    return cut, max_cut, rank_base, bmin_base, k_base, v_base, bias_base, hi


@triton.jit(do_not_specialize=_NO_SPEC)
def _dma_fwd_kernel(
    Q, K, V, O, LSE, Bias, Rank, Cut, BMin,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    sbb, sbh, sbn,
    H, G, HB_DIV, Tq, Tk, D: tl.constexpr, DV: tl.constexpr, NBLK, scale_log2,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP: tl.constexpr,
):
    h, hkv, hb, start_m, b64, offs_m, offs_d, offs_dv, rows_q, row_ok, q = _query_tile(
        Q, sqb, sqt, sqh, sqd, H, G, HB_DIV, Tq, D, BLOCK_D, BLOCK_DV, BLOCK_M)
    cut, max_cut, rank_base, bmin_base, k_base, v_base, bias_base, hi = _key_walk(
        K, V, Bias, Rank, Cut, BMin, skb, skh, svb, svh, sbb, sbh,
        b64, hkv, hb, start_m, offs_m, row_ok, H, HB_DIV, Tq, Tk, NBLK, CAUSAL, BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        if _tile_min_rank(bmin_base, start_n, NBLK, BLOCK_N, SKIP) <= max_cut:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Tk
            rows_k = offs_n.to(tl.int64)
            rk = tl.load(rank_base + offs_n, mask=col_ok, other=_PAD_RANK)
            # keys no row of this tile keeps (padded keys among them) are never read: NaN/inf there stays out
            kv_ok = rk <= max_cut
            kt = tl.load(k_base + rows_k[None, :] * skt + offs_d[:, None] * skd,
                         mask=kv_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            v = tl.load(v_base + rows_k[:, None] * svt + offs_dv[None, :] * svd,
                        mask=kv_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            s = tl.dot(q, kt, input_precision=DOT_PREC) * scale_log2
            bv = tl.load(bias_base + offs_n * sbn, mask=col_ok, other=0.0).to(tl.float32)
            s += bv[None, :] * LOG2E_C
            keep = _keep(offs_m, offs_n, cut, rk, Tq, Tk, CAUSAL)
            s = tl.where(keep, s, float("-inf"))
            acc, l_i, m_i = softmax_step(acc, l_i, m_i, s, v, DOT_PREC, False)
    o, lse, _m, _log2l = softmax_finish(acc, l_i, m_i, False)
    tl.store(O + b64 * sob + h * soh + rows_q[:, None] * sot + offs_dv[None, :] * sod, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + (b64 * H + h) * Tq + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=_NO_SPEC)
def _dma_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Bias, Rank, Cut, BMin,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod,
    sdqb, sdqt, sdqh, sdqd, sbb, sbh, sbn,
    H, G, HB_DIV, Tq, Tk, D: tl.constexpr, DV: tl.constexpr, NBLK, scale_log2, scale,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SKIP: tl.constexpr,
):
    h, hkv, hb, start_m, b64, offs_m, offs_d, offs_dv, rows_q, row_ok, q = _query_tile(
        Q, sqb, sqt, sqh, sqd, H, G, HB_DIV, Tq, D, BLOCK_D, BLOCK_DV, BLOCK_M)
    do = tl.load(DO + b64 * sdob + h * sdoh + rows_q[:, None] * sdot + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + (b64 * H + h) * Tq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + (b64 * H + h) * Tq + offs_m, mask=row_ok, other=0.0)
    lse2 = lse_log2(lse)
    cut, max_cut, rank_base, bmin_base, k_base, v_base, bias_base, hi = _key_walk(
        K, V, Bias, Rank, Cut, BMin, skb, skh, svb, svh, sbb, sbh,
        b64, hkv, hb, start_m, offs_m, row_ok, H, HB_DIV, Tq, Tk, NBLK, CAUSAL, BLOCK_M)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        if _tile_min_rank(bmin_base, start_n, NBLK, BLOCK_N, SKIP) <= max_cut:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Tk
            rows_k = offs_n.to(tl.int64)
            rk = tl.load(rank_base + offs_n, mask=col_ok, other=_PAD_RANK)
            kv_ok = rk <= max_cut  # as in the forward: unkept (e.g. padded) keys are never read
            k = tl.load(k_base + rows_k[:, None] * skt + offs_d[None, :] * skd,
                        mask=kv_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            vt = tl.load(v_base + rows_k[None, :] * svt + offs_dv[:, None] * svd,
                         mask=kv_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
            bv = tl.load(bias_base + offs_n * sbn, mask=col_ok, other=0.0).to(tl.float32)
            s += bv[None, :] * LOG2E_C
            keep = _keep(offs_m, offs_n, cut, rk, Tq, Tk, CAUSAL)
            dq, _ds = dq_step(dq, do, k, vt, s, keep, lse2, lse2, delta, DOT_PREC, True, False)
    dq = dq * scale
    tl.store(DQ + b64 * sdqb + h * sdqh + rows_q[:, None] * sdqt + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit(do_not_specialize=_NO_SPEC)
def _dma_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DVo, DB, Bias, Rank, Cut,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod,
    sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd, sbb, sbh, sbn,
    H, G, HB_DIV, Tq, Tk, D: tl.constexpr, DV: tl.constexpr, NBLK, scale_log2, scale,
    CAUSAL: tl.constexpr, NEED_DB: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hkv = H // G
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    b64 = b.to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_k = offs_n.to(tl.int64)
    col_ok = offs_n < Tk
    # padded keys (rank PAD_RANK in every head) are never read: their K/V slots may hold NaN/inf
    rk0 = tl.load(Rank + (b64 * (H // HB_DIV) + (hkv * G) // HB_DIV) * Tk + offs_n, mask=col_ok, other=_PAD_RANK)
    kv_ok = rk0 != _PAD_RANK
    k = tl.load(K + b64 * skb + hkv * skh + rows_k[:, None] * skt + offs_d[None, :] * skd,
                mask=kv_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b64 * svb + hkv * svh + rows_k[:, None] * svt + offs_dv[None, :] * svd,
                mask=kv_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    lo = Tq * 0
    if CAUSAL:
        lo = tl.maximum(start_n - (Tk - Tq), 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hkv * G + g
        hb = h // HB_DIV
        sel = (b64 * (H // HB_DIV) + hb)
        rk = tl.load(Rank + sel * Tk + offs_n, mask=col_ok, other=_PAD_RANK)
        min_rank = tl.min(rk, 0)
        bv = tl.load(Bias + b64 * sbb + hb * sbh + offs_n * sbn, mask=col_ok, other=0.0).to(tl.float32)
        q_base = Q + b64 * sqb + h * sqh
        do_base = DO + b64 * sdob + h * sdoh
        row_base = (b64 * H + h) * Tq
        db_row = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start_m in range(lo, Tq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < Tq
            cut = tl.load(Cut + sel * Tq + offs_m, mask=row_ok, other=-1)
            if tl.max(cut, 0) >= min_rank:
                rows = offs_m.to(tl.int64)
                q = tl.load(q_base + rows[:, None] * sqt + offs_d[None, :] * sqd,
                            mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                do = tl.load(do_base + rows[:, None] * sdot + offs_dv[None, :] * sdod,
                             mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
                st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # [N, M]
                st += bv[:, None] * LOG2E_C
                keep = tl.trans(_keep(offs_m, offs_n, cut, rk, Tq, Tk, CAUSAL))
                lse2 = lse_log2(lse)
                dk, dv, dst = dkdv_step(dk, dv, q, do, v, st, keep, lse2, lse2, delta, DOT_PREC, True, False)
                if NEED_DB:
                    db_row += tl.sum(dst, 1)
        if NEED_DB:
            tl.store(DB + (b64 * H + h) * Tk + offs_n, db_row, mask=col_ok)
    dk = dk * scale
    tl.store(DK + b64 * sdkb + hkv * sdkh + rows_k[:, None] * sdkt + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DVo + b64 * sdvb + hkv * sdvh + rows_k[:, None] * sdvt + offs_dv[None, :] * sdvd,
             dv.to(DVo.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


def _blocks(kind: str, head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps): small fixed tiles under the interpreter (tests cross tile edges);
    fixed (not autotuned, not yet benchmarked) tiles on a GPU, smaller for wide heads. BLOCK_N must be a
    multiple of SKIP_BLOCK."""
    if TC.interpreter():
        return 16, 16, 1
    if TC.head_block(head_dim) >= 256:
        return 32, 32, 4
    if kind == "dkdv":  # two [BLOCK_N, head] fp32 accumulators: at head dim 128, 8 warps and 32 keys spill
        # nothing at sm_90 on Triton 3.6 and 3.9 (4 warps spilled 56-64 B; 64 keys, 8 warps 240 B on 3.6)
        return (32, 32, 8) if TC.head_block(head_dim) >= 128 else (32, 64, 4)
    return 64, 64, 4


def _common(q, k, v, bias, scale, causal):
    B, Tq, H, D = q.shape
    Tk, Hkv, DV = k.shape[1], k.shape[2], v.shape[-1]
    Hb = bias.shape[1]
    return dict(
        sqb=q.stride(0), sqt=q.stride(1), sqh=q.stride(2), sqd=q.stride(3),
        skb=k.stride(0), skt=k.stride(1), skh=k.stride(2), skd=k.stride(3),
        svb=v.stride(0), svt=v.stride(1), svh=v.stride(2), svd=v.stride(3),
        sbb=bias.stride(0), sbh=bias.stride(1), sbn=bias.stride(2),
        H=H, G=H // Hkv, HB_DIV=H // Hb, Tq=Tq, Tk=Tk, D=D, DV=DV, NBLK=triton.cdiv(Tk, SKIP_BLOCK),
        scale_log2=scale * TC.LOG2E, CAUSAL=bool(causal), DOT_PREC=F.dot_precision(q.dtype),
        BLOCK_D=TC.head_block(D), BLOCK_DV=TC.head_block(DV),
    ), (B, Tq, H, Tk, Hkv)


@torch.library.custom_op("attnzoo::dma_fwd", mutates_args=())
def dma_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, rank: torch.Tensor,
            cutoff: torch.Tensor, block_min: torch.Tensor, scale: float, causal: bool
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    a, (B, Tq, H, Tk, Hkv) = _common(q, k, v, bias, scale, causal)
    o = TC.new_output(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = TC.new_output((B, H, Tq), dtype=torch.float32, device=q.device)
    if o.numel() == 0 or Tq == 0:
        return o, lse
    if Tk == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    bm, bn, w = _blocks("fwd", max(q.shape[-1], v.shape[-1]))
    _dma_fwd_kernel[(triton.cdiv(Tq, bm), B * H)](
        q, k, v, o, lse, bias, rank, cutoff, block_min, **a,
        sob=o.stride(0), sot=o.stride(1), soh=o.stride(2), sod=o.stride(3),
        BLOCK_M=bm, BLOCK_N=bn, SKIP=SKIP_BLOCK, num_warps=w)
    return o, lse


@dma_fwd.register_fake
def _dma_fwd_fake(q, k, v, bias, rank, cutoff, block_min, scale, causal):
    o = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return o, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("attnzoo::dma_bwd", mutates_args=())
def dma_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, bias: torch.Tensor, rank: torch.Tensor, cutoff: torch.Tensor,
            block_min: torch.Tensor, scale: float, causal: bool, need_dbias: bool
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a, (B, Tq, H, Tk, Hkv) = _common(q, k, v, bias, scale, causal)
    a["scale"] = scale
    dq = TC.new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = TC.new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = TC.new_output(v.shape, dtype=v.dtype, device=v.device)
    db = torch.zeros((B, H, Tk), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
    else:
        do = do.contiguous() if do.stride(-1) != 1 else do
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, Tq]
        lse = lse.contiguous()
        sd = dict(sdob=do.stride(0), sdot=do.stride(1), sdoh=do.stride(2), sdod=do.stride(3))
        bm, bn, w = _blocks("dq", max(q.shape[-1], v.shape[-1]))
        _dma_bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H)](
            q, k, v, do, lse, delta, dq, bias, rank, cutoff, block_min, **a, **sd,
            sdqb=dq.stride(0), sdqt=dq.stride(1), sdqh=dq.stride(2), sdqd=dq.stride(3),
            BLOCK_M=bm, BLOCK_N=bn, SKIP=SKIP_BLOCK, num_warps=w)
        bm, bn, w = _blocks("dkdv", max(q.shape[-1], v.shape[-1]))
        _dma_bwd_dkdv_kernel[(triton.cdiv(Tk, bn), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, db, bias, rank, cutoff, **a, **sd,
            sdkb=dk.stride(0), sdkt=dk.stride(1), sdkh=dk.stride(2), sdkd=dk.stride(3),
            sdvb=dv.stride(0), sdvt=dv.stride(1), sdvh=dv.stride(2), sdvd=dv.stride(3),
            NEED_DB=bool(need_dbias), BLOCK_M=bm, BLOCK_N=bn, num_warps=w)
    Hb = bias.shape[1]
    if need_dbias:
        dbias = db.view(B, Hb, H // Hb, Tk).sum(2).to(bias.dtype)
    else:
        dbias = q.new_empty((0,), dtype=torch.float32)
    return dq, dk, dv, dbias


@dma_bwd.register_fake
def _dma_bwd_fake(do, q, k, v, o, lse, bias, rank, cutoff, block_min, scale, causal, need_dbias):
    db = bias.new_empty(bias.shape) if need_dbias else q.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), db


def _setup_context(ctx, inputs, output):
    q, k, v, bias, rank, cutoff, block_min, scale, causal = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, bias, rank, cutoff, block_min)
    ctx.params = dict(scale=scale, causal=causal)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, bias, rank, cutoff, block_min = ctx.saved_tensors
    need_db = bool(ctx.needs_input_grad[3])
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, db = torch.ops.attnzoo.dma_bwd(do=do, q=q, k=k, v=v, o=o, lse=lse, bias=bias, rank=rank,
                                               cutoff=cutoff, block_min=block_min, need_dbias=need_db,
                                               **ctx.params)
    return dq, dk, dv, (db if need_db else None), None, None, None, None, None


dma_fwd.register_autograd(_backward, setup_context=_setup_context)


def dma_triton(q, k, v, bias, *, keep_window: int, causal: bool = True, scale: Optional[float] = None,
               key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``q [B, Tq, H, D]``, ``k, v [B, Tk, Hkv, D]``, ``bias [B, Hb, Tk]`` (Hb in {Hkv, H})."""
    from attnzoo.ops.dma.selection import dma_select

    if scale is None:
        scale = default_scale(q.shape[-1])
    with torch.no_grad():
        rank, cutoff, bmin = dma_select(bias.detach(), keep_window, q.shape[1], causal, key_padding_mask)
    o, _ = torch.ops.attnzoo.dma_fwd(q=q, k=k, v=v, bias=bias, rank=rank, cutoff=cutoff, block_min=bmin,
                                     scale=float(scale), causal=bool(causal))
    return o
