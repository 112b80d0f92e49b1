"""Head-sparse MoH attention kernels (SPEC §3): attention only for the active ``(token, head)`` pairs.

Packing (:func:`attnzoo.ops.moh.triton_packing.pack_active_rows_triton`, same layout as
:mod:`attnzoo.ops.moh.packing`): per ``(b, h)`` the positions of its active tokens, ascending,
and a flattened schedule of row tiles (``tile_offsets``). K and V stay dense.

Forward: one program per packed row tile of BLOCK_M rows. The program finds its ``(b, h)`` by binary
search in ``tile_offsets``, gathers its Q rows (invalid rows get position ``Tq`` and are masked), and
streams key tiles only over ``[min_pos + diag - left, max_pos + diag + right]``. Rows are sorted, so
``min_pos``/``max_pos`` are two scalar loads (the tile's first and last valid rows), not reductions over
the gathered positions: with loop bounds derived from a ``tl.min``/``tl.max``, Triton (3.9) gave the K
tiles of the interior and diagonal loops a 16-bit-per-thread layout and did not pipeline them (sm_90 PTX).
Key tiles inside the band of every valid row of the tile (``_interior_range``) run without bounds/band
tests, the others with. The online softmax is the core's ``_fwd_inner`` with the gathered positions
standing in for contiguous row indices (Q tile, running max/sum and the fp32 accumulator stay in
registers). Epilogue: ``O = acc / l * gate``, scattered back to ``[B, T, H]`` (inactive rows are never
written; the output starts zeroed); the log-sum-exp is stored at the original positions ``[B, H, T]``.

Backward (deterministic, no atomics):
* ``delta = rowsum(dO * O)`` equals ``rowsum(dO_u * O_u)`` with ``dO_u = gate * dO``, ``O_u = O / gate``;
  ``dgate = delta / gate`` on active pairs (``rowsum(dO * O_unscaled)``), 0 elsewhere.
* dQ: the forward's packed tiles again; gathered Q, ``gate * dO``, lse, delta in registers (gathered once
  per program, outside the key loop); key tiles
  stream through the core's ``_bwd_q_inner``; dQ scattered to the active rows (inactive rows stay 0).
* dK/dV: one program per (key tile, batch, kv head); K, V tiles and fp32 dK, dV accumulators in registers;
  loops over the query heads of the group and, for each, only over the packed active rows whose band can
  reach this key tile. Rows are sorted by position, so those rows are one contiguous run per head, built
  before launch by :func:`attnzoo.ops.moh.packing.key_tile_row_ranges` (two ``searchsorted`` per key tile,
  on the device); the loop walks the run in BLOCK_M-row tiles with unconditional loads (no data-dependent
  ``if`` around them), so Triton pipelines (cp.async) the tile's records -- (position, lse, delta, gate) per
  packed row, one aligned 128-bit load from a padded fp32 table built before launch
  (:func:`packed_row_table`, ``B*H*T*16`` bytes; the masked position load and the lse/delta/gate gathers
  it replaces were copied by Triton 3.6 as one 4-byte ``cp.async`` per row) -- and the gathers of Q and dO.
  The element test (band, key padding) masks the pairs that see nothing. Inactive rows never enter: cost
  follows the active fraction. Key-padded K/V rows are never loaded.

Decode (a few new queries, no gradient): :func:`moh_decode` runs the core's split-K decode kernel with the
gates instead -- one read of each K/V tile per GQA group, split across programs for long caches, and no
K/V read at all for a kv head none of whose query heads is active.

This module imports triton: import it lazily (``attnzoo.ops.moh.triton_backend`` does).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops import triton_common as TC
from attnzoo.ops.attention import triton_fwd as CF
from attnzoo.ops.attention.triton_bwd import _bwd_q_inner
from attnzoo.ops.attention.triton_common_jit import (
    dkdv_step, lse_log2, row_quad, softmax_finish, split_range, visible as _visible,
)
from attnzoo.ops.attention.triton_fwd import _fwd_inner
from attnzoo.ops.moh.packing import key_tile_row_ranges
from attnzoo.ops.moh.triton_packing import pack_active_rows_triton

_NO_SPEC = ["H", "G", "Tq", "Tk", "win_left", "win_right", "BH", "T_rows"]


@triton.jit
def _find_tile(TileOff, Counts, Rows, pid, BH, T_rows, Tq, SEARCH_STEPS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(bh, positions [BLOCK_M], valid [BLOCK_M], total tiles) of flattened tile ``pid``."""
    lo = pid * 0
    hi = lo + BH - 1
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        take = tl.load(TileOff + mid) <= pid
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    bh = lo
    tile = pid - tl.load(TileOff + bh)
    start = tile * BLOCK_M
    count = tl.load(Counts + bh)
    idx = start + tl.arange(0, BLOCK_M)
    valid = idx < count
    row_base = Rows + bh.to(tl.int64) * T_rows
    pos = tl.load(row_base + idx, mask=valid, other=0)
    pos = tl.where(valid, pos, Tq)
    # rows are sorted by position: the tile's first and last valid rows bound its positions (scalar loads)
    first = tl.load(row_base + start)
    last = tl.load(row_base + tl.minimum(start + BLOCK_M, count) - 1)
    return bh, pos, valid, first, last


