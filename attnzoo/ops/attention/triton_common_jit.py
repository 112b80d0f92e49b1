"""Triton ``@jit`` helpers shared by the softmax-family kernels: attention forward / backward / decode
(:mod:`.triton_fwd`, :mod:`.triton_bwd`, :mod:`.triton_decode`), MoH (:mod:`attnzoo.ops.moh.triton_moh`) and
DMA (:mod:`attnzoo.ops.dma.triton_dma`). Each piece of softmax arithmetic is written once here:

- :func:`seq_bounds`: a batch's (first query row, query count, first key row, key count), dense or varlen;
- :func:`visible`: the keep-mask of a (query, key) tile -- sequence ends, causal/window band, dense mask,
  key padding, BlockMask element mask;
- :func:`softmax_step` / :func:`softmax_finish`: one FlashAttention-2 online-softmax step over a key tile
  (in the log2 domain, ``acc`` rescaled then accumulated in place by ``tl.dot``) and the epilogue
  ``O = acc / l``, ``lse = (m + log2 l) ln 2`` (rows that saw no key: ``O = 0``, ``lse = -inf``);
- :func:`lse_log2`: a saved lse brought back to the log2 domain (``-inf`` rows map to 0, so masked
  entries give ``exp2(-inf) = 0`` and never ``-inf - -inf``);
- :func:`dq_step` / :func:`dkdv_step`: the backward's inner products of one tile,
  ``dQ += dS K`` and ``dV += P^T dO``, ``dK += dS^T Q``.

Constants: ``LOG2E`` / ``LN2`` are the values of :mod:`attnzoo.ops.triton_common` as ``tl.constexpr``.
This module imports triton (``attnzoo.ops.triton_common`` does not).
"""

from __future__ import annotations

import triton
import triton.language as tl

from attnzoo.ops import triton_common as TC

LOG2E = tl.constexpr(TC.LOG2E)
LN2 = tl.constexpr(TC.LN2)


@triton.jit
def seq_bounds(CuQ, CuK, b, Tq_arg, Tk_arg, IS_VARLEN: tl.constexpr):
    """(q0, Tq, k0, Tk) of batch ``b``: offsets from ``cu_seqlens`` when varlen, else 0 and the sizes."""
    if IS_VARLEN:
        q0 = tl.load(CuQ + b)
        Tq = tl.load(CuQ + b + 1) - q0
        k0 = tl.load(CuK + b)
        Tk = tl.load(CuK + b + 1) - k0
    else:
        q0 = b * 0
        k0 = b * 0
        Tq = b * 0 + Tq_arg
        Tk = b * 0 + Tk_arg
    return q0, Tq, k0, Tk


@triton.jit
def visible(qi, kj, Tq, Tk, diag, win_left, win_right,
            mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr,
            HAS_KPM: tl.constexpr, APPLY_EM: tl.constexpr, BAND: tl.constexpr):
    """Keep-mask for query positions ``qi`` and key positions ``kj`` (broadcastable 2-D index tensors,
    either orientation). ``diag = Tk - Tq``; window bounds already include causal (right = 0).

    ``BAND=True`` (a boundary tile): the sequence ends and the causal/window band are tested, then the
    data-dependent masks (dense mask, key padding, element mask). ``BAND=False`` (an interior tile: its keys
    lie inside the sequence and inside the band of every row of the tile): only the data-dependent masks,
    of which the caller guarantees at least one."""
    inb = (qi < Tq) & (kj < Tk)
    if BAND:
        keep = inb
        if HAS_LEFT or HAS_RIGHT:
            d = kj - qi - diag
            if HAS_LEFT:
                keep = keep & (d >= -win_left)
            if HAS_RIGHT:
                keep = keep & (d <= win_right)
        if HAS_MASK:
            keep = keep & (tl.load(mask_base + qi * smm + kj * smn, mask=inb, other=0) != 0)
        if HAS_KPM:
            keep = keep & (tl.load(kpm_base + kj * skpn, mask=kj < Tk, other=0) != 0)
        if APPLY_EM:
            keep = keep & (tl.load(em_base + qi * sem + kj * sen, mask=inb, other=0) != 0)
    else:
        # interior: every key is inside [0, Tk), so only the query rows bound the mask/element-mask loads
        tl.static_assert(HAS_MASK or HAS_KPM or APPLY_EM, "visible(BAND=False) needs a data mask")
        row_in = qi < Tq
        if HAS_KPM:
            keep = tl.load(kpm_base + kj * skpn) != 0
            if HAS_MASK:
                keep = keep & (tl.load(mask_base + qi * smm + kj * smn, mask=row_in, other=0) != 0)
            if APPLY_EM:
                keep = keep & (tl.load(em_base + qi * sem + kj * sen, mask=row_in, other=0) != 0)
        elif HAS_MASK:
            keep = tl.load(mask_base + qi * smm + kj * smn, mask=row_in, other=0) != 0
            if APPLY_EM:
                keep = keep & (tl.load(em_base + qi * sem + kj * sen, mask=row_in, other=0) != 0)
        else:
            keep = tl.load(em_base + qi * sem + kj * sen, mask=row_in, other=0) != 0
    return keep


