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
* dQ kernel: one program per (query tile, batch, query head); Q, dO, lse, delta and the dQ accumulator
  stay in registers while key tiles stream: ``dQ += dS K``. When the bias needs a gradient this kernel
  also writes ``dS`` into a full ``[B, H, Tq, Tk]`` fp32 buffer (zeros where tiles are skipped), which the
  host then sums down to the bias' own broadcast shape. That full-size dbias is a first version: simple
  and exact, but it costs ``B*H*Tq*Tk*4`` bytes; a reduction inside the kernel is future work.

What is skipped: as in the forward, tiles outside the causal/window band are never visited (the loop
bounds come from the diagonal), and with a BlockMask only listed blocks are visited (the dK/dV kernel uses
the transposed lists, "which query blocks see this key block", built on the host from the kv lists).
Masked entries have ``P = 0`` so they contribute nothing; fully masked rows (lse = -inf) get zero
gradients, never NaN.

This module imports triton: import it lazily (``attnzoo.ops.attention.triton_backend`` does).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops.attention import triton_fwd as F
from attnzoo.ops.attention.triton_fwd import _NO_SPEC, _seq_bounds, _visible


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, start_m, offs_n, Tq, Tk, diag, win_left, win_right,
                  q_base, sqt, sqd, do_base, sdot, sdod, lse_base, delta_base, slt, D, DV,
                  bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
                  scale_log2,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, APPLY_EM: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = offs_m.to(tl.int64)
    row_ok = offs_m < Tq
    q = tl.load(q_base + rows[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_base + rows[:, None] * sdot + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(lse_base + rows * slt, mask=row_ok, other=0.0)
    delta = tl.load(delta_base + rows * slt, mask=row_ok, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * scale_log2  # [N, M]
    qi = offs_m[None, :]
    kj = offs_n[:, None]
    if HAS_BIAS:
        bv = tl.load(bias_base + qi * sbm + kj * sbn, mask=(qi < Tq) & (kj < Tk), other=0.0)
        st += bv.to(tl.float32) * 1.4426950408889634
    keep = _visible(qi, kj, Tq, Tk, diag, win_left, win_right, mask_base, smm, smn, kpm_base, skpn,
                    em_base, sem, sen, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM, APPLY_EM)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    pt = tl.math.exp2(tl.where(keep, st - lse2[None, :], float("-inf")))
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DVo, Bias, Mask, KPM, EM, CuQ, CuK, KvNum, KvIdx, FullNum, FullIdx,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod, slb, slh, slt,
    sdkb, sdkt, sdkh, sdkd, sdvb, sdvt, sdvh, sdvd,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, skpb, skpn, seb, seh, sem, sen,
    H, G, Tq_arg, Tk_arg, D, DV, Mq_bm, Nk_bm,
    scale_log2, scale, win_left, win_right, bias_hdiv, mask_hdiv, Q_BUCKET, K_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_EM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SPARSE: tl.constexpr, HAS_FULL: tl.constexpr, BM_BQ: tl.constexpr, BM_BK: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Here the block-mask lists are transposed: per (b, h, key block) the query blocks that see it,
    # KvNum [B, H, Nk] / KvIdx [B, H, Nk, Mq]; Mq_bm is the number of key blocks, Nk_bm the row length.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    Hkv = H // G
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    q0, Tq, k0, Tk = _seq_bounds(CuQ, CuK, b, Tq_arg, Tk_arg, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= Tk:
        return
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_k = (k0 + offs_n).to(tl.int64)
    col_ok = offs_n < Tk
    k = tl.load(K + b64 * skb + hkv * skh + rows_k[:, None] * skt + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b64 * svb + hkv * svh + rows_k[:, None] * svt + offs_dv[None, :] * svd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    diag = Tk - Tq
    kpm_base = KPM + b64 * skpb + k0 * 0

    # query range [lo, hi) whose causal/window band reaches this key tile
    lo = Tq * 0
    hi = Tq
    if HAS_RIGHT:
        lo = tl.maximum(start_n - diag - win_right, 0)
    if HAS_LEFT:
        hi = tl.minimum(tl.minimum(start_n + BLOCK_N, Tk) - diag + win_left, Tq)

    for g in range(0, G):
        h = hkv * G + g
        q0_64 = q0.to(tl.int64)
        q_base = Q + b64 * sqb + h * sqh + q0_64 * sqt
        do_base = DO + b64 * sdob + h * sdoh + q0_64 * sdot
        lse_base = LSE + b64 * slb + h * slh + q0_64 * slt
        delta_base = DELTA + b64 * slb + h * slh + q0_64 * slt
        bias_base = Bias + b64 * sbb + (h // bias_hdiv) * sbh
        mask_base = Mask + b64 * smb + (h // mask_hdiv) * smh
        em_base = EM + b64 * seb + h * seh
        if SPARSE:
            tl.static_assert(BM_BQ % BLOCK_M == 0 and BM_BK % BLOCK_N == 0, "kernel tiles must divide BlockMask blocks")
            row = (b64 * H + h) * Mq_bm + start_n // BM_BK
            if HAS_FULL:
                n_full = tl.load(FullNum + row)
                for i in range(0, n_full):
                    mb = tl.load(FullIdx + row * Nk_bm + i)
                    for sub in range(0, BM_BQ // BLOCK_M):
                        start_m = mb * BM_BQ + sub * BLOCK_M
                        if (start_m < hi) & (start_m + BLOCK_M > lo):
                            dk, dv = _bwd_kv_inner(
                                dk, dv, k, v, start_m, offs_n, Tq, Tk, diag, win_left, win_right,
                                q_base, sqt, sqd, do_base, sdot, sdod, lse_base, delta_base, slt, D, DV,
                                bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
                                scale_log2, HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                                BLOCK_M, BLOCK_D, BLOCK_DV)
            n_part = tl.load(KvNum + row)
            for i in range(0, n_part):
                mb = tl.load(KvIdx + row * Nk_bm + i)
                for sub in range(0, BM_BQ // BLOCK_M):
                    start_m = mb * BM_BQ + sub * BLOCK_M
                    if (start_m < hi) & (start_m + BLOCK_M > lo):
                        dk, dv = _bwd_kv_inner(
                            dk, dv, k, v, start_m, offs_n, Tq, Tk, diag, win_left, win_right,
                            q_base, sqt, sqd, do_base, sdot, sdod, lse_base, delta_base, slt, D, DV,
                            bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
                            scale_log2, HAS_BIAS, HAS_MASK, HAS_KPM, HAS_EM, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                            BLOCK_M, BLOCK_D, BLOCK_DV)
        else:
            lo_m = (lo // BLOCK_M) * BLOCK_M
            for start_m in range(lo_m, hi, BLOCK_M):
                dk, dv = _bwd_kv_inner(
                    dk, dv, k, v, start_m, offs_n, Tq, Tk, diag, win_left, win_right,
                    q_base, sqt, sqd, do_base, sdot, sdod, lse_base, delta_base, slt, D, DV,
                    bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
                    scale_log2, HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                    BLOCK_M, BLOCK_D, BLOCK_DV)

    dk = dk * scale
    tl.store(DK + b64 * sdkb + hkv * sdkh + rows_k[:, None] * sdkt + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DVo + b64 * sdvb + hkv * sdvh + rows_k[:, None] * sdvt + offs_dv[None, :] * sdvd,
             dv.to(DVo.dtype.element_ty), mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_q_inner(dq, q, do, lse2, delta, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                 k_base, v_base, skt, skd, svt, svd, D, DV,
                 bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
                 ds_base, sdsm, sdsn, scale_log2,
                 HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, APPLY_EM: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, STORE_DS: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_k = offs_n.to(tl.int64)
    col_ok = offs_n < Tk
    k = tl.load(k_base + rows_k[:, None] * skt + offs_d[None, :] * skd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    vt = tl.load(v_base + rows_k[None, :] * svt + offs_dv[:, None] * svd,
                 mask=col_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    qi = offs_m[:, None]
    kj = offs_n[None, :]
    inb = (qi < Tq) & (kj < Tk)
    if HAS_BIAS:
        bv = tl.load(bias_base + qi * sbm + kj * sbn, mask=inb, other=0.0)
        s += bv.to(tl.float32) * 1.4426950408889634
    keep = _visible(qi, kj, Tq, Tk, diag, win_left, win_right, mask_base, smm, smn, kpm_base, skpn,
                    em_base, sem, sen, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM, APPLY_EM)
    p = tl.math.exp2(tl.where(keep, s - lse2[:, None], float("-inf")))
    dp = tl.dot(do, vt, input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    if STORE_DS:
        tl.store(ds_base + qi.to(tl.int64) * sdsm + kj * sdsn, ds, mask=inb)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DS, Bias, Mask, KPM, EM, CuQ, CuK, KvNum, KvIdx, FullNum, FullIdx,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sdob, sdot, sdoh, sdod, slb, slh, slt,
    sdqb, sdqt, sdqh, sdqd, sdsb, sdsh, sdsm, sdsn,
    sbb, sbh, sbm, sbn, smb, smh, smm, smn, skpb, skpn, seb, seh, sem, sen,
    H, G, Tq_arg, Tk_arg, D, DV, Mq_bm, Nk_bm,
    scale_log2, scale, win_left, win_right, bias_hdiv, mask_hdiv, Q_BUCKET, K_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_EM: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SPARSE: tl.constexpr, HAS_FULL: tl.constexpr, BM_BQ: tl.constexpr, BM_BK: tl.constexpr,
    STORE_DS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
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
    lse = tl.load(LSE + b64 * slb + h * slh + rows_q * slt, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b64 * slb + h * slh + rows_q * slt, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    k_base = K + b64 * skb + hkv * skh + k0.to(tl.int64) * skt
    v_base = V + b64 * svb + hkv * svh + k0.to(tl.int64) * svt
    bias_base = Bias + b64 * sbb + (h // bias_hdiv) * sbh
    mask_base = Mask + b64 * smb + (h // mask_hdiv) * smh
    kpm_base = KPM + b64 * skpb
    em_base = EM + b64 * seb + h * seh
    ds_base = DS + b64 * sdsb + h * sdsh
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
        if HAS_FULL:
            n_full = tl.load(FullNum + row)
            for i in range(0, n_full):
                kb = tl.load(FullIdx + row * Nk_bm + i)
                for sub in range(0, BM_BK // BLOCK_N):
                    start_n = kb * BM_BK + sub * BLOCK_N
                    if (start_n < hi) & (start_n + BLOCK_N > lo):
                        dq = _bwd_q_inner(
                            dq, q, do, lse2, delta, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                            k_base, v_base, skt, skd, svt, svd, D, DV,
                            bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
                            ds_base, sdsm, sdsn, scale_log2,
                            HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, STORE_DS, DOT_PREC,
                            BLOCK_N, BLOCK_D, BLOCK_DV)
        n_part = tl.load(KvNum + row)
        for i in range(0, n_part):
            kb = tl.load(KvIdx + row * Nk_bm + i)
            for sub in range(0, BM_BK // BLOCK_N):
                start_n = kb * BM_BK + sub * BLOCK_N
                if (start_n < hi) & (start_n + BLOCK_N > lo):
                    dq = _bwd_q_inner(
                        dq, q, do, lse2, delta, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                        k_base, v_base, skt, skd, svt, svd, D, DV,
                        bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
                        ds_base, sdsm, sdsn, scale_log2,
                        HAS_BIAS, HAS_MASK, HAS_KPM, HAS_EM, HAS_LEFT, HAS_RIGHT, STORE_DS, DOT_PREC,
                        BLOCK_N, BLOCK_D, BLOCK_DV)
    else:
        lo = (lo // BLOCK_N) * BLOCK_N
        for start_n in range(lo, hi, BLOCK_N):
            dq = _bwd_q_inner(
                dq, q, do, lse2, delta, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                k_base, v_base, skt, skd, svt, svd, D, DV,
                bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
                ds_base, sdsm, sdsn, scale_log2,
                HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, STORE_DS, DOT_PREC,
                BLOCK_N, BLOCK_D, BLOCK_DV)

    dq = dq * scale
    tl.store(DQ + b64 * sdqb + h * sdqh + rows_q[:, None] * sdqt + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


GPU_DKDV_CONFIGS = [(32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (64, 64, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2)]
GPU_DQ_CONFIGS = [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)]


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


@torch.library.custom_op("attnzoo::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
    elem_mask: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
    kv_num_blocks: Optional[torch.Tensor], kv_indices: Optional[torch.Tensor],
    full_kv_num_blocks: Optional[torch.Tensor], full_kv_indices: Optional[torch.Tensor],
    scale: float, causal: bool, window_left: int, window_right: int, max_seqlen_q: int, max_seqlen_k: int,
    block_q: int, block_k: int, need_dbias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dq, dk, dv, ds)``; ``ds`` is the full ``[B, H, Tq, Tk]`` fp32 gradient of the scores when
    ``need_dbias`` (else an empty tensor) -- the caller reduces it to the bias' shape."""
    varlen = cu_seqlens_q is not None
    args, (B, H, Hkv, G, Tq, Tk, D, DV) = F.common_args(
        q, k, v, bias, mask, key_padding_mask, elem_mask, cu_seqlens_q, cu_seqlens_k, kv_num_blocks, kv_indices,
        full_kv_num_blocks, full_kv_indices, scale, causal, window_left, window_right, max_seqlen_q, max_seqlen_k,
        block_q, block_k)
    dq = F.new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = F.new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = F.new_output(v.shape, dtype=v.dtype, device=v.device)
    ds = (torch.zeros((B, H, Tq, Tk), dtype=torch.float32, device=q.device) if need_dbias
          else q.new_empty((0,), dtype=torch.float32))
    if k.numel() == 0 or q.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, ds
    # delta = rowsum(dO * O) - dlse, laid out like lse
    delta = (do.float() * o.float()).sum(-1)  # [B, Tq, H] or [Nq, H]
    delta = delta.t() if varlen else delta.transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    sdo = F._bhq(do, varlen)
    args.update(DO=do, LSE=lse, DELTA=delta, scale=scale,
                sdob=sdo[0], sdot=sdo[1], sdoh=sdo[2], sdod=sdo[3])
    args["slb"], args["slh"], args["slt"] = F.lse_strides(lse, varlen)

    # dQ (and dS)
    a = dict(args)
    sdq = F._bhq(dq, varlen)
    a.update(DQ=dq, DS=ds if need_dbias else q, STORE_DS=need_dbias,
             sdqb=sdq[0], sdqt=sdq[1], sdqh=sdq[2], sdqd=sdq[3])
    a["sdsb"], a["sdsh"], a["sdsm"], a["sdsn"] = (ds.stride() if need_dbias else (0, 0, 0, 0))
    kernel, meta = F.launcher("bwd_dq", _attn_bwd_dq_kernel, GPU_DQ_CONFIGS)
    kernel[lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * H)](**a, **meta)

    # dK, dV over the transposed block lists
    a = dict(args)
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
    kernel, meta = F.launcher("bwd_dkdv", _attn_bwd_dkdv_kernel, GPU_DKDV_CONFIGS)
    kernel[lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), B * Hkv)](**a, **meta)
    return dq, dk, dv, ds


@attention_bwd.register_fake
def _attention_bwd_fake(do, q, k, v, o, lse, dlse, bias, mask, key_padding_mask, elem_mask, cu_seqlens_q,
                        cu_seqlens_k, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, scale, causal,
                        window_left, window_right, max_seqlen_q, max_seqlen_k, block_q, block_k, need_dbias):
    if need_dbias:
        ds = q.new_empty((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dtype=torch.float32)
    else:
        ds = q.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), ds


def reduce_dbias(ds: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Sum the full ``[B, H, Tq, Tk]`` score gradient down to ``bias``' broadcast shape."""
    B, H, Tq, Tk = ds.shape
    bb, bh, bq, _ = bias.shape
    if bh != H:
        ds = ds.sum(1, keepdim=True) if bh == 1 else ds.view(B, bh, H // bh, Tq, Tk).sum(2)
    if bb != B:
        ds = ds.sum(0, keepdim=True)
    if bq != Tq:
        ds = ds.sum(2, keepdim=True)
    return ds.to(bias.dtype)


# ----------------------------------------------------------------------------------------------------
# Autograd of attnzoo::attention_fwd

_N_INPUTS = 21  # attention_fwd's argument count


def _setup_context(ctx, inputs, output):
    (q, k, v, bias, mask, kpm, em, cu_q, cu_k, kvn, kvi, fn, fi,
     scale, causal, wl, wr, max_q, max_k, bq, bk) = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, bias, mask, kpm, em, cu_q, cu_k, kvn, kvi, fn, fi)
    ctx.params = (scale, causal, wl, wr, max_q, max_k, bq, bk)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, bias, mask, kpm, em, cu_q, cu_k, kvn, kvi, fn, fi = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv, ds = torch.ops.attnzoo.attention_bwd(
        do, q, k, v, o, lse, dlse, bias, mask, kpm, em, cu_q, cu_k, kvn, kvi, fn, fi, *ctx.params, need_dbias)
    dbias = reduce_dbias(ds, bias) if need_dbias else None
    return (dq, dk, dv, dbias) + (None,) * (_N_INPUTS - 4)


F.attention_fwd.register_autograd(_backward, setup_context=_setup_context)
