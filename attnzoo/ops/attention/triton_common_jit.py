"""Triton ``@jit`` helpers shared by the softmax-family kernels: attention forward / backward / decode
(:mod:`.triton_fwd`, :mod:`.triton_bwd`, :mod:`.triton_decode`), MoH (:mod:`attnzoo.ops.moh.triton_moh`) and
DMA (:mod:`attnzoo.ops.dma.triton_dma`). Each piece of softmax arithmetic is written once here:

- :func:`seq_bounds`: a batch's (first query row, query count, first key row, key count), dense or varlen;
- :func:`visible`: the keep-mask of a (query, key) tile -- sequence ends, causal/window band, dense mask,
  key padding, BlockMask element mask;
- :func:`elem_mask`: a BlockMask element-mask tile from a mask padded to 16-key rows (vectorized loads);
- :func:`softmax_step` / :func:`softmax_finish`: one FlashAttention-2 online-softmax step over a key tile
  (in the log2 domain, ``acc`` rescaled then accumulated in place by ``tl.dot``) and the epilogue
  ``O = acc / l``, ``lse = (m + log2 l) ln 2`` (rows that saw no key: ``O = 0``, ``lse = -inf``);
- :func:`lse_log2`: a saved lse brought back to the log2 domain (``-inf`` rows map to 0, so masked
  entries give ``exp2(-inf) = 0`` and never ``-inf - -inf``);
- :func:`dq_step` / :func:`dkdv_step`: the backward's inner products of one tile,
  ``dQ += dS K`` and ``dV += P^T dO``, ``dK += dS^T Q``;
- :func:`row_pair` / :func:`row_quad`: a tile of rows of a padded side table
  (:func:`attnzoo.ops.triton_common.row_table`, 2 or 4 fp32 words a row) as one unmasked, aligned load,
  split into its columns.

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
def elem_mask(em_base, qi, kj, sem, sen, Tq, em_cols):
    """The BlockMask element mask of a (query, key) tile (broadcastable 2-D index tensors, either
    orientation), True = keep. The mask's rows are ``em_cols`` wide, padded past ``Tk`` with zeros to a
    multiple of 16 (``triton_fwd.pad_elem_mask``), so the column bound is constant over 16 keys and the
    tile loads with 128-bit loads even where it crosses ``Tk`` (keys past ``Tk`` read 0); the caller's
    bounds test still excludes them."""
    return tl.load(em_base + qi * sem + kj * sen, mask=(qi < Tq) & (kj < em_cols), other=0) != 0


@triton.jit
def softmax_step(acc, l_i, m_i, s, v, DOT_PREC: tl.constexpr, NAT: tl.constexpr):
    """One online-softmax step: ``s`` [M, N] are this tile's scores with excluded entries at ``-inf``,
    ``v`` [N, Dv] its values. Returns the updated (acc, l, m).

    Scores are in the log2 domain (``scale * log2(e)`` folded into the dot's scaling), or with ``NAT`` in
    natural units -- used with an additive bias: a finite bias is arithmetic (SPEC §0.2) and
    ``finfo.min * log2(e)`` would overflow to ``-inf``; differences to the running max are taken first and
    only then scaled by ``log2(e)``, which never overflows."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if NAT:
        p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
    else:
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def softmax_finish(acc, l_i, m_i, NAT: tl.constexpr):
    """(O = acc / l [fp32], lse [natural log], m, log2 l); a row that saw no key (l == 0) gets O = 0,
    lse = -inf and m = log2 l = 0. ``m`` (the row max, in the scores' units) and ``log2 l`` are the two
    halves of the lse that the backward needs separately when ``|m|`` is so large (a bias of -1e9 or
    finfo.min) that ``m + log l`` rounds to ``m``."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    log2l = tl.math.log2(l_safe)
    if NAT:
        lse = tl.where(empty, float("-inf"), m_i + log2l * LN2)
    else:
        lse = tl.where(empty, float("-inf"), (m_i + log2l) * LN2)
    m_row = tl.where(empty, 0.0, m_i)
    return o, lse, m_row, log2l


@triton.jit
def lse_log2(lse):
    """A saved lse in the log2 domain; rows with lse = -inf (they saw no key) map to 0."""
    return tl.where(lse == float("-inf"), 0.0, lse * LOG2E)


@triton.jit
def probs(s, keep, row_m, row_l, MASKED: tl.constexpr, NAT: tl.constexpr, ROWS_FIRST: tl.constexpr):
    """The backward's recomputed probabilities of a score tile: ``exp2(s - lse2)`` with ``row_m`` = lse in
    the log2 domain (:func:`lse_log2`), or with ``NAT`` (natural-unit scores, a bias present)
    ``exp2((s - m) log2(e) - log2 l)`` from the forward's row max ``row_m`` and ``row_l = log2 l``, so a huge
    ``|m|`` never absorbs ``log l``. Excluded entries (``keep`` false, when ``MASKED``) give 0. Rows run
    along axis 0 of ``s`` when ``ROWS_FIRST``, else along axis 1 (the transposed tiles of dK/dV)."""
    if ROWS_FIRST:
        rm = row_m[:, None]
        rl = row_l[:, None]
    else:
        rm = row_m[None, :]
        rl = row_l[None, :]
    if NAT:
        x = (s - rm) * LOG2E - rl
    else:
        x = s - rm
    if MASKED:
        x = tl.where(keep, x, float("-inf"))
    return tl.math.exp2(x)


@triton.jit
def dq_step(dq, do, k, vt, s, keep, row_m, row_l, delta, DOT_PREC: tl.constexpr, MASKED: tl.constexpr,
            NAT: tl.constexpr):
    """dQ of one key tile: ``P`` (:func:`probs`) on kept entries (every entry unless ``MASKED``),
    ``dS = P (dO V^T - delta)``, ``dQ += dS K`` (unscaled). ``s`` [M, N] scores, ``vt`` = V^T [Dv, N].
    Returns (dq, dS)."""
    p = probs(s, keep, row_m, row_l, MASKED, NAT, True)
    dp = tl.dot(do, vt, input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq, ds


@triton.jit
def dkdv_step(dk, dv, q, do, v, st, keep, row_m, row_l, delta, DOT_PREC: tl.constexpr, MASKED: tl.constexpr,
              NAT: tl.constexpr):
    """dK/dV of one query tile, transposed: ``st`` [N, M] scores S^T; ``P^T`` (:func:`probs`) on kept
    entries (every entry unless ``MASKED``), ``dV += P^T dO``, ``dS^T = P^T (V dO^T - delta)``,
    ``dK += dS^T Q`` (unscaled). Returns (dk, dv, dS^T)."""
    pt = probs(st, keep, row_m, row_l, MASKED, NAT, False)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv, dst


@triton.jit
def row_pair(table, start, BLOCK: tl.constexpr):
    """Rows ``[start, start + BLOCK)`` of a two-column side table (``triton_common.row_table``, fp32
    ``[R_pad, 2]``; ``table`` points at its row 0): one unmasked load of ``2 * BLOCK`` contiguous words.
    Returns the two columns ``[BLOCK]`` (fp32; the caller bit-casts integer columns)."""
    rec = tl.load(table + (2 * start + tl.arange(0, 2 * BLOCK))).reshape(BLOCK, 2)
    c0, c1 = tl.split(rec)
    return c0, c1


@triton.jit
def row_quad(table, start, BLOCK: tl.constexpr):
    """Rows ``[start, start + BLOCK)`` of a four-column side table (fp32 ``[R_pad, 4]``, 16 bytes a row):
    one unmasked load of ``4 * BLOCK`` contiguous words. Returns the four columns ``[BLOCK]``."""
    rec = tl.load(table + (4 * start + tl.arange(0, 4 * BLOCK))).reshape(BLOCK, 2, 2)
    even, odd = tl.split(rec)  # (c0, c2), (c1, c3)
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


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
