"""Triton kernels of Dynamic Mask Attention (SPEC §5) that never build a ``Tq x Tk`` mask, and their custom ops.

Selection (:mod:`attnzoo.ops.dma.selection`, PyTorch, before launch): ``rank [B, Hb, Tk]`` (padded keys
``PAD_RANK``), ``cutoff [B, Hb, Tq]`` and ``block_min [B, Hb, ceil(Tk/16)]``. Row ``i`` keeps key ``j`` iff
``rank[j] <= cutoff[i]`` and (causal) ``j <= i + Tk - Tq``; the kernels evaluate that in registers from the
key tile's ranks and the query tile's cutoffs. Scores are ``scale q.k + bias[j]`` (log2 domain).

Visit lists (``selection.visit_lists``, built per launch for the kernel's tiles): per (batch, selection head,
query tile) the ascending key tiles it must visit -- the key tile's smallest rank is at most the query
tile's largest cutoff, and (causal) it starts inside the band of the tile's last row -- and, for dK/dV, per
key tile the query tiles that visit it. A tile pair off the list holds no kept (row, key) pair. Every loop
below is ``for i in range(count): t = list[i]`` with no branch around its loads, so Triton's software
pipeliner streams them (16-byte ``cp.async`` into shared memory, ``num_stages`` deep; the list entry is
fetched a stage ahead of the tile it names). Two padded side tables keep the per-tile vectors to one
unmasked, aligned load each: the key table ``[B, Hb, Tk_pad, 2]`` fp32 (rank bits, bias) and, for the
backward, the row table ``[B, H, Tq_pad, 4]`` fp32 (lse, delta, cutoff bits, 0).

* forward: one program per (query tile, batch, query head). Registers: the Q tile, the row cutoffs and
  their max, the fp32 accumulator ``[BLOCK_M, Dv]`` and the running max/sum. Per listed key tile: K^T and V
  tiles (shared memory, pipelined), the tile's ranks and biases; FlashAttention-2 online softmax step.
* dQ: the same walk; Q, dO, lse, delta, cutoffs and the fp32 dQ accumulator in registers.
* dK/dV/dbias: one program per (key tile, batch, kv head); K, V tiles and fp32 dK, dV accumulators in
  registers; for each of the G query heads of the group, its key-tile ranks/biases, then its listed query
  tiles (Q, dO and the row-table entries pipelined). dbias per key = sum over rows of dS, accumulated in
  registers, written per query head into an fp32 ``[B, H, Tk]`` buffer that the host sums to the bias' heads.

What is skipped and why: tile pairs off the lists are never visited (their K/V, Q/dO never loaded), so the
work per query tile follows the number of key tiles that hold a kept key (about ``keep_window / BLOCK_N``
plus the causal diagonal and scatter), not ``Tk``; building the lists is tile-level work
(``O(Tq/BLOCK_M * Tk/BLOCK_N)`` per head, in chunks). Inside a visited tile, K/V rows of keys that no row of
the query tile keeps (padded keys among them) are masked out of the loads (zero-filled, never read), so
NaN/inf in their slots stays out (SPEC §0.3); the dK/dV program leaves padded keys' K/V unread. Head dims
are constexprs (128-bit tile loads). Checked offline for sm_90 by ``tools/cross_compile.py --gate --families
dma`` (Triton 3.9 and 3.6): 128-bit tile loads, cp.async in every tile loop, no spill. Tiles are fixed per
kind and head dim (:func:`_blocks`, not autotuned): the lists depend on them. The softmax arithmetic comes
from ``attention/triton_common_jit``. Imports triton: import lazily.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops import triton_common as TC
from attnzoo.ops.attention import triton_fwd as F
from attnzoo.ops.attention.triton_common_jit import (
    LOG2E as LOG2E_C, dkdv_step, dq_step, lse_log2, row_pair, row_quad, softmax_finish, softmax_step,
)
from attnzoo.ops.dma.selection import PAD_RANK, visit_lists
from attnzoo.ops.validate import default_scale

_NO_SPEC = ["H", "G", "HB_DIV", "Tq", "Tk", "NM", "NN"]
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
def _keep_t(offs_m, offs_n, cut, rk, Tq, Tk, CAUSAL: tl.constexpr):
    """:func:`_keep` transposed, ``[N, M]``, built in that orientation (the dK/dV tiles): the key tile's ranks
    and biases then share one register layout."""
    keep = (rk[:, None] <= cut[None, :]) & (offs_n[:, None] < Tk) & (offs_m[None, :] < Tq)
    if CAUSAL:
        keep = keep & (offs_n[:, None] <= offs_m[None, :] + (Tk - Tq))
    return keep


@triton.jit
def _query_tile(Q, sqb, sqt, sqh, sqd, H, G, HB_DIV, Tq, D,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Prologue of a query-tile program (grid ``(query tile, B * H)``): its query head ``h``, kv head
    ``hkv``, bias/selection row ``sel`` (int64), first row ``start_m``, int64 batch ``b64``, the row /
    head-dim offsets, the int64 rows and row mask, and the loaded ``q`` tile ``[BLOCK_M, BLOCK_D]``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // G
    hb = h // HB_DIV
    start_m = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    sel = b64 * (H // HB_DIV) + hb
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_q = offs_m.to(tl.int64)
    row_ok = offs_m < Tq
    q = tl.load(Q + b64 * sqb + h * sqh + rows_q[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return h, hkv, sel, start_m, b64, offs_m, offs_d, offs_dv, rows_q, row_ok, q


@triton.jit
def _key_record(keys, start_n, BLOCK_N: tl.constexpr):
    """Rank (int32) and bias (fp32) of keys ``[start_n, start_n + BLOCK_N)`` from a row of the padded key
    table (``[Tk_pad, 2]`` fp32, rank bit-cast): one unmasked load (padded keys hold rank PAD_RANK, bias 0)."""
    rk_f, bv = row_pair(keys, start_n, BLOCK_N)
    return rk_f.to(tl.int32, bitcast=True), bv


@triton.jit
def _row_record(rows, start_m, BLOCK_M: tl.constexpr):
    """The backward's per-row values of rows ``[start_m, start_m + BLOCK_M)`` from a row of the padded row
    table (``[Tq_pad, 4]`` fp32: lse, delta, cutoff bits, 0): one unmasked load (padded rows: lse 0,
    delta 0, cutoff -1). Returns (lse, delta, cutoff)."""
    lse, delta, cut_f, _zero = row_quad(rows, start_m, BLOCK_M)
    return lse, delta, cut_f.to(tl.int32, bitcast=True)


@triton.jit
def _key_tile(keys, vis_base, i, BLOCK_N: tl.constexpr):
    """The ``i``-th key tile of a visit list: its first key, key offsets, ranks and biases."""
    start_n = tl.multiple_of(tl.load(vis_base + i) * BLOCK_N, BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    rk, bv = _key_record(keys, start_n, BLOCK_N)
    return start_n, offs_n, rk, bv


@triton.jit(do_not_specialize=_NO_SPEC)
def _dma_fwd_kernel(
    Q, K, V, O, LSE, Keys, Cut, VisN, VisIdx,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod, s_keys,
    H, G, HB_DIV, Tq, Tk, D: tl.constexpr, DV: tl.constexpr, NM, NN, scale_log2,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    h, hkv, sel, start_m, b64, offs_m, offs_d, offs_dv, rows_q, row_ok, q = _query_tile(
        Q, sqb, sqt, sqh, sqd, H, G, HB_DIV, Tq, D, BLOCK_D, BLOCK_DV, BLOCK_M)
    cut = tl.load(Cut + sel * Tq + offs_m, mask=row_ok, other=-1)
    max_cut = tl.max(cut, 0)
    keys = Keys + sel * s_keys
    k_base = K + b64 * skb + hkv * skh
    v_base = V + b64 * svb + hkv * svh
    row = sel * NM + tl.program_id(0)
    n_vis = tl.load(VisN + row)
    vis_base = VisIdx + row * NN

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for i in range(0, n_vis):  # the key tiles this query tile keeps a key of: no branch, the loads pipeline
        start_n, offs_n, rk, bv = _key_tile(keys, vis_base, i, BLOCK_N)
        rows_k = offs_n.to(tl.int64)
        # keys no row of this tile keeps (padded keys among them) are never read: NaN/inf there stays out
        kv_ok = rk <= max_cut
        kt = tl.load(k_base + rows_k[None, :] * skt + offs_d[:, None] * skd,
                     mask=kv_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        v = tl.load(v_base + rows_k[:, None] * svt + offs_dv[None, :] * svd,
                    mask=kv_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * scale_log2
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
    Q, K, V, DO, Rows, DQ, Keys, VisN, VisIdx,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod,
    sdqb, sdqt, sdqh, sdqd, s_keys, s_rows,
    H, G, HB_DIV, Tq, Tk, D: tl.constexpr, DV: tl.constexpr, NM, NN, scale_log2, scale,
    CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    h, hkv, sel, start_m, b64, offs_m, offs_d, offs_dv, rows_q, row_ok, q = _query_tile(
        Q, sqb, sqt, sqh, sqd, H, G, HB_DIV, Tq, D, BLOCK_D, BLOCK_DV, BLOCK_M)
    do = tl.load(DO + b64 * sdob + h * sdoh + rows_q[:, None] * sdot + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse, delta, cut = _row_record(Rows + (b64 * H + h) * s_rows, start_m, BLOCK_M)
    lse2 = lse_log2(lse)
    max_cut = tl.max(cut, 0)
    keys = Keys + sel * s_keys
    k_base = K + b64 * skb + hkv * skh
    v_base = V + b64 * svb + hkv * svh
    row = sel * NM + tl.program_id(0)
    n_vis = tl.load(VisN + row)
    vis_base = VisIdx + row * NN
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in range(0, n_vis):
        start_n, offs_n, rk, bv = _key_tile(keys, vis_base, i, BLOCK_N)
        rows_k = offs_n.to(tl.int64)
        kv_ok = rk <= max_cut  # as in the forward: unkept (e.g. padded) keys are never read
        k = tl.load(k_base + rows_k[:, None] * skt + offs_d[None, :] * skd,
                    mask=kv_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        vt = tl.load(v_base + rows_k[None, :] * svt + offs_dv[:, None] * svd,
                     mask=kv_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        s += bv[None, :] * LOG2E_C
        keep = _keep(offs_m, offs_n, cut, rk, Tq, Tk, CAUSAL)
        dq, _ds = dq_step(dq, do, k, vt, s, keep, lse2, lse2, delta, DOT_PREC, True, False)
    dq = dq * scale
    tl.store(DQ + b64 * sdqb + h * sdqh + rows_q[:, None] * sdqt + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit(do_not_specialize=_NO_SPEC)
def _dma_bwd_dkdv_kernel(
    Q, K, V, DO, Rows, DK, DVo, DB, Keys, VisN, VisIdx,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod,
    sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd, s_keys, s_rows,
    H, G, HB_DIV, Tq, Tk, D: tl.constexpr, DV: tl.constexpr, NM, NN, scale_log2, scale,
    CAUSAL: tl.constexpr, NEED_DB: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hkv = H // G
    Hb = H // HB_DIV
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    rows_k = offs_n.to(tl.int64)
    col_ok = offs_n < Tk
    # padded keys (rank PAD_RANK in every head) are never read: their K/V slots may hold NaN/inf
    rk0, _bv0 = _key_record(Keys + (b64 * Hb + (hkv * G) // HB_DIV) * s_keys, start_n, BLOCK_N)
    kv_ok = rk0 != _PAD_RANK
    k = tl.load(K + b64 * skb + hkv * skh + rows_k[:, None] * skt + offs_d[None, :] * skd,
                mask=kv_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b64 * svb + hkv * svh + rows_k[:, None] * svt + offs_dv[None, :] * svd,
                mask=kv_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, G):
        h = hkv * G + g
        sel = b64 * Hb + h // HB_DIV
        rk, bv = _key_record(Keys + sel * s_keys, start_n, BLOCK_N)
        q_base = Q + b64 * sqb + h * sqh
        do_base = DO + b64 * sdob + h * sdoh
        rows_base = Rows + (b64 * H + h) * s_rows
        vis = sel * NN + pid_n
        n_vis = tl.load(VisN + vis)
        vis_base = VisIdx + vis * NM
        db_row = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, n_vis):  # the query tiles that keep a key of this tile: no branch, loads pipeline
            start_m = tl.multiple_of(tl.load(vis_base + i) * BLOCK_M, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < Tq
            lse, delta, cut = _row_record(rows_base, start_m, BLOCK_M)
            rows = offs_m.to(tl.int64)
            q = tl.load(q_base + rows[:, None] * sqt + offs_d[None, :] * sqd,
                        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_base + rows[:, None] * sdot + offs_dv[None, :] * sdod,
                         mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # [N, M]
            st += bv[:, None] * LOG2E_C
            keep = _keep_t(offs_m, offs_n, cut, rk, Tq, Tk, CAUSAL)
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
    fixed (not autotuned, not yet benchmarked) tiles on a GPU, smaller for wide heads. Both divide
    ``KEY_PAD`` (the side tables' padding); BLOCK_N is a multiple of ``SKIP_BLOCK`` (the block minima)."""
    if TC.interpreter():
        return 16, 16, 1
    if TC.head_block(head_dim) >= 256:
        return 32, 32, 4
    if kind == "dkdv":  # two [BLOCK_N, head] fp32 accumulators: at head dim 128, 64 keys with 8 warps
        # (wgmma) spill nothing at sm_90 on Triton 3.6 and 3.9 since the loops walk visit lists (with the
        # branch-guarded loops, 64 keys spilled 240 B on 3.6 and the fallback was 32 keys on mma.sync)
        return (32, 64, 8) if TC.head_block(head_dim) >= 128 else (32, 64, 4)
    return 64, 64, 4


