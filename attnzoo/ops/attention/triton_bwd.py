"""Triton backward kernels of the softmax attention core (SPEC §1) and the autograd of ``attnzoo::attention_fwd``.

Algorithm (FlashAttention-2 backward, split in two kernels so nothing is accumulated with atomics --
the backward is deterministic, bit-for-bit run to run):

* ``delta = rowsum(dO * O) - dlse`` (fp32; a small torch reduction; ``dlse`` is the gradient reaching
  the returned lse, zero when lse is unused).
* dK/dV kernel: one program per (key tile of BLOCK_N rows, batch, kv head). The K and V tiles and the
  fp32 accumulators dK, dV stay in registers; the program loops over the G query heads of its GQA group
  and, for each, over the query tiles that can see this key tile, recomputing ``P^T = exp2(S^T - lse)``
  from the saved lse: ``dV += P^T dO``, ``dS^T = P^T * (dP^T - delta)``, ``dK += dS^T Q``. Summing over the
  group inside the program gives dK/dV of the kv head directly.
  Each query tile's per-row values come from one padded fp32 row table built on the host
  (:func:`row_table`: (lse, 0, delta, 0), with a bias (row max, log2 l, delta, 0); 16 bytes a row, about
  ``B*H*Tq*16`` bytes) as one unmasked, aligned 128-bit load (pipelined with the Q and dO tiles) -- the
  masked lse/delta loads it replaces were copied by Triton 3.6 as one 4-byte ``cp.async`` per row.
* dQ kernel: one program per (query tile, batch, query head); Q, dO, lse, delta and the dQ accumulator
  stay in registers while key tiles stream: ``dQ += dS K``.
* dbias (when the bias requires grad) is produced by the dK/dV kernel, which already holds every ``dS^T``
  tile of its key tile for all G query heads of its kv head -- never through a ``[B, H, Tq, Tk]`` buffer:

  - per-query bias (``Tq`` rows): each ``dS^T`` tile goes straight into the bias-shaped output. When several
    (batch, head) pairs that one program visits share a bias slice (the G heads of a group for an ``Hkv``
    or ``1`` head dim; the batches or kv heads the program loops over, see below) the program adds the tile
    into the slice it alone owns (load + add + store, in a fixed order: deterministic, no atomics).
  - per-key bias (``Tq == 1``, e.g. ALiBi-like or DMA biases): ``sum over query rows of dS^T`` is
    accumulated in registers while the program walks the query tiles, and stored once per head.
  - a bias broadcast over the batch (``B == 1 < B``) or over all heads while ``Hkv > 1`` is shared by
    several programs. Either each program writes its own slot of a partial buffer that materialises only
    that dim (``[B, ...]`` and/or ``[., Hkv, ...]``), which the host then sums over that dim only, or the
    programs loop over the shared batches / kv heads themselves (fewer programs, no extra memory). A
    per-query bias takes the first of: partial over B and kv heads, over B only, over kv heads only, none
    -- whose fp32 size fits ``DBIAS_PARTIAL_MAX_BYTES`` (64 MiB; "none" always fits). A per-key bias
    always uses the partial (it is O(B*Hkv*Tk)).

  Memory of dbias per bias form, ``N = Tq*Tk`` (the first version wrote a ``B*H*N*4``-byte fp32 buffer for
  every form, 8 GiB at B=1, H=32, T=8k; the backward still allocates dQ/dK/dV and an fp32 ``delta``):

  =============================  ===================================================================
  bias form                      dbias memory
  =============================  ===================================================================
  ``[B, H, Tq, Tk]``             the dbias itself, written once, directly in the bias dtype (no extra)
  ``[B, Hkv, Tq, Tk]``, G > 1    ``B*Hkv*N*4`` fp32 (summed over the group in-program), then cast to
                                 the bias dtype if it is not fp32
  ``[1, H|Hkv, Tq, Tk]``, B > 1  ``B*Hb*N*4`` partial if <= 64 MiB, else ``Hb*N*4`` (each program
                                 loops over B); ``Hb`` = the bias' heads
  ``[B, 1, Tq, Tk]``, Hkv > 1    ``B*Hkv*N*4`` partial if <= 64 MiB, else ``B*N*4`` (loop over kv heads)
  ``[1, 1, Tq, Tk]``, Hkv > 1    the first that fits of ``B*Hkv*N*4``, ``B*N*4`` (loop over kv heads),
                                 ``Hkv*N*4`` (loop over B), ``N*4`` (loop over both)
  ``[*, 1, Tq, Tk]``, Hkv == 1   as its ``Hkv`` form: the G = H heads are summed inside each program
  ``[*, *, 1, Tk]`` (per key)    ``B*Hb*Tk*4`` for ``Hb`` in {H, Hkv}, ``B*Hkv*Tk*4`` for one shared
                                 head: at most ``B*H*Tk*4``
  =============================  ===================================================================

  So a trainable bias never costs more than ``max(its own size in fp32, 64 MiB)`` (+ the cast), and a
  per-key bias O(B*H*Tk). The reductions are fixed-order (in-program loops, then ``torch.sum`` over the
  small partial dim): the backward stays deterministic.

What is skipped: as in the forward, tiles outside the causal/window band are never visited (the loop
bounds come from the diagonal). dQ splits its key range into boundary tiles (bounds/band tested) and
interior tiles (full key tiles inside the band of every row: no test); dK/dV keeps one loop that tests
every query tile -- the same split there made ptxas spill (24-770 B/thread at sm_90, Triton 3.9) with the
two fp32 accumulators live across three loops (``_bwd_kv_inner`` keeps its ``BOUNDARY`` switch for a
later attempt). With a bias the scores stay in natural units and P is recomputed from the forward's row
max and log2 of the row sum (``STATS``), not from the lse, which a -1e9/finfo.min bias rounds to the
row max (SPEC §0.2). Key-padded K/V rows are never
loaded (NaN/inf there stays out, SPEC §0.3). With a BlockMask only listed blocks are visited (the dK/dV kernel uses
the transposed lists, "which query blocks see this key block", built on the host from the kv lists), as in
the forward: the lists cut to the causal/window band on the host first (``triton_fwd.band_limited``),
then walked as one flat loop over (listed block, kernel tile) with unconditional, pipelined loads.
Masked entries have ``P = 0`` so they contribute nothing; fully masked rows (lse = -inf) get zero
gradients, never NaN.

This module imports triton: import it lazily (``attnzoo.ops.attention.triton_backend`` does).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops import triton_common as TC
from attnzoo.ops.attention import triton_fwd as F
from attnzoo.ops.attention.triton_common_jit import (
    LOG2E as LOG2E_C, dkdv_step, dq_step, elem_mask, lse_log2, row_quad, seq_bounds as _seq_bounds, split_range,
    visible as _visible,
)
from attnzoo.ops.attention.triton_fwd import _NO_SPEC

_NO_SPEC_DKDV = _NO_SPEC + ["db_hdiv", "NB_IN", "NH_IN"]

# Largest partial dbias buffer (bytes) the backward may allocate to keep one program per (key tile, batch,
# kv head) when the bias is shared across batches / kv heads; above it the programs loop instead.
DBIAS_PARTIAL_MAX_BYTES = 64 << 20


@triton.jit
def _db_store(ptrs, val, ok, ACCUM: tl.constexpr):
    """Store a dbias tile/row; with ACCUM add it to what this program stored there before (the barrier
    makes the earlier stores of every thread of the program visible first)."""
    if ACCUM:
        tl.debug_barrier()
        val = val + tl.load(ptrs, mask=ok, other=0.0)
    tl.store(ptrs, val.to(ptrs.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kv_inner(dk, dv, db_row, k, v, start_m, offs_n, Tq, Tk, diag, win_left, win_right,
                  q_base, sqt, sqd, do_base, sdot, sdod, rows_base, D: tl.constexpr, DV: tl.constexpr,
                  bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                  db_base, sdbm, sdbn, qk_scale,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, APPLY_EM: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DB_MODE: tl.constexpr, DB_ACCUM: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BOUNDARY: tl.constexpr):
    """One query tile of the dK/dV loop. ``BOUNDARY``: the tile (or this key tile) may cross a sequence
    end or the causal/window band; otherwise both tiles are full and every pair is inside the band, so
    no bounds or band test is made (data masks still apply). ``rows_base``: this head's (and sequence's)
    row 0 of the row table (:func:`row_table`); its rows past the sequence end are padding or the next
    sequence's, excluded by the bounds test."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m.to(tl.int64)
    row_ok = offs_m < Tq if BOUNDARY else offs_m >= 0
    if BOUNDARY:
        q = tl.load(q_base + rows[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(do_base + rows[:, None] * sdot + offs_dv[None, :] * sdod,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    else:
        q = tl.load(q_base + rows[:, None] * sqt + offs_d[None, :] * sqd, mask=offs_d[None, :] < D, other=0.0)
        do = tl.load(do_base + rows[:, None] * sdot + offs_dv[None, :] * sdod, mask=offs_dv[None, :] < DV, other=0.0)
    # one unmasked, aligned load of the tile's (lse or row max, 0 or log2 l, delta, 0)
    row_m, row_l, delta, _zero = row_quad(rows_base, start_m, BLOCK_M)
    if not HAS_BIAS:  # the first column is the lse: bring it to the log2 domain
        row_m = lse_log2(row_m)
        row_l = row_m
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [N, M]
    qi = offs_m[None, :]
    kj = offs_n[:, None]
    if HAS_BIAS:
        if BOUNDARY:
            bv = tl.load(bias_base + qi * sbm + kj * sbn, mask=(qi < Tq) & (kj < Tk), other=0.0)
        else:
            bv = tl.load(bias_base + qi * sbm + kj * sbn)
        st += bv.to(tl.float32)
    MASKED: tl.constexpr = BOUNDARY or HAS_MASK or HAS_KPM or APPLY_EM
    keep = qi  # unused unless MASKED
    if BOUNDARY or HAS_MASK or HAS_KPM:
        keep = _visible(qi, kj, Tq, Tk, diag, win_left, win_right, mask_base, smm, smn, kpm_base, skpn,
                        em_base, sem, sen, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM, False, BOUNDARY)
        if APPLY_EM:
            keep = keep & elem_mask(em_base, qi, kj, sem, sen, Tq, em_cols)
    elif APPLY_EM:
        keep = elem_mask(em_base, qi, kj, sem, sen, Tq, em_cols)
    dk, dv, dst = dkdv_step(dk, dv, q, do, v, st, keep, row_m, row_l, delta, DOT_PREC, MASKED, HAS_BIAS)
    # dst: dS^T = d loss / d (scores incl. bias), [N, M]
    if DB_MODE == 1:  # per-query bias: the tile itself
        _db_store(db_base + qi.to(tl.int64) * sdbm + kj * sdbn, dst, (qi < Tq) & (kj < Tk), DB_ACCUM)
    if DB_MODE == 2:  # per-key bias: sum over the query rows, kept in registers
        db_row += tl.sum(dst, 1)
    return dk, dv, db_row


@triton.jit(do_not_specialize=_NO_SPEC_DKDV)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Rows, DK, DVo, DB, Bias, Mask, KPM, EM, CuQ, CuK, KvNum, KvIdx, FullNum, FullIdx,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod, srb, srh,
    sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd, sdbb, sdbh, sdbm, sdbn,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, skpb, skpn, seb, seh, sem, sen, em_cols,
    H, G, Tq_arg, Tk_arg, Mq_bm, Nk_bm,
    scale_log2, scale, win_left, win_right, bias_hdiv, mask_hdiv, db_hdiv, NB_IN, NH_IN, Q_BUCKET, K_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_EM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SPARSE: tl.constexpr, HAS_FULL: tl.constexpr, BM_BQ: tl.constexpr, BM_BK: tl.constexpr,
    DB_MODE: tl.constexpr, DB_ACCUM: tl.constexpr,
    DOT_PREC: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Here the block-mask lists are transposed: per (b, h, key block) the query blocks that see it,
    # KvNum [B, H, Nk] / KvIdx [B, H, Nk, Mq]; Mq_bm is the number of key blocks, Nk_bm the row length.
    # A program owns one key tile of NB_IN batches x NH_IN kv heads (both 1 unless dbias is reduced over
    # the batch / the kv heads inside the program, see the module docstring). DB_MODE: 0 no dbias,
    # 1 per-query bias (tiles), 2 per-key bias (rows summed in registers).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hkv = H // G
    n_hgrp = Hkv // NH_IN
    b_grp = pid_bh // n_hgrp
    h_grp = pid_bh % n_hgrp
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale = scale if HAS_BIAS else scale_log2  # with a bias the scores stay in natural units
    for bi in range(0, NB_IN):
        b = b_grp * NB_IN + bi
        q0, Tq, k0, Tk = _seq_bounds(CuQ, CuK, b, Tq_arg, Tk_arg, IS_VARLEN)
        if start_n < Tk:
            b64 = b.to(tl.int64)
            rows_k = (k0 + offs_n).to(tl.int64)
            col_ok = offs_n < Tk
            diag = Tk - Tq
            kpm_base = KPM + b64 * skpb + k0 * 0
            kv_ok = col_ok
            if HAS_KPM:  # padded keys are never read: their K/V slots may hold NaN/inf (SPEC §0.3)
                kv_ok = kv_ok & (tl.load(kpm_base + offs_n * skpn, mask=col_ok, other=0) != 0)
            # query range [lo, hi) whose causal/window band reaches this key tile
            lo = Tq * 0
            hi = Tq
            if HAS_RIGHT:
                lo = tl.maximum(start_n - diag - win_right, 0)
            if HAS_LEFT:
                hi = tl.minimum(tl.minimum(start_n + BLOCK_N, Tk) - diag + win_left, Tq)
            for hi_ in range(0, NH_IN):
                hkv = h_grp * NH_IN + hi_
                k = tl.load(K + b64 * skb + hkv * skh + rows_k[:, None] * skt + offs_d[None, :] * skd,
                            mask=kv_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                v = tl.load(V + b64 * svb + hkv * svh + rows_k[:, None] * svt + offs_dv[None, :] * svd,
                            mask=kv_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
                dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
                for g in range(0, G):
                    h = hkv * G + g
                    q0_64 = q0.to(tl.int64)
                    q_base = Q + b64 * sqb + h * sqh + q0_64 * sqt
                    do_base = DO + b64 * sdob + h * sdoh + q0_64 * sdot
                    # the row table: (lse, 0, delta, 0), with a bias (row max, log2 l, delta, 0)
                    rows_base = Rows + b64 * srb + h.to(tl.int64) * srh + q0_64 * 4
                    bias_base = Bias + b64 * sbb + (h // bias_hdiv).to(tl.int64) * sbh
                    mask_base = Mask + b64 * smb + (h // mask_hdiv).to(tl.int64) * smh
                    em_base = EM + b64 * seb + h.to(tl.int64) * seh
                    db_base = DB + b64 * sdbb + (h // db_hdiv).to(tl.int64) * sdbh
                    db_row = tl.zeros([BLOCK_N], dtype=tl.float32)
                    if SPARSE:
                        tl.static_assert(BM_BQ % BLOCK_M == 0 and BM_BK % BLOCK_N == 0,
                                         "kernel tiles must divide BlockMask blocks")
                        row = (b64 * H + h) * Mq_bm + start_n // BM_BK
                        # part 0: full blocks (no element mask); part 1: partial ones (element mask when HAS_EM)
                        for part in tl.static_range(0 if HAS_FULL else 1, 2):
                            blk_num = FullNum if part == 0 else KvNum
                            blk_idx = FullIdx if part == 0 else KvIdx
                            # one flat loop over (listed block, kernel tile in it), unconditional loads
                            # (pipelined); the lists were cut to the band on the host (F.band_limited)
                            n_tiles = tl.load(blk_num + row) * (BM_BQ // BLOCK_M)
                            idx_base = blk_idx + row * Nk_bm
                            for j in range(0, n_tiles):
                                blk = tl.load(idx_base + j // (BM_BQ // BLOCK_M))
                                start_m = blk * BM_BQ + (j % (BM_BQ // BLOCK_M)) * BLOCK_M
                                dk, dv, db_row = _bwd_kv_inner(
                                    dk, dv, db_row, k, v, start_m, offs_n, Tq, Tk, diag, win_left, win_right,
                                    q_base, sqt, sqd, do_base, sdot, sdod, rows_base, D, DV,
                                    bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
                                    em_cols, db_base, sdbm, sdbn, qk_scale,
                                    HAS_BIAS, HAS_MASK, HAS_KPM, HAS_EM if part == 1 else False,
                                    HAS_LEFT, HAS_RIGHT, DB_MODE, DB_ACCUM,
                                    DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_DV, True)
                    else:
                        # One loop, every query tile tested: splitting it into boundary/interior loops (as the
                        # forward and dQ do) made ptxas spill 24-770 B/thread in most dK/dV tiles at sm_90
                        # (two [BLOCK_N, head] fp32 accumulators stay live across the three loops).
                        for start_m in range((lo // BLOCK_M) * BLOCK_M, hi, BLOCK_M):
                            dk, dv, db_row = _bwd_kv_inner(
                                dk, dv, db_row, k, v, start_m, offs_n, Tq, Tk, diag, win_left, win_right,
                                q_base, sqt, sqd, do_base, sdot, sdod, rows_base, D, DV,
                                bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                                db_base, sdbm, sdbn, qk_scale,
                                HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DB_MODE, DB_ACCUM,
                                DOT_PREC, BLOCK_M, BLOCK_D, BLOCK_DV, True)
                    if DB_MODE == 2:
                        _db_store(db_base + offs_n * sdbn, db_row, col_ok, DB_ACCUM)

                dk = dk * scale
                tl.store(DK + b64 * sdkb + hkv * sdkh + rows_k[:, None] * sdkt + offs_d[None, :] * sdkd,
                         dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
                tl.store(DVo + b64 * sdvb + hkv * sdvh + rows_k[:, None] * sdvt + offs_dv[None, :] * sdvd,
                         dv.to(DVo.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_q_inner(dq, q, do, row_m, row_l, delta, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                 k_base, v_base, skt, skd, svt, svd, D: tl.constexpr, DV: tl.constexpr,
                 bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                 qk_scale,
                 HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, APPLY_EM: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BOUNDARY: tl.constexpr):
    """One key tile of the dQ loop (also used by MoH); ``BOUNDARY`` and ``qk_scale`` as in the forward's
    ``_fwd_inner``; ``row_m``/``row_l`` as in ``triton_common_jit.probs`` (both the log2 lse without a
    bias)."""
    start_n = tl.multiple_of(start_n, BLOCK_N)  # every loop starts on the tile grid: aligned bias/mask rows
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_k = offs_n.to(tl.int64)
    k_ok = offs_n < Tk if BOUNDARY else offs_n >= 0
    if HAS_KPM:  # padded keys are never read: their K/V slots may hold NaN/inf (SPEC §0.3)
        k_ok = k_ok & (tl.load(kpm_base + offs_n * skpn, mask=offs_n < Tk, other=0) != 0)
    if BOUNDARY or HAS_KPM:
        k = tl.load(k_base + rows_k[:, None] * skt + offs_d[None, :] * skd,
                    mask=k_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        vt = tl.load(v_base + rows_k[None, :] * svt + offs_dv[:, None] * svd,
                     mask=k_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
    else:
        k = tl.load(k_base + rows_k[:, None] * skt + offs_d[None, :] * skd, mask=offs_d[None, :] < D, other=0.0)
        vt = tl.load(v_base + rows_k[None, :] * svt + offs_dv[:, None] * svd, mask=offs_dv[:, None] < DV, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    qi = offs_m[:, None]
    kj = offs_n[None, :]
    if HAS_BIAS:
        if BOUNDARY:
            bv = tl.load(bias_base + qi * sbm + kj * sbn, mask=(qi < Tq) & (kj < Tk), other=0.0)
        else:  # interior: keys in range, only a partial query tile's rows are bounded
            bv = tl.load(bias_base + qi * sbm + kj * sbn, mask=qi < Tq, other=0.0)
        s += bv.to(tl.float32)
    MASKED: tl.constexpr = BOUNDARY or HAS_MASK or HAS_KPM or APPLY_EM
    keep = qi  # unused unless MASKED
    if BOUNDARY or HAS_MASK or HAS_KPM:
        keep = _visible(qi, kj, Tq, Tk, diag, win_left, win_right, mask_base, smm, smn, kpm_base, skpn,
                        em_base, sem, sen, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM, False, BOUNDARY)
        if APPLY_EM:
            keep = keep & elem_mask(em_base, qi, kj, sem, sen, Tq, em_cols)
    elif APPLY_EM:
        keep = elem_mask(em_base, qi, kj, sem, sen, Tq, em_cols)
    dq, _ds = dq_step(dq, do, k, vt, s, keep, row_m, row_l, delta, DOT_PREC, MASKED, HAS_BIAS)
    return dq


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, STATS, DELTA, DQ, Bias, Mask, KPM, EM, CuQ, CuK, KvNum, KvIdx, FullNum, FullIdx,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod, slb, slh, slt,
    sdqb, sdqt, sdqh, sdqd,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, skpb, skpn, seb, seh, sem, sen, em_cols,
    H, G, Tq_arg, Tk_arg, Mq_bm, Nk_bm,
    scale_log2, scale, sst, win_left, win_right, bias_hdiv, mask_hdiv, Q_BUCKET, K_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_EM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SPARSE: tl.constexpr, HAS_FULL: tl.constexpr, BM_BQ: tl.constexpr, BM_BK: tl.constexpr,
    DOT_PREC: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // G
    q0, Tq, k0, Tk = _seq_bounds(CuQ, CuK, b, Tq_arg, Tk_arg, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= Tq:
        return
    b64 = b.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_q = (q0 + offs_m).to(tl.int64)
    row_ok = offs_m < Tq
    q = tl.load(Q + b64 * sqb + h * sqh + rows_q[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b64 * sdob + h * sdoh + rows_q[:, None] * sdot + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    delta = tl.load(DELTA + b64 * slb + h * slh + rows_q * slt, mask=row_ok, other=0.0)
    if HAS_BIAS:  # natural-unit scores: the forward's row max and log2 l
        row_m = tl.load(STATS + b64 * slb + h * slh + rows_q * slt, mask=row_ok, other=0.0)
        row_l = tl.load(STATS + sst + b64 * slb + h * slh + rows_q * slt, mask=row_ok, other=0.0)
        qk_scale = scale
    else:
        row_m = lse_log2(tl.load(LSE + b64 * slb + h * slh + rows_q * slt, mask=row_ok, other=0.0))
        row_l = row_m
        qk_scale = scale_log2
    k_base = K + b64 * skb + hkv * skh + k0.to(tl.int64) * skt
    v_base = V + b64 * svb + hkv * svh + k0.to(tl.int64) * svt
    bias_base = Bias + b64 * sbb + (h // bias_hdiv).to(tl.int64) * sbh
    mask_base = Mask + b64 * smb + (h // mask_hdiv).to(tl.int64) * smh
    kpm_base = KPM + b64 * skpb
    em_base = EM + b64 * seb + h.to(tl.int64) * seh
    diag = Tk - Tq
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo = Tk * 0
    hi = Tk
    if HAS_LEFT:
        lo = tl.maximum(start_m + diag - win_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tl.minimum(start_m + BLOCK_M, Tq) + diag + win_right, Tk)

    if SPARSE:
        tl.static_assert(BM_BQ % BLOCK_M == 0 and BM_BK % BLOCK_N == 0, "kernel tiles must divide BlockMask blocks")
        row = (b64 * H + h) * Mq_bm + start_m // BM_BQ
        # part 0: full blocks (no element mask); part 1: partial ones (element mask when HAS_EM)
        for part in tl.static_range(0 if HAS_FULL else 1, 2):
            blk_num = FullNum if part == 0 else KvNum
            blk_idx = FullIdx if part == 0 else KvIdx
            # one flat loop over (listed block, kernel tile in it), unconditional loads (pipelined); the
            # lists were cut to the band on the host (F.band_limited)
            n_tiles = tl.load(blk_num + row) * (BM_BK // BLOCK_N)
            idx_base = blk_idx + row * Nk_bm
            for j in range(0, n_tiles):
                start_n = tl.load(idx_base + j // (BM_BK // BLOCK_N)) * BM_BK + (j % (BM_BK // BLOCK_N)) * BLOCK_N
                dq = _bwd_q_inner(
                    dq, q, do, row_m, row_l, delta, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                    k_base, v_base, skt, skd, svt, svd, D, DV,
                    bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                    qk_scale,
                    HAS_BIAS, HAS_MASK, HAS_KPM, HAS_EM if part == 1 else False, HAS_LEFT, HAS_RIGHT,
                    DOT_PREC, BLOCK_N, BLOCK_D, BLOCK_DV, True)
    else:
        lo = (lo // BLOCK_N) * BLOCK_N
        # interior key tiles (as in the forward): no bounds or band test
        ilo = Tk * 0
        ihi = Tk
        if HAS_LEFT:
            ilo = tl.minimum(start_m + BLOCK_M, Tq) - 1 + diag - win_left
        if HAS_RIGHT:
            ihi = tl.minimum(start_m + diag + win_right + 1, Tk)
        mid_lo, mid_hi = split_range(lo, hi, ilo, ihi, BLOCK_N)
        for start_n in range(lo, mid_lo, BLOCK_N):
            dq = _bwd_q_inner(
                dq, q, do, row_m, row_l, delta, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                k_base, v_base, skt, skd, svt, svd, D, DV,
                bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                qk_scale,
                HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                BLOCK_N, BLOCK_D, BLOCK_DV, True)
        for start_n in range(mid_lo, mid_hi, BLOCK_N):
            dq = _bwd_q_inner(
                dq, q, do, row_m, row_l, delta, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                k_base, v_base, skt, skd, svt, svd, D, DV,
                bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                qk_scale,
                HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                BLOCK_N, BLOCK_D, BLOCK_DV, False)
        for start_n in range(mid_hi, hi, BLOCK_N):
            dq = _bwd_q_inner(
                dq, q, do, row_m, row_l, delta, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                k_base, v_base, skt, skd, svt, svd, D, DV,
                bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                qk_scale,
                HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                BLOCK_N, BLOCK_D, BLOCK_DV, True)

    dq = dq * scale
    tl.store(DQ + b64 * sdqb + h * sdqh + rows_q[:, None] * sdqt + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


# As the forward's (triton_fwd.GPU_FWD_CONFIGS): per head block at most 6 tiles that compile for sm_90
# without spilling, each list cut by tuning_configs. dK/dV keeps two [BLOCK_N, head] fp32 accumulators: at
# head block 128 that needs 8 warps and BLOCK_N <= 64 (64x64 spilled 72-176 B/thread), at 256 BLOCK_M *
# BLOCK_N <= 1024 (all listed: 0 B); at head block 64, 64x64/4 warps (24 B with a bias), 64x128/8 (16 B),
# 16x32/4 (8-32 B) and 16x16/4 (8 B) spilled: its 16x16 tile runs on 2 warps. dQ at head block 64: 32x16
# spilled 8 B with key padding. dK/dV at head blocks 64 and 128 also passes the codegen gate
# (tools/cross_compile.py --gate) on both Triton 3.6 (the GPU machine's) and 3.9 (CI's). Before dK/dV read
# its per-row values from the row table (row_table), 3.6 loaded the masked lse/delta vectors as BLOCK_M
# 4-byte cp.asyncs when BLOCK_N >= 64 (32 x 4 B for 32x64 and 32x128, 64 x 4 B for 64x64 -- "tile loads not
# 128-bit") and in the BlockMask loop also for 32x16, 16x16 and 32x32 at head block 128, so the BLOCK_N >= 64
# tiles were dropped (not re-measured with the table yet); 64x32/4 and 64x32/8 spill (8-24 B) on one version
# or the other at head block 64, 128x16/8 spills 24-48 B at head block 128; 32x32/4 passes the gate at head
# block 64 but spills 8-160 B with a window, varlen or dense mask on 3.9. A config that spills only with a
# BlockMask (its element-mask tiles live too) is marked F.NOT_SPARSE: 128x32/8 at head block 64 (40 B on 3.9),
# 16x16/4 at head block 128 (32 B on 3.6); 128x32/8 at head block 64 also spills 40 B (255 registers, 3.9)
# while summing a per-key dbias (F.NOT_KEY_DBIAS). F.FULL_REGS (maxnreg 255) where ptxas capped the registers
# at 128-168 and spilled 8-24 B: dK/dV 16x16/2 at head block 64 (3.6 causal, 3.9 varlen; 150-206 registers
# with it) and 16x32/4 at 128 (3.6, dense bias; 206), dQ 32x16/4 at 128 (3.6, key padding; 226) and 32x32/8,
# 16x64/8 at 256 (3.6, causal; 160).
_SM, _MID, _WIDE = F.SMALL, F.MID, F.WIDE
GPU_DKDV_CONFIGS = F.per_head_block({
    _SM: [(128, 32, 8, 2, F.NOT_SPARSE, F.NOT_KEY_DBIAS), (32, 16, 2, 2), (16, 32, 2, 2),
          (16, 16, 2, 2, F.FULL_REGS)],
    _MID: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2, F.FULL_REGS),
           (16, 16, 4, 2, F.NOT_SPARSE)],
    _WIDE: [(64, 16, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
})
GPU_DQ_CONFIGS = F.per_head_block({
    _SM: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (16, 16, 4, 2)],
    _MID: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 16, 4, 2, F.FULL_REGS),
           (16, 16, 4, 2)],
    _WIDE: [(32, 64, 8, 2), (32, 32, 8, 2, F.FULL_REGS), (16, 64, 8, 2, F.FULL_REGS), (16, 32, 4, 2), (16, 16, 4, 2)],
})


def transpose_block_lists(num: Optional[torch.Tensor], idx: Optional[torch.Tensor], n_kblocks: int):
    """kv lists ``[B, H, Mq]``/``[B, H, Mq, Nk]`` -> q lists ``[B, H, Nk, Mq]`` ("which query blocks list
    key block n"), int32 contiguous, listed blocks first in increasing order."""
    if num is None:
        return None, None
    B, H, Mq, W = idx.shape
    pos = torch.arange(W, device=idx.device)
    valid = pos < num[..., None].long()
    table = torch.zeros(B, H, Mq, n_kblocks + 1, dtype=torch.bool, device=idx.device)
    table.scatter_(-1, torch.where(valid, idx.long().clamp(0, n_kblocks - 1), n_kblocks), True)
    t = table[..., :n_kblocks].transpose(2, 3)  # [B, H, Nk, Mq]
    count = t.sum(-1).to(torch.int32).contiguous()
    ar = torch.arange(Mq, device=idx.device)
    key = torch.where(t, ar, Mq + ar)
    order = key.argsort(dim=-1, stable=True).to(torch.int32).contiguous()
    return count, order


class DbiasPlan(NamedTuple):
    """How the dK/dV kernel produces dbias for one bias shape (see the module docstring).

    ``mode``: 1 per-query bias (tiles), 2 per-key bias (``Tq == 1``, rows summed in registers).
    ``buf_shape``: the buffer the kernel writes, ``[Bo, Ho, bq, Tk]``; ``Bo``/``Ho`` exceed the bias' own
    batch/head counts only for a partial that the host then sums over that dim. ``nb_in``/``nh_in``:
    batches / kv heads each program loops over. ``accum``: a program adds into what it stored before.
    ``dtype``: the buffer's dtype (the bias dtype when every element is written once and not reduced).
    """

    mode: int
    buf_shape: Tuple[int, int, int, int]
    nb_in: int
    nh_in: int
    db_hdiv: int
    accum: bool
    dtype: torch.dtype


def dbias_plan(bias_shape, bias_dtype, B: int, H: int, Hkv: int, Tq: int, Tk: int,
               partial_max_bytes: Optional[int] = None) -> DbiasPlan:
    bb, bh, bq, _ = bias_shape
    if partial_max_bytes is None:
        partial_max_bytes = DBIAS_PARTIAL_MAX_BYTES
    G = H // Hkv
    mode = 2 if bq == 1 else 1
    reduce_b = bb != B  # bias shared by the batches (bb == 1 < B)
    cross_h = bh != H and bh != Hkv  # bias shared by all heads while Hkv > 1
    # candidates from most to least parallel: (partial over B, partial over kv heads)
    cands = [(pb, ph) for pb in ((True, False) if reduce_b else (False,))
             for ph in ((True, False) if cross_h else (False,))]
    for pb, ph in cands:
        Bo = B if pb else bb
        Ho = Hkv if ph else bh
        nbytes = Bo * Ho * bq * Tk * 4
        if mode == 2 or nbytes <= partial_max_bytes or (pb, ph) == cands[-1]:
            break
    nb_in = B if (reduce_b and not pb) else 1
    nh_in = Hkv if (cross_h and not ph) else 1
    db_hdiv = H // Ho
    accum = nb_in > 1 or nh_in > 1 or (G > 1 and db_hdiv > 1)
    direct = not accum and (Bo, Ho) == (bb, bh)
    return DbiasPlan(mode, (Bo, Ho, bq, Tk), nb_in, nh_in, db_hdiv, accum, bias_dtype if direct else torch.float32)


@torch.library.custom_op("attnzoo::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: torch.Tensor, lse: torch.Tensor,
    stats: torch.Tensor, bias: Optional[torch.Tensor], masks: List[Optional[torch.Tensor]],
    scale: float, causal: bool, window: List[int], max_seqlen: List[int], block_size: List[int], need_dbias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, dbias)``; ``dbias`` has the bias' own shape and dtype when ``need_dbias``
    (else it is an empty fp32 tensor). ``delta = rowsum(dO * O) - dlse`` laid out like ``lse`` (fp32);
    ``lse``, ``stats`` and ``masks`` .. ``block_size`` as from / for ``attnzoo::attention_fwd``."""
    masks = F.band_limited(masks, causal, window, max_seqlen, block_size)
    m = F.unpack_masks(masks)
    varlen = m.cu_seqlens_q is not None
    kv_num_blocks, kv_indices = m.kv_num_blocks, m.kv_indices
    full_kv_num_blocks, full_kv_indices = m.full_kv_num_blocks, m.full_kv_indices
    block_k = block_size[1]
    args, (B, H, Hkv, G, Tq, Tk, D, DV) = F.args_from_op(q, k, v, bias, masks, scale, causal, window, max_seqlen,
                                                         block_size)
    need_dbias = bool(need_dbias and bias is not None)
    dq = F.new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = F.new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = F.new_output(v.shape, dtype=v.dtype, device=v.device)
    if need_dbias:
        plan = dbias_plan(tuple(bias.shape), bias.dtype, B, H, Hkv, Tq, Tk)
        db = torch.zeros(plan.buf_shape, dtype=plan.dtype, device=q.device)  # zeros: tiles never visited
    else:
        plan = None
        db = q.new_zeros((1,), dtype=torch.float32)  # a real (never written) pointer for the kernel
    no_db = q.new_empty((0,), dtype=torch.float32)
    if k.numel() == 0 or q.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, _finish_dbias(db, bias) if need_dbias else no_db
    delta = delta.contiguous()
    lse = lse.contiguous()
    has_stats = bias is not None and stats.numel() > 0
    stats = stats.contiguous() if has_stats else lse
    sdo = F._bhq(do, varlen)
    args.update(DO=do, LSE=lse, STATS=stats, sst=stats.stride(0) if has_stats else 0, DELTA=delta, scale=scale,
                sdob=sdo[0], sdot=sdo[1], sdoh=sdo[2], sdod=sdo[3])
    args["slb"], args["slh"], args["slt"] = F.lse_strides(lse, varlen)

    # dQ
    a = dict(args)
    sdq = F._bhq(dq, varlen)
    a.update(DQ=dq, sdqb=sdq[0], sdqt=sdq[1], sdqh=sdq[2], sdqd=sdq[3])
    kernel, meta = F.launcher("bwd_dq", _attn_bwd_dq_kernel, GPU_DQ_CONFIGS)
    kernel[lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)](**a, **meta)

    # dK, dV (and dbias) over the transposed block lists; lse/stats and delta from one row table
    a = {n: x for n, x in args.items() if n not in ("LSE", "STATS", "DELTA", "sst", "slb", "slh", "slt")}
    extra = max(TC.ROW_PAD if varlen else 0, block_size[0] if kv_num_blocks is not None else 0)
    rows = row_table(lse, stats if has_stats else None, delta, extra)
    a.update(Rows=rows, srb=0 if varlen else rows.stride(0), srh=rows.stride(-3))
    if kv_num_blocks is not None:
        nkb = triton.cdiv(Tk, block_k)
        qn, qi = transpose_block_lists(kv_num_blocks, kv_indices, nkb)
        fqn, fqi = transpose_block_lists(full_kv_num_blocks, full_kv_indices, nkb)
        a.update(KvNum=qn, KvIdx=qi, Mq_bm=nkb, Nk_bm=qi.shape[-1])
        if fqn is not None:
            a.update(FullNum=fqn, FullIdx=fqi)
    sdk, sdv = F._bhq(dk, varlen), F._bhq(dv, varlen)
    a.update(DK=dk, DVo=dv, sdkb=sdk[0], sdkt=sdk[1], sdkh=sdk[2], sdkd=sdk[3],
             sdvb=sdv[0], sdvt=sdv[1], sdvh=sdv[2], sdvd=sdv[3])
    nb_in = plan.nb_in if plan else 1
    nh_in = plan.nh_in if plan else 1
    a.update(DB=db, db_hdiv=plan.db_hdiv if plan else 1, NB_IN=nb_in, NH_IN=nh_in,
             DB_MODE=plan.mode if plan else 0, DB_ACCUM=plan.accum if plan else False)
    a["sdbb"], a["sdbh"], a["sdbm"], a["sdbn"] = F._strides4(db) if need_dbias else (0, 0, 0, 0)
    kernel, meta = F.launcher("bwd_dkdv", _attn_bwd_dkdv_kernel, GPU_DKDV_CONFIGS,
                              extra_key=["DB_MODE", "DB_ACCUM"], reset_to_zero=["DB"])
    kernel[lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), (B // nb_in) * (Hkv // nh_in))](**a, **meta)
    return dq, dk, dv, _finish_dbias(db, bias) if need_dbias else no_db


def row_table(lse: torch.Tensor, stats: Optional[torch.Tensor], delta: torch.Tensor, extra: int) -> torch.Tensor:
    """The dK/dV kernel's per-row values as one padded fp32 table (:func:`attnzoo.ops.triton_common.row_table`):
    ``[B, H, Tq_pad, 4]`` (varlen ``[H, Nq_pad, 4]``) holding (lse, 0, delta, 0), or with a bias (``stats``
    ``[2, *lse.shape]``: row max, log2 l) (row max, log2 l, delta, 0); padded rows are 0. A query tile's
    values are then one unmasked, aligned 128-bit load (Triton 3.6 copied the masked lse/delta vectors as
    BLOCK_M 4-byte ``cp.async`` each). ``extra``: rows a tile may read past the last row (a varlen tile
    past the packed rows' end, a BlockMask block past ``Tq``)."""
    if stats is None:
        return TC.row_table([lse, None, delta], [0.0, 0.0, 0.0], extra=extra)
    return TC.row_table([stats[0], stats[1], delta], [0.0, 0.0, 0.0], extra=extra)


def _finish_dbias(db: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sum a partial dbias buffer over the (small) dims the bias broadcasts over; cast to the bias dtype."""
    if db.shape[0] != bias.shape[0]:
        db = db.sum(0, keepdim=True)
    if db.shape[1] != bias.shape[1]:
        db = db.sum(1, keepdim=True)
    return db.to(bias.dtype)


@attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, delta, lse, stats, bias, masks, scale, causal, window, max_seqlen, block_size,
                        need_dbias):
    if need_dbias and bias is not None:
        db = bias.new_empty(bias.shape)
    else:
        db = q.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), db


# ----------------------------------------------------------------------------------------------------
# Autograd of attnzoo::attention_fwd

_N_INPUTS = 10  # attention_fwd's argument count: q, k, v, bias, masks, scale, causal, window, max_seqlen, block_size


def _setup_context(ctx, inputs, output):
    q, k, v, bias, masks, scale, causal, window, max_seqlen, block_size = inputs
    o, lse, stats = output
    ctx.save_for_backward(q, k, v, o, lse, stats, bias, *masks)
    ctx.params = dict(scale=scale, causal=causal, window=window, max_seqlen=max_seqlen, block_size=block_size)


def _backward(ctx, do, dlse, _dstats):
    q, k, v, o, lse, stats, bias, *masks = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    if do is None:
        do = torch.zeros_like(o)
    # delta = rowsum(dO * O) - dlse, laid out like lse ([B, H, Tq], or [H, Nq] varlen)
    delta = (do.float() * o.float()).sum(-1)
    delta = delta.t() if masks[2] is not None else delta.transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse.float()
    dq, dk, dv, dbias = torch.ops.attnzoo.attention_bwd(
        do=do, q=q, k=k, v=v, delta=delta.contiguous(), lse=lse, stats=stats, bias=bias, masks=list(masks),
        need_dbias=need_dbias, **ctx.params)
    return (dq, dk, dv, dbias if need_dbias else None) + (None,) * (_N_INPUTS - 4)


F.attention_fwd.register_autograd(_backward, setup_context=_setup_context)