@triton.jit
def _key_range(first, last, Tq, Tk, win_left, win_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Keys ``[lo, hi)`` that the causal/window band of a packed tile's rows (positions ``first`` ..
    ``last``) can reach; ``lo`` on the tile grid."""
    diag = Tk - Tq
    lo = Tk * 0
    hi = Tk
    if HAS_LEFT:
        lo = tl.maximum(first + diag - win_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(last + 1 + diag + win_right, Tk)
    return lo, hi


@triton.jit
def _interior_range(first, last, Tq, Tk, win_left, win_right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Keys ``[ilo, ihi)`` inside the causal/window band of every valid row of a packed tile (and inside
    ``[0, Tk)``): the interior key tiles, which need no bounds or band test."""
    diag = Tk - Tq
    ilo = Tk * 0
    ihi = Tk
    if HAS_LEFT:
        ilo = last + diag - win_left
    if HAS_RIGHT:
        ihi = tl.minimum(first + diag + win_right + 1, Tk)
    return ilo, ihi


@triton.jit
def _load_rows(ptr, b64, h, rows, valid, s_b, s_h, s_t, s_d, n_cols, BLOCK: tl.constexpr):
    """Gather rows ``rows`` (masked by ``valid``) of head ``h`` of a BTHD tensor: ``[BLOCK_M, BLOCK]``."""
    offs = tl.arange(0, BLOCK)
    return tl.load(ptr + b64 * s_b + h * s_h + rows[:, None] * s_t + offs[None, :] * s_d,
                   mask=valid[:, None] & (offs[None, :] < n_cols), other=0.0)