@triton.jit
def softmax_step(acc, l_i, m_i, s, v, DOT_PREC: tl.constexpr):
    """One online-softmax step: ``s`` [M, N] are this tile's scores in the log2 domain with excluded
    entries at ``-inf``, ``v`` [N, Dv] its values. Returns the updated (acc, l, m)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def softmax_finish(acc, l_i, m_i):
    """(O = acc / l [fp32], lse [natural log]); a row that saw no key (l == 0) gets O = 0, lse = -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return o, lse


@triton.jit
def lse_log2(lse):
    """A saved lse in the log2 domain; rows with lse = -inf (they saw no key) map to 0."""
    return tl.where(lse == float("-inf"), 0.0, lse * LOG2E)


@triton.jit
def dq_step(dq, do, k, vt, s, keep, lse2, delta, DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    """dQ of one key tile: ``P = exp2(S - lse)`` on kept entries (every entry unless ``MASKED``),
    ``dS = P (dO V^T - delta)``, ``dQ += dS K`` (unscaled). ``s`` [M, N] log2-domain scores, ``vt`` = V^T
    [Dv, N]. Returns (dq, dS)."""
    if MASKED:
        p = tl.math.exp2(tl.where(keep, s - lse2[:, None], float("-inf")))
    else:
        p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, vt, input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq, ds


@triton.jit
def dkdv_step(dk, dv, q, do, v, st, keep, lse2, delta, DOT_PREC: tl.constexpr, MASKED: tl.constexpr):
    """dK/dV of one query tile, transposed: ``st`` [N, M] log2-domain scores S^T; ``P^T = exp2(S^T - lse)``
    on kept entries (every entry unless ``MASKED``), ``dV += P^T dO``, ``dS^T = P^T (V dO^T - delta)``,
    ``dK += dS^T Q`` (unscaled). Returns (dk, dv, dS^T)."""
    if MASKED:
        pt = tl.math.exp2(tl.where(keep, st - lse2[None, :], float("-inf")))
    else:
        pt = tl.math.exp2(st - lse2[None, :])
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv, dst


@triton.jit
def split_range(lo, hi, ilo, ihi, BLOCK: tl.constexpr):
    """Cut a tile loop ``range(lo, hi, BLOCK)`` (``lo`` a multiple of BLOCK) into boundary tiles
    ``[lo, a)``, interior tiles ``[a, b)`` and boundary tiles ``[b, hi)``: every interior tile lies wholly
    inside ``[ilo, ihi)`` (the positions no bound or band can cut). Returns (a, b), multiples of BLOCK, so
    the three loops visit exactly the tiles of the original one."""
    n_lo = lo // BLOCK
    n_hi = (tl.maximum(hi, 0) + BLOCK - 1) // BLOCK
    a = (tl.maximum(ilo, 0) + BLOCK - 1) // BLOCK
    a = tl.minimum(tl.maximum(a, n_lo), n_hi)
    b = tl.maximum(ihi, 0) // BLOCK
    b = tl.minimum(tl.maximum(b, a), n_hi)
    return a * BLOCK, b * BLOCK