KEY_PAD = TC.ROW_PAD  # key / row tables are padded to a multiple of this (every BLOCK_M and BLOCK_N divides it)


def key_table(rank: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[B, Hb, Tk_pad, 2]`` fp32 (``triton_common.row_table``): per key its rank (int32 bits) and its bias
    as fp32, keys padded to a multiple of ``KEY_PAD`` with rank ``PAD_RANK`` and bias 0 -- so a kernel reads
    a key tile's ranks and biases with one unmasked, aligned load."""
    return TC.row_table([rank.to(torch.int32), bias], [PAD_RANK, 0.0])


def row_table(lse: torch.Tensor, delta: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """``[B, H, Tq_pad, 4]`` fp32 (``triton_common.row_table``): per query row of each head its lse, delta
    and cutoff (int32 bits; of its selection head), then 0; rows padded to a multiple of ``KEY_PAD`` with
    lse 0, delta 0, cutoff -1 -- so the backward reads a query tile's row values with one unmasked, aligned
    load."""
    B, H, Tq = lse.shape
    Hb = cutoff.shape[1]
    cut = cutoff.to(torch.int32)[:, :, None, :].expand(B, Hb, H // Hb, Tq).reshape(B, H, Tq)
    return TC.row_table([lse, delta, cut], [0.0, 0.0, -1])


def _common(q, k, v, keys, scale, causal):
    B, Tq, H, D = q.shape
    Tk, Hkv, DV = k.shape[1], k.shape[2], v.shape[-1]
    Hb = keys.shape[1]
    return dict(
        sqb=q.stride(0), sqt=q.stride(1), sqh=q.stride(2), sqd=q.stride(3),
        skb=k.stride(0), skt=k.stride(1), skh=k.stride(2), skd=k.stride(3),
        svb=v.stride(0), svt=v.stride(1), svh=v.stride(2), svd=v.stride(3), s_keys=keys.stride(1),
        H=H, G=H // Hkv, HB_DIV=H // Hb, Tq=Tq, Tk=Tk, D=D, DV=DV,
        scale_log2=scale * TC.LOG2E, CAUSAL=bool(causal), DOT_PREC=F.dot_precision(q.dtype),
        BLOCK_D=TC.head_block(D), BLOCK_DV=TC.head_block(DV),
    ), (B, Tq, H, Tk, Hkv)


@torch.library.custom_op("attnzoo::dma_fwd", mutates_args=())
def dma_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, rank: torch.Tensor,
            cutoff: torch.Tensor, block_min: torch.Tensor, scale: float, causal: bool
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    keys = key_table(rank, bias)
    a, (B, Tq, H, Tk, Hkv) = _common(q, k, v, keys, scale, causal)
    o = TC.new_output(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = TC.new_output((B, H, Tq), dtype=torch.float32, device=q.device)
    if o.numel() == 0 or Tq == 0:
        return o, lse
    if Tk == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    bm, bn, w = _blocks("fwd", max(q.shape[-1], v.shape[-1]))
    vis_n, vis_idx = visit_lists(cutoff, block_min, Tk, bm, bn, causal, by="query")
    _dma_fwd_kernel[(triton.cdiv(Tq, bm), B * H)](
        q, k, v, o, lse, keys, cutoff, vis_n, vis_idx, **a,
        sob=o.stride(0), sot=o.stride(1), soh=o.stride(2), sod=o.stride(3),
        NM=vis_idx.shape[-2], NN=vis_idx.shape[-1], BLOCK_M=bm, BLOCK_N=bn, num_warps=w)
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
    keys = key_table(rank, bias)
    a, (B, Tq, H, Tk, Hkv) = _common(q, k, v, keys, scale, causal)
    a["scale"] = scale
    dq = TC.new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = TC.new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = TC.new_output(v.shape, dtype=v.dtype, device=v.device)
    db = torch.zeros((B, H, Tk), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
    else:
        do = do.contiguous() if do.stride(-1) != 1 else do
        delta = (do.float() * o.float()).sum(-1).transpose(1, 2)  # [B, H, Tq]
        rows = row_table(lse, delta, cutoff)
        a["s_rows"] = rows.stride(1)
        sd = dict(sdob=do.stride(0), sdot=do.stride(1), sdoh=do.stride(2), sdod=do.stride(3))
        bm, bn, w = _blocks("dq", max(q.shape[-1], v.shape[-1]))
        vis_n, vis_idx = visit_lists(cutoff, block_min, Tk, bm, bn, causal, by="query")
        _dma_bwd_dq_kernel[(triton.cdiv(Tq, bm), B * H)](
            q, k, v, do, rows, dq, keys, vis_n, vis_idx, **a, **sd,
            sdqb=dq.stride(0), sdqt=dq.stride(1), sdqh=dq.stride(2), sdqd=dq.stride(3),
            NM=vis_idx.shape[-2], NN=vis_idx.shape[-1], BLOCK_M=bm, BLOCK_N=bn, num_warps=w)
        bm, bn, w = _blocks("dkdv", max(q.shape[-1], v.shape[-1]))
        vis_n, vis_idx = visit_lists(cutoff, block_min, Tk, bm, bn, causal, by="key")
        _dma_bwd_dkdv_kernel[(triton.cdiv(Tk, bn), B * Hkv)](
            q, k, v, do, rows, dk, dv, db, keys, vis_n, vis_idx, **a, **sd,
            sdkb=dk.stride(0), sdkt=dk.stride(1), sdkh=dk.stride(2), sdkd=dk.stride(3),
            sdvb=dv.stride(0), sdvt=dv.stride(1), sdvh=dv.stride(2), sdvd=dv.stride(3),
            NM=vis_idx.shape[-1], NN=vis_idx.shape[-2],
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