@triton.jit
def _load_q_do(Q, DO, gate, b64, h, rows, valid, sqb, sqt, sqh, sqd, sdob, sdot, sdoh, sdod, D, DV,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Q and ``gate * dO`` (the gradient of the unscaled output, in Q's dtype) of a packed row tile:
    what both backward kernels gather of their rows (``gate`` fp32 per row)."""
    q = _load_rows(Q, b64, h, rows, valid, sqb, sqh, sqt, sqd, D, BLOCK_D)
    do = _load_rows(DO, b64, h, rows, valid, sdob, sdoh, sdot, sdod, DV, BLOCK_DV)
    do = (do.to(tl.float32) * gate[:, None]).to(Q.dtype.element_ty)
    return q, do


@triton.jit(do_not_specialize=_NO_SPEC)
def _moh_fwd_kernel(
    Q, K, V, O, LSE, Gates, KPM, Rows, Counts, TileOff,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod,
    slb, slh, slt, sgb, sgt, sgh, skpb, skpn,
    BH, H, G, Tq, Tk, D: tl.constexpr, DV: tl.constexpr, T_rows, scale_log2, win_left, win_right,
    HAS_KPM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid >= tl.load(TileOff + BH):
        return
    bh, pos, valid, first, last = _find_tile(TileOff, Counts, Rows, pid, BH, T_rows, Tq, SEARCH_STEPS, BLOCK_M)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = pos.to(tl.int64)
    q = _load_rows(Q, b64, h, rows, valid, sqb, sqh, sqt, sqd, D, BLOCK_D)
    k_base = K + b64 * skb + (h // G) * skh
    v_base = V + b64 * svb + (h // G) * svh
    kpm_base = KPM + b64 * skpb
    diag = Tk - Tq
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, hi = _key_range(first, last, Tq, Tk, win_left, win_right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    ilo, ihi = _interior_range(first, last, Tq, Tk, win_left, win_right, HAS_LEFT, HAS_RIGHT)
    mid_lo, mid_hi = split_range(lo, hi, ilo, ihi, BLOCK_N)
    for start_n in range(lo, mid_lo, BLOCK_N):  # boundary tiles (window edge)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, start_n, pos, Tq, Tk, diag, win_left, win_right,
            k_base, v_base, skt, skd, svt, svd, D, DV,
            K, 0, 0, K, 0, 0, kpm_base, skpn, K, 0, 0, 0,
            scale_log2, False, False, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
            BLOCK_N, BLOCK_D, BLOCK_DV, True)
    for start_n in range(mid_lo, mid_hi, BLOCK_N):  # interior tiles: no bounds or band test
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, start_n, pos, Tq, Tk, diag, win_left, win_right,
            k_base, v_base, skt, skd, svt, svd, D, DV,
            K, 0, 0, K, 0, 0, kpm_base, skpn, K, 0, 0, 0,
            scale_log2, False, False, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
            BLOCK_N, BLOCK_D, BLOCK_DV, False)
    for start_n in range(mid_hi, hi, BLOCK_N):  # boundary tiles (diagonal, sequence end)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, start_n, pos, Tq, Tk, diag, win_left, win_right,
            k_base, v_base, skt, skd, svt, svd, D, DV,
            K, 0, 0, K, 0, 0, kpm_base, skpn, K, 0, 0, 0,
            scale_log2, False, False, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
            BLOCK_N, BLOCK_D, BLOCK_DV, True)
    o, lse, _m, _log2l = softmax_finish(acc, l_i, m_i, False)
    gate = tl.load(Gates + b64 * sgb + rows * sgt + h * sgh, mask=valid, other=0.0).to(tl.float32)
    o = o * gate[:, None]
    tl.store(O + b64 * sob + h * soh + rows[:, None] * sot + offs_dv[None, :] * sod, o.to(O.dtype.element_ty),
             mask=valid[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b64 * slb + h * slh + rows * slt, lse, mask=valid)


@triton.jit(do_not_specialize=_NO_SPEC)
def _moh_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, Gates, KPM, Rows, Counts, TileOff,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod,
    slb, slh, slt, sdqb, sdqt, sdqh, sdqd, sgb, sgt, sgh, skpb, skpn,
    BH, H, G, Tq, Tk, D: tl.constexpr, DV: tl.constexpr, T_rows, scale_log2, scale, win_left, win_right,
    HAS_KPM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid >= tl.load(TileOff + BH):
        return
    bh, pos, valid, first, last = _find_tile(TileOff, Counts, Rows, pid, BH, T_rows, Tq, SEARCH_STEPS, BLOCK_M)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    rows = pos.to(tl.int64)
    # the rows' values are gathered once per program (no loop to pipeline: the row table is dK/dV's)
    gate = tl.load(Gates + b64 * sgb + rows * sgt + h * sgh, mask=valid, other=0.0).to(tl.float32)
    q, do = _load_q_do(Q, DO, gate, b64, h, rows, valid, sqb, sqt, sqh, sqd, sdob, sdot, sdoh, sdod, D, DV,
                       BLOCK_D, BLOCK_DV)
    lse2 = lse_log2(tl.load(LSE + b64 * slb + h * slh + rows * slt, mask=valid, other=0.0))
    delta = tl.load(DELTA + b64 * slb + h * slh + rows * slt, mask=valid, other=0.0)
    k_base = K + b64 * skb + (h // G) * skh
    v_base = V + b64 * svb + (h // G) * svh
    kpm_base = KPM + b64 * skpb
    diag = Tk - Tq
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(first, last, Tq, Tk, win_left, win_right, HAS_LEFT, HAS_RIGHT, BLOCK_N)
    ilo, ihi = _interior_range(first, last, Tq, Tk, win_left, win_right, HAS_LEFT, HAS_RIGHT)
    mid_lo, mid_hi = split_range(lo, hi, ilo, ihi, BLOCK_N)
    for start_n in range(lo, mid_lo, BLOCK_N):
        dq = _bwd_q_inner(
            dq, q, do, lse2, lse2, delta, start_n, pos, Tq, Tk, diag, win_left, win_right,
            k_base, v_base, skt, skd, svt, svd, D, DV,
            K, 0, 0, K, 0, 0, kpm_base, skpn, K, 0, 0, 0, scale_log2,
            False, False, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
            BLOCK_N, BLOCK_D, BLOCK_DV, True)
    for start_n in range(mid_lo, mid_hi, BLOCK_N):
        dq = _bwd_q_inner(
            dq, q, do, lse2, lse2, delta, start_n, pos, Tq, Tk, diag, win_left, win_right,
            k_base, v_base, skt, skd, svt, svd, D, DV,
            K, 0, 0, K, 0, 0, kpm_base, skpn, K, 0, 0, 0, scale_log2,
            False, False, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
            BLOCK_N, BLOCK_D, BLOCK_DV, False)
    for start_n in range(mid_hi, hi, BLOCK_N):
        dq = _bwd_q_inner(
            dq, q, do, lse2, lse2, delta, start_n, pos, Tq, Tk, diag, win_left, win_right,
            k_base, v_base, skt, skd, svt, svd, D, DV,
            K, 0, 0, K, 0, 0, kpm_base, skpn, K, 0, 0, 0, scale_log2,
            False, False, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
            BLOCK_N, BLOCK_D, BLOCK_DV, True)
    dq = dq * scale
    tl.store(DQ + b64 * sdqb + h * sdqh + rows[:, None] * sdqt + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=valid[:, None] & (offs_d[None, :] < D))


@triton.jit(do_not_specialize=_NO_SPEC + ["n_ktiles"])
def _moh_bwd_dkdv_kernel(
    Q, K, V, DO, Tab, DK, DVo, KPM, Ranges,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod,
    s_tab, sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd, skpb, skpn,
    H, G, Tq, Tk, D: tl.constexpr, DV: tl.constexpr, n_ktiles, scale_log2, scale, win_left, win_right,
    HAS_KPM: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hkv = H // G
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    start_n = pid_n * BLOCK_N
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_k = offs_n.to(tl.int64)
    col_ok = offs_n < Tk
    kpm_base = KPM + b64 * skpb
    kv_ok = col_ok
    if HAS_KPM:  # padded keys are never read: their K/V slots may hold NaN/inf (SPEC §0.3)
        kv_ok = kv_ok & (tl.load(kpm_base + offs_n * skpn, mask=col_ok, other=0) != 0)
    k = tl.load(K + b64 * skb + hkv * skh + rows_k[:, None] * skt + offs_d[None, :] * skd,
                mask=kv_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b64 * svb + hkv * svh + rows_k[:, None] * svt + offs_dv[None, :] * svd,
                mask=kv_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    diag = Tk - Tq
    kj = offs_n[:, None]
    for g in range(0, G):
        h = hkv * G + g
        bh = b64 * H + h
        # the packed rows [r_lo, r_hi) of head h whose band reaches this key tile (packing.key_tile_row_ranges)
        rng = Ranges + (bh * n_ktiles + pid_n) * 2
        r_lo = tl.load(rng)
        r_hi = tl.load(rng + 1)
        tab = Tab + bh * s_tab  # head (b, h)'s packed row table (packed_row_table)
        # from a multiple of BLOCK_M (aligned row-table loads); the rows before r_lo see nothing of this
        # tile and are masked by the band test like any other invisible pair
        for start_m in range((r_lo // BLOCK_M) * BLOCK_M, r_hi, BLOCK_M):
            valid = start_m + tl.arange(0, BLOCK_M) < r_hi
            # one aligned 128-bit load of the tile's (position, lse, delta, gate) records
            pos_f, lse, delta, gate = row_quad(tab, start_m, BLOCK_M)
            pos = tl.where(valid, pos_f.to(tl.int32, bitcast=True), Tq)
            rows = pos.to(tl.int64)
            q, do = _load_q_do(Q, DO, gate, b64, h, rows, valid, sqb, sqt, sqh, sqd, sdob, sdot, sdoh, sdod,
                               D, DV, BLOCK_D, BLOCK_DV)
            lse2 = lse_log2(lse)
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # [N, M]
            keep = _visible(pos[None, :], kj, Tq, Tk, diag, win_left, win_right, K, 0, 0, kpm_base, skpn,
                            K, 0, 0, HAS_LEFT, HAS_RIGHT, False, HAS_KPM, False, True)
            dk, dv, _dst = dkdv_step(dk, dv, q, do, v, st, keep, lse2, lse2, delta, DOT_PREC, True, False)
    dk = dk * scale
    tl.store(DK + b64 * sdkb + hkv * sdkh + rows_k[:, None] * sdkt + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DVo + b64 * sdvb + hkv * sdvh + rows_k[:, None] * sdvt + offs_dv[None, :] * sdvd,
             dv.to(DVo.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


# ----------------------------------------------------------------------------------------------------
# Launch


def _tiles(D: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): one small fixed tile under the interpreter."""
    if TC.interpreter():
        return CF.INTERP_BLOCK, CF.INTERP_BLOCK, 1, 1
    if D <= 64:
        return 64, 64, 4, 3
    if D <= 128:
        return 64, 64, 4, 2
    return 32, 32, 4, 2


def _dkdv_tiles(bm: int, warps: int, D: int, DV: int) -> Tuple[int, int]:
    """(BLOCK_M, num_warps) of the dK/dV kernel, which keeps two [BLOCK_N, head] fp32 accumulators: from
    head dim 64 up 8 warps, and 32-row query tiles from 128 up, hold them without spilling (64 rows / 4
    warps spilled 80-290 B/thread at sm_90, tools/cross_compile.py). Its row tiles need not match the
    packing's: it walks each head's active rows itself."""
    if TC.interpreter() or max(D, DV) < 64:
        return bm, warps
    return (min(bm, 32) if max(D, DV) > 64 else bm), 8


def _window(causal: bool, window_left: int, window_right: int):
    right = 0 if causal else window_right
    return dict(win_left=max(window_left, 0), win_right=max(right, 0),
                HAS_LEFT=window_left >= 0, HAS_RIGHT=causal or window_right >= 0)


def _kpm_args(kpm: Optional[torch.Tensor], dummy: torch.Tensor):
    if kpm is None:
        return dict(KPM=dummy, skpb=0, skpn=0, HAS_KPM=False)
    kpm = CF._as_u8(kpm)
    return dict(KPM=kpm, skpb=kpm.stride(0), skpn=kpm.stride(1), HAS_KPM=True)


def _s(t):
    return tuple(t.stride())


def _problem(q, k, v, gates, kpm, scale, causal, window_left, window_right):
    """Kernel arguments shared by the three kernels (sizes, strides, flags)."""
    B, Tq, H, D = q.shape
    Tk, Hkv, DV = k.shape[1], k.shape[2], v.shape[-1]
    a = dict(Q=q, K=k, V=v, Gates=gates, H=H, G=H // Hkv, Tq=Tq, Tk=Tk, D=D, DV=DV, T_rows=Tq,
             scale_log2=scale * TC.LOG2E, DOT_PREC=CF.dot_precision(q.dtype),
             BLOCK_D=TC.head_block(D), BLOCK_DV=TC.head_block(DV))
    a["sqb"], a["sqt"], a["sqh"], a["sqd"] = q.stride()
    a["skb"], a["skt"], a["skh"], a["skd"] = k.stride()
    a["svb"], a["svt"], a["svh"], a["svd"] = v.stride()
    a["sgb"], a["sgt"], a["sgh"] = gates.stride()
    a.update(_window(causal, window_left, window_right))
    a.update(_kpm_args(kpm, q))
    return a


def _named(prefix: str, t: torch.Tensor) -> dict:
    """``{prefix + "b": stride0, ...}`` for a 4-D BTHD tensor or a 3-D [B, H, T] one."""
    names = "bthd" if t.dim() == 4 else "bht"
    return {f"{prefix}{n}": st for n, st in zip(names, t.stride())}


@torch.library.custom_op("attnzoo::moh_attention_fwd", mutates_args=())
def moh_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    scale: float, causal: bool, window_left: int, window_right: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``o [B, T, H, Dv]`` (zero on inactive rows), ``lse [B, H, T]`` (``-inf`` on inactive rows)
    and the packing (``rows [B, H, T]``, ``counts [B*H]``, ``tile_offsets [B*H+1]``) the backward reuses."""
    B, Tq, H, D = q.shape
    bm, bn, warps, stages = _tiles(max(D, v.shape[-1]))
    packed = pack_active_rows_triton(gates, bm)  # on the device, no host sync
    # inactive rows are written here (o = 0, lse = -inf); active rows by the kernel (NaN until then in tests)
    inactive = gates == 0
    o = TC.new_output((B, Tq, H, v.shape[-1]), dtype=q.dtype, device=q.device).masked_fill_(inactive[..., None], 0.0)
    lse = TC.new_output((B, H, Tq), dtype=torch.float32, device=q.device).masked_fill_(
        inactive.transpose(1, 2), float("-inf"))
    if packed.max_tiles == 0 or k.shape[1] == 0:  # no active row, or no key to see: every row is empty
        return o.zero_(), lse.fill_(float("-inf")), packed.rows, packed.counts, packed.tile_offsets
    a = _problem(q, k, v, gates, key_padding_mask, scale, causal, window_left, window_right)
    a.update(O=o, LSE=lse, Rows=packed.rows, Counts=packed.counts, TileOff=packed.tile_offsets, BH=B * H,
             SEARCH_STEPS=math.ceil(math.log2(max(B * H, 2))) + 1, BLOCK_M=bm, BLOCK_N=bn)
    a.update(_named("so", o))
    a["slb"], a["slh"], a["slt"] = lse.stride()
    _moh_fwd_kernel[(packed.max_tiles,)](**a, num_warps=warps, num_stages=stages)
    return o, lse, packed.rows, packed.counts, packed.tile_offsets


@moh_attention_fwd.register_fake
def _moh_attention_fwd_fake(q, k, v, gates, key_padding_mask, scale, causal, window_left, window_right):
    B, Tq, H, _ = q.shape
    o = q.new_empty(B, Tq, H, v.shape[-1])
    lse = q.new_empty(B, H, Tq, dtype=torch.float32)
    rows = q.new_empty(B, H, Tq, dtype=torch.int32)
    counts = q.new_empty(B * H, dtype=torch.int32)
    offs = q.new_empty(B * H + 1, dtype=torch.int32)
    return o, lse, rows, counts, offs


@torch.library.custom_op("attnzoo::moh_attention_bwd", mutates_args=())
def moh_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, tile_offsets: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], scale: float, causal: bool, window_left: int, window_right: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dgates)``; dK/dV summed over each GQA group; inactive pairs contribute nothing."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    bm, bn, warps, stages = _tiles(max(D, v.shape[-1]))
    do = do.contiguous()
    rowdot = (do.float() * o.float()).sum(-1)  # [B, T, H] = rowsum(dO_u * O_u) on active rows, 0 elsewhere
    active = gates != 0
    dgates = torch.where(active, rowdot / torch.where(active, gates.float(), 1.0), 0.0).to(gates.dtype)
    delta = rowdot.transpose(1, 2).contiguous()  # [B, H, T]
    dq = torch.zeros_like(q)
    if TC.fill_nan():
        dq.masked_fill_((gates != 0)[..., None], float("nan"))  # active rows must be written
    dk = TC.new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = TC.new_output(v.shape, dtype=v.dtype, device=v.device)
    if Tk == 0 or q.numel() == 0:
        return dq, dk.zero_(), dv.zero_(), dgates
    a = _problem(q, k, v, gates, key_padding_mask, scale, causal, window_left, window_right)
    a.update(DO=do, LSE=lse, DELTA=delta, Rows=rows, Counts=counts, scale=scale, BLOCK_M=bm, BLOCK_N=bn)
    a.update(_named("sdo", do))
    a["slb"], a["slh"], a["slt"] = lse.stride()
    n_tiles = B * H * triton.cdiv(Tq, bm)
    _moh_bwd_dq_kernel[(n_tiles,)](
        **a, DQ=dq, TileOff=tile_offsets, BH=B * H, SEARCH_STEPS=math.ceil(math.log2(max(B * H, 2))) + 1,
        **_named("sdq", dq), num_warps=warps, num_stages=stages)
    a["BLOCK_M"], dkdv_warps = _dkdv_tiles(bm, warps, D, v.shape[-1])
    ranges = key_tile_row_ranges(rows, counts, Tq, Tk, bn, causal=causal, window_left=window_left,
                                 window_right=window_right)
    tab = packed_row_table(rows, counts, lse, delta, gates)
    for name in ("Counts", "Rows", "T_rows", "LSE", "DELTA", "slb", "slh", "slt", "Gates", "sgb", "sgt", "sgh"):
        del a[name]  # dK/dV reads them from the packed row table
    _moh_bwd_dkdv_kernel[(triton.cdiv(Tk, bn), B * Hkv)](
        **a, Tab=tab, s_tab=tab.stride(1), DK=dk, DVo=dv, Ranges=ranges, n_ktiles=ranges.shape[2],
        **_named("sdk", dk), **_named("sdv", dv), num_warps=dkdv_warps, num_stages=stages)
    return dq, dk, dv, dgates


def packed_row_table(rows: torch.Tensor, counts: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                     gates: torch.Tensor) -> torch.Tensor:
    """The dK/dV kernel's per-row values in packed order (:func:`attnzoo.ops.triton_common.row_table`):
    ``[B, H, T_pad, 4]`` fp32, packed row ``r`` of head ``(b, h)`` holding (its position as int32 bits, lse,
    delta, gate) of that position; rows past the head's count (and the padding) hold position ``T`` (= no
    row), lse 0, delta 0, gate 0. ``rows``/``counts`` as from the packing, ``lse``/``delta`` ``[B, H, T]``,
    ``gates [B, T, H]``. The kernel then reads a packed tile's records with one aligned 128-bit load where it
    made a masked load of the positions and three gathers (lse, delta, gate) -- which Triton 3.6 issued as
    one 4-byte ``cp.async`` per row. On the device, no host sync."""
    B, H, T = rows.shape
    valid = torch.arange(T, device=rows.device) < counts.reshape(B, H, 1)
    idx = torch.where(valid, rows.long(), 0).clamp_(0, max(T - 1, 0))  # clamp: a compile-only run has no rows
    pos = torch.where(valid, rows, T)
    vals = [torch.where(valid, x.gather(-1, idx), 0.0) for x in (lse, delta, gates.transpose(1, 2).float())]
    return TC.row_table([pos, *vals], [T, 0.0, 0.0, 0.0])


@moh_attention_bwd.register_fake
def _moh_attention_bwd_fake(do, q, k, v, gates, o, lse, rows, counts, tile_offsets, key_padding_mask, scale, causal,
                            window_left, window_right):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(gates)


def _setup_context(ctx, inputs, output):
    q, k, v, gates, kpm, scale, causal, wl, wr = inputs
    o, lse, rows, counts, offs = output
    ctx.save_for_backward(q, k, v, gates, o, lse, rows, counts, offs, kpm)
    ctx.params = dict(scale=scale, causal=causal, window_left=wl, window_right=wr)


def _backward(ctx, do, dlse, drows, dcounts, doffs):
    q, k, v, gates, o, lse, rows, counts, offs, kpm = ctx.saved_tensors
    dq, dk, dv, dgates = moh_attention_bwd(do=do, q=q, k=k, v=v, gates=gates, o=o, lse=lse, rows=rows, counts=counts,
                                           tile_offsets=offs, key_padding_mask=kpm, **ctx.params)
    return dq, dk, dv, dgates, None, None, None, None, None


moh_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("attnzoo::moh_decode", mutates_args=())
def moh_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, scale: float, causal: bool,
    window_left: int, window_right: int,
) -> torch.Tensor:
    """Inference for a few new queries (``Tq <= 16``) against all keys: ``o [B, Tq, H, Dv]`` through the
    split-K decode kernel with gates (:func:`attnzoo.ops.attention.triton_decode.decode_launch`): one read
    of each K/V tile per GQA group, inactive rows skipped, kv heads with no active query head never read.
    No autograd (the training path is :func:`moh_attention_fwd`)."""
    from attnzoo.ops.attention.triton_decode import decode_launch

    B, Tk = k.shape[0], k.shape[1]
    lens = torch.full((B,), Tk, dtype=torch.int32, device=q.device)
    o, _lse = decode_launch(q, k, v, lens, None, scale, causal, window_left, window_right, gates=gates)
    return o


@moh_decode.register_fake
def _moh_decode_fake(q, k, v, gates, scale, causal, window_left, window_right):
    return q.new_empty((*q.shape[:3], v.shape[-1]))
