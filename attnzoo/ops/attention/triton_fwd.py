"""Triton forward kernel of the softmax attention core (SPEC §1), FlashAttention-2 style, and its custom op.

Algorithm. One program per (query tile of BLOCK_M rows, batch, query head). The Q tile stays in registers
for the whole program, with the running row max ``m``, row sum ``l`` (fp32) and the fp32 output
accumulator ``acc [BLOCK_M, Dv]``. Key/value tiles of BLOCK_N rows stream through (the compiler pipelines
the loads through shared memory): ``S = Q K^T`` (fp32 accumulation), scaled by ``scale * log2(e)`` so the
softmax uses ``exp2``, plus the additive bias, then the element mask (causal/window diagonal, dense mask,
key padding, block-mask element mask, sequence ends) sets ``-inf``; online softmax rescales ``acc`` and
``l`` by ``exp2(m_old - m_new)``; ``acc += P V`` with P cast to V's dtype. At the end ``O = acc / l`` and
``lse = (m + log2 l) * ln 2``. Rows that see no key keep ``l == 0`` and store ``O = 0``, ``lse = -inf``
(the running max is replaced by 0 while it is ``-inf``, so no ``-inf - -inf`` NaN ever forms).

What is skipped. With causal/window only the key tiles that intersect the visible band of this query tile
are visited (the loop bounds come from the diagonal ``j - i = Tk - Tq``). That loop is cut in three
(``triton_common_jit.split_range``, as FlashAttention-2 and Triton's fused-attention tutorial do): boundary
tiles left of the band's interior (window edge), interior tiles -- full, and inside the band of every row of
the query tile -- which load K/V without bounds masks and make no bounds/band test at all (only the data
masks: dense mask, key padding), and boundary tiles on the diagonal / at the sequence end.

With a bias, scores stay in natural units (``S = scale Q K^T + bias``; exp2 of differences times log2 e):
a finite bias is arithmetic even at finfo.min, whose log2-domain image would overflow to -inf (SPEC
§0.2). The forward then also stores each row's max and log2 of its sum (``STATS``) for the backward. With a BlockMask the program
walks only the key blocks listed for its (batch, head, query block) -- full blocks without the element
mask, partial ones with it -- so unlisted key blocks are never loaded. Kernel tiles must divide the
BlockMask's blocks (checked by the backend's ``supports``). Each list is walked as one flat loop over
(listed block, kernel tile inside it) whose K/V loads are unconditional, so they pipeline like the dense
loops' (cp.async): before launch the lists are cut to the causal/window band on the host
(:func:`band_limited`), so no per-tile band test guards the loads; the kernel tiles of a listed block that
the band cuts are masked by the element test like any boundary tile (every BlockMask tile runs with the
bounds/band test).

Layout BTHD with all strides passed (non-contiguous inputs work, broadcast bias/mask dims have stride 0);
varlen adds ``cu_seqlens`` offsets. Head dims ``D``/``DV`` are compile-time constants, padded to a power of
two (>= 16) with load masks that fold away when the head dim is already one: tiles then load with 128-bit
loads and the loop's K/V loads are pipelined (16-byte ``cp.async``) on sm_80+. Keys excluded by key
padding are never loaded (their slots may hold NaN/inf, SPEC §0.3). The softmax arithmetic (visibility
test, online-softmax step, epilogue) is shared with decode/MoH/DMA in ``triton_common_jit``.
Precision: fp16/bf16 dots accumulate in fp32; fp32 inputs use IEEE fp32 dots (``input_precision="ieee"``,
no TF32), so fp32 results match an fp32 reference.

Partial BlockMask blocks take their element mask from ``block_mask.mask_mod`` evaluated once, densely, in
Python before launch (a bool tensor broadcast over the batch/head dims the mask_mod ignores), its rows
padded with False to a multiple of 16 keys (:func:`pad_elem_mask`) so its tiles load 16 bytes at a time.
Fully listing-driven masks without a mask_mod need no dense tensor.

This module imports triton: import it lazily (``attnzoo.ops.attention.triton_backend`` does).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops.triton_common import (  # noqa: F401  (re-exported: kernel modules use F.interpreter() etc.)
    LN2, LOG2E, fill_nan, head_block, interpreter, length_bucket, new_output, tuning_configs,
)
from attnzoo.ops.attention.triton_common_jit import (  # noqa: F401  (_seq_bounds/_visible: older names)
    LOG2E as LOG2E_C, elem_mask, seq_bounds as _seq_bounds, softmax_finish, softmax_step, split_range,
    visible as _visible,
)

# Scalar int args that may be 1 must not be specialized into constants (keeps one compiled kernel and
# avoids constexpr/tensor type mixing in min/max); strides may be. Head dims are constexprs (D, DV).
_NO_SPEC = ["H", "G", "Tq_arg", "Tk_arg", "Mq_bm", "Nk_bm", "win_left", "win_right",
            "bias_hdiv", "mask_hdiv", "Q_BUCKET", "K_BUCKET"]


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------------
# Inner loop step (also used by MoH)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
               k_base, v_base, skt, skd, svt, svd, D: tl.constexpr, DV: tl.constexpr,
               bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
               qk_scale,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, APPLY_EM: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BOUNDARY: tl.constexpr):
    """One key tile of the forward. ``BOUNDARY``: the tile may cross the sequence end or the causal/window
    band (bounds-masked loads, band test); otherwise it is interior and tests only the data masks.
    ``qk_scale``: ``scale * log2(e)`` (log2-domain scores), or ``scale`` with a bias (natural units: the
    bias is added as it is, see ``softmax_step``)."""
    start_n = tl.multiple_of(start_n, BLOCK_N)  # every loop starts on the tile grid: aligned bias/mask rows
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_k = offs_n.to(tl.int64)
    k_ok = offs_n < Tk if BOUNDARY else offs_n >= 0
    if HAS_KPM:  # padded keys are never read: their K/V slots may hold NaN/inf (SPEC §0.3)
        k_ok = k_ok & (tl.load(kpm_base + offs_n * skpn, mask=offs_n < Tk, other=0) != 0)
    if BOUNDARY or HAS_KPM:
        kt = tl.load(k_base + rows_k[None, :] * skt + offs_d[:, None] * skd,
                     mask=k_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        v = tl.load(v_base + rows_k[:, None] * svt + offs_dv[None, :] * svd,
                    mask=k_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    else:
        kt = tl.load(k_base + rows_k[None, :] * skt + offs_d[:, None] * skd, mask=offs_d[:, None] < D, other=0.0)
        v = tl.load(v_base + rows_k[:, None] * svt + offs_dv[None, :] * svd, mask=offs_dv[None, :] < DV, other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    qi = offs_m[:, None]
    kj = offs_n[None, :]
    if HAS_BIAS:
        if BOUNDARY:
            bv = tl.load(bias_base + qi * sbm + kj * sbn, mask=(qi < Tq) & (kj < Tk), other=0.0)
        else:  # interior: keys in range, only a partial query tile's rows are bounded
            bv = tl.load(bias_base + qi * sbm + kj * sbn, mask=qi < Tq, other=0.0)
        s += bv.to(tl.float32)
    if BOUNDARY or HAS_MASK or HAS_KPM:
        keep = _visible(qi, kj, Tq, Tk, diag, win_left, win_right, mask_base, smm, smn, kpm_base, skpn,
                        em_base, sem, sen, HAS_LEFT, HAS_RIGHT, HAS_MASK, HAS_KPM, False, BOUNDARY)
        if APPLY_EM:
            keep = keep & elem_mask(em_base, qi, kj, sem, sen, Tq, em_cols)
        s = tl.where(keep, s, float("-inf"))
    elif APPLY_EM:
        s = tl.where(elem_mask(em_base, qi, kj, sem, sen, Tq, em_cols), s, float("-inf"))
    return softmax_step(acc, l_i, m_i, s, v, DOT_PREC, HAS_BIAS)


# ----------------------------------------------------------------------------------------------------
# Forward kernel


@triton.jit(do_not_specialize=_NO_SPEC)
def _attn_fwd_kernel(
    Q, K, V, O, LSE, STATS, Bias, Mask, KPM, EM, CuQ, CuK, KvNum, KvIdx, FullNum, FullIdx,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sob, sot, soh, sod, slb, slh, slt,
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
    q = tl.load(Q + b64 * sqb + h * sqh + rows_q[:, None] * sqt + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b64 * skb + hkv * skh + k0.to(tl.int64) * skt
    v_base = V + b64 * svb + hkv * svh + k0.to(tl.int64) * svt
    bias_base = Bias + b64 * sbb + (h // bias_hdiv).to(tl.int64) * sbh
    mask_base = Mask + b64 * smb + (h // mask_hdiv).to(tl.int64) * smh
    kpm_base = KPM + b64 * skpb
    em_base = EM + b64 * seb + h.to(tl.int64) * seh
    diag = Tk - Tq
    qk_scale = scale if HAS_BIAS else scale_log2  # with a bias the scores stay in natural units

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # key range [lo, hi) that the causal/window band of this query tile can reach
    lo = Tk * 0
    hi = Tk
    if HAS_LEFT:
        lo = tl.maximum(start_m + diag - win_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tl.minimum(start_m + BLOCK_M, Tq) + diag + win_right, Tk)

    if SPARSE:
        tl.static_assert(BM_BQ % BLOCK_M == 0 and BM_BK % BLOCK_N == 0, "kernel tiles must divide BlockMask blocks")
        row = (b64 * H + h) * Mq_bm + start_m // BM_BQ
        # part 0 walks the full blocks (no element mask), part 1 the partial ones (element mask when HAS_EM)
        for part in tl.static_range(0 if HAS_FULL else 1, 2):
            blk_num = FullNum if part == 0 else KvNum
            blk_idx = FullIdx if part == 0 else KvIdx
            # one flat loop over (listed block, kernel tile in it) with unconditional loads, so the
            # K/V loads pipeline; blocks outside the causal/window band were dropped from the lists
            # on the host (masks.block_mask.band_limited_lists), tiles of a listed block that the band
            # cuts are masked by the element test like any boundary tile
            n_tiles = tl.load(blk_num + row) * (BM_BK // BLOCK_N)
            idx_base = blk_idx + row * Nk_bm
            for j in range(0, n_tiles):
                start_n = tl.load(idx_base + j // (BM_BK // BLOCK_N)) * BM_BK + (j % (BM_BK // BLOCK_N)) * BLOCK_N
                acc, l_i, m_i = _fwd_inner(
                    acc, l_i, m_i, q, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                    k_base, v_base, skt, skd, svt, svd, D, DV,
                    bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                    qk_scale, HAS_BIAS, HAS_MASK, HAS_KPM, HAS_EM if part == 1 else False,
                    HAS_LEFT, HAS_RIGHT, DOT_PREC, BLOCK_N, BLOCK_D, BLOCK_DV, True)
    else:
        lo = (lo // BLOCK_N) * BLOCK_N
        # interior key tiles: inside [0, Tk) and inside the band of every row of this query tile
        ilo = Tk * 0
        ihi = Tk
        if HAS_LEFT:
            ilo = tl.minimum(start_m + BLOCK_M, Tq) - 1 + diag - win_left
        if HAS_RIGHT:
            ihi = tl.minimum(start_m + diag + win_right + 1, Tk)
        mid_lo, mid_hi = split_range(lo, hi, ilo, ihi, BLOCK_N)
        for start_n in range(lo, mid_lo, BLOCK_N):  # boundary tiles left of the interior (window)
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                k_base, v_base, skt, skd, svt, svd, D, DV,
                bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                qk_scale, HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                BLOCK_N, BLOCK_D, BLOCK_DV, True)
        for start_n in range(mid_lo, mid_hi, BLOCK_N):  # interior tiles: no bounds or band test
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                k_base, v_base, skt, skd, svt, svd, D, DV,
                bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                qk_scale, HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                BLOCK_N, BLOCK_D, BLOCK_DV, False)
        for start_n in range(mid_hi, hi, BLOCK_N):  # boundary tiles: the diagonal, the sequence end
            acc, l_i, m_i = _fwd_inner(
                acc, l_i, m_i, q, start_n, offs_m, Tq, Tk, diag, win_left, win_right,
                k_base, v_base, skt, skd, svt, svd, D, DV,
                bias_base, sbm, sbn, mask_base, smm, smn, kpm_base, skpn, em_base, sem, sen, em_cols,
                qk_scale, HAS_BIAS, HAS_MASK, HAS_KPM, False, HAS_LEFT, HAS_RIGHT, DOT_PREC,
                BLOCK_N, BLOCK_D, BLOCK_DV, True)

    o, lse, m_row, log2l = softmax_finish(acc, l_i, m_i, HAS_BIAS)
    row_ok = offs_m < Tq
    tl.store(O + b64 * sob + h * soh + rows_q[:, None] * sot + offs_dv[None, :] * sod, o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + b64 * slb + h * slh + rows_q * slt, lse, mask=row_ok)
    if HAS_BIAS:  # the lse's two halves for the backward (see softmax_finish), laid out like lse
        tl.store(STATS + b64 * slb + h * slh + rows_q * slt, m_row, mask=row_ok)
        tl.store(STATS + sst + b64 * slb + h * slh + rows_q * slt, log2l, mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# Launch configuration

# Autotune lists: per head block (max(BLOCK_D, BLOCK_DV)) at most 6 (BLOCK_M, BLOCK_N, num_warps,
# num_stages), each compiled for sm_90 with tools/cross_compile.py (Triton 3.9; causal, plain, window, bias,
# dense mask, key padding, varlen) and kept only where it spills nothing: the forward spills in none of
# these (max 254 registers, 128x128 tiles at head block 64); at 256 only tiles of <= 64x32 with 8 warps
# are offered. Each list goes through triton_common.tuning_configs, so ATTNZOO_AUTOTUNE=first compiles only
# its first entry. The interpreter uses one small fixed tile so tests cross tile boundaries with tiny shapes.
SMALL, MID, WIDE, ALL = (16, 32, 64), (128,), (256,), (16, 32, 64, 128, 256)


#: a config tuple's optional flags (its entries after the 4th):
#: the config is not offered with a BlockMask (it spills there)
NOT_SPARSE = "not-sparse"
#: not offered to the dK/dV kernel while it sums a per-key dbias in registers (``DB_MODE == 2``; it spills there)
NOT_KEY_DBIAS = "not-key-dbias"
#: compiled with ``maxnreg=255``: without it ptxas may cap the registers below 255 (128-168 seen, trading them
#: for occupancy) and spill 8-24 B/thread in a kernel that fits in 150-230 registers
FULL_REGS = "full-regs"


def per_head_block(table):
    """``{head blocks: [(BLOCK_M, BLOCK_N, warps, stages, *flags), ...]}`` -> ``(BLOCK_M, BLOCK_N, warps,
    stages, head blocks, *flags)`` tuples (flags: :data:`NOT_SPARSE`, :data:`NOT_KEY_DBIAS`,
    :data:`FULL_REGS`), each list cut by ``tuning_configs`` (its first entry under ATTNZOO_AUTOTUNE=first)."""
    return [(*c[:4], hbs, *c[4:]) for hbs, configs in table.items() for c in tuning_configs(configs)]


GPU_FWD_CONFIGS = per_head_block({
    SMALL: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2), (32, 32, 4, 2), (16, 16, 4, 2)],
    MID: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2), (16, 16, 4, 2)],
    WIDE: [(64, 32, 8, 2), (32, 64, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2), (16, 16, 4, 2)],
})
INTERP_BLOCK = 16


def prune_for_block_mask(configs, nargs, **kwargs):
    """Keep the configs listed for this head block whose tiles divide the BlockMask's blocks
    (``BM_BQ``/``BM_BK``) and whose flags allow the launch (:data:`NOT_SPARSE`, :data:`NOT_KEY_DBIAS`); if
    none is left, the 16x16 tile (it divides every block and fits every head)."""
    nargs = {**(nargs or {}), **kwargs}  # launch arguments passed by keyword arrive in kwargs
    bq, bk = nargs.get("BM_BQ", 0), nargs.get("BM_BK", 0)
    sparse = nargs.get("SPARSE", False)
    key_dbias = nargs.get("DB_MODE", 0) == 2
    bd = max(nargs.get("BLOCK_D", 16), nargs.get("BLOCK_DV", 16))
    out = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if sparse and (bq % bm or bk % bn or not c.sparse_ok):
            continue
        if key_dbias and not c.key_dbias_ok:
            continue
        if bd not in c.head_blocks:
            continue
        out.append(c)
    # the 16x16 tile divides every BlockMask block and fits every head (built here: under
    # ATTNZOO_AUTOTUNE=first the lists hold only their first entry)
    return out or [_config(16, 16, 4, 2, ALL)]


_KEY = ["Q_BUCKET", "K_BUCKET", "BLOCK_D", "BLOCK_DV", "HAS_BIAS", "HAS_MASK", "HAS_KPM", "HAS_EM", "IS_VARLEN",
        "HAS_LEFT", "HAS_RIGHT", "SPARSE", "BM_BQ", "BM_BK"]


def _config(bm: int, bn: int, warps: int, stages: int, head_blocks, *flags) -> "triton.Config":
    c = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages,
                      maxnreg=255 if FULL_REGS in flags else None)
    c.head_blocks = head_blocks  # read by prune_for_block_mask
    c.sparse_ok = NOT_SPARSE not in flags
    c.key_dbias_ok = NOT_KEY_DBIAS not in flags
    return c


def make_tuned(kernel, configs, extra_key=(), reset_to_zero=None):
    return triton.autotune(
        configs=[_config(*c) for c in configs],
        key=_KEY + list(extra_key),
        prune_configs_by={"early_config_prune": prune_for_block_mask},
        reset_to_zero=reset_to_zero,
    )(kernel)


_tuned_cache = {}


def launcher(name, kernel, configs, extra_key=(), reset_to_zero=None):
    """The kernel to launch and the extra meta-args it needs: autotuned on a GPU, one fixed config under
    the interpreter. ``reset_to_zero``: output arguments a kernel accumulates into (zeroed before every
    benchmarked run and once more after benchmarking, so the real run starts from zeros too)."""
    if interpreter():
        return kernel, {"BLOCK_M": INTERP_BLOCK, "BLOCK_N": INTERP_BLOCK}
    if name not in _tuned_cache:
        _tuned_cache[name] = make_tuned(kernel, configs, extra_key, reset_to_zero)
    return _tuned_cache[name], {}


# ----------------------------------------------------------------------------------------------------
# Host-side preparation shared with the backward


def _strides4(t: Optional[torch.Tensor]):
    """Strides of a 4-D broadcastable tensor, 0 for size-1 dims (they broadcast)."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(4))


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _bhq(q: torch.Tensor, varlen: bool):
    """(strides b, t, h, d) of a BTHD tensor; varlen tensors have no batch dim."""
    if varlen:
        return (0, q.stride(0), q.stride(1), q.stride(2))
    return tuple(q.stride(i) for i in range(4))


def common_args(q, k, v, bias, mask, kpm, em, cu_q, cu_k, kvn, kvi, fn, fi, scale, causal, window_left,
                window_right, max_seqlen_q, max_seqlen_k, block_q, block_k):
    """Kernel arguments describing the problem (tensors, strides, sizes, flags) shared by all kernels."""
    varlen = cu_q is not None
    H, D = q.shape[-2], q.shape[-1]
    Hkv, DV = k.shape[-2], v.shape[-1]
    G = H // Hkv
    if varlen:
        B = cu_q.shape[0] - 1
        Tq, Tk = max_seqlen_q, max_seqlen_k
    else:
        B, Tq, Tk = q.shape[0], q.shape[1], k.shape[1]
    dummy = q
    right = 0 if causal else window_right
    a = dict(
        Q=q, K=k, V=v,
        Bias=bias if bias is not None else dummy,
        Mask=_as_u8(mask) if mask is not None else dummy,
        KPM=_as_u8(kpm) if kpm is not None else dummy,
        EM=_as_u8(em) if em is not None else dummy,
        CuQ=cu_q if varlen else dummy, CuK=cu_k if varlen else dummy,
        KvNum=kvn if kvn is not None else dummy, KvIdx=kvi if kvi is not None else dummy,
        FullNum=fn if fn is not None else dummy, FullIdx=fi if fi is not None else dummy,
    )
    s = {}
    s["sqb"], s["sqt"], s["sqh"], s["sqd"] = _bhq(q, varlen)
    s["skb"], s["skt"], s["skh"], s["skd"] = _bhq(k, varlen)
    s["svb"], s["svt"], s["svh"], s["svd"] = _bhq(v, varlen)
    s["sbb"], s["sbh"], s["sbm"], s["sbn"] = _strides4(bias)
    s["smb"], s["smh"], s["smm"], s["smn"] = _strides4(mask)
    s["seb"], s["seh"], s["sem"], s["sen"] = _strides4(em)
    s["em_cols"] = em.shape[-1] if em is not None else 0
    if kpm is not None:
        s["skpb"], s["skpn"] = kpm.stride(0), kpm.stride(1)
    else:
        s["skpb"], s["skpn"] = 0, 0
    a.update(s)
    a.update(
        H=H, G=G, Tq_arg=Tq, Tk_arg=Tk, D=D, DV=DV,
        Mq_bm=kvn.shape[-1] if kvn is not None else 0, Nk_bm=kvi.shape[-1] if kvi is not None else 0,
        scale_log2=scale * LOG2E, scale=scale, win_left=max(window_left, 0), win_right=max(right, 0),
        bias_hdiv=(H // bias.shape[1]) if bias is not None and bias.shape[1] not in (1, H) else 1,
        mask_hdiv=(H // mask.shape[1]) if mask is not None and mask.shape[1] not in (1, H) else 1,
        Q_BUCKET=length_bucket(Tq), K_BUCKET=length_bucket(Tk),
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, HAS_KPM=kpm is not None, HAS_EM=em is not None,
        IS_VARLEN=varlen, HAS_LEFT=window_left >= 0, HAS_RIGHT=causal or window_right >= 0,
        SPARSE=kvn is not None, HAS_FULL=fn is not None, BM_BQ=block_q if kvn is not None else 0,
        BM_BK=block_k if kvn is not None else 0,
        DOT_PREC=dot_precision(q.dtype), BLOCK_D=head_block(D), BLOCK_DV=head_block(DV),
    )
    return a, (B, H, Hkv, G, Tq, Tk, D, DV)


def lse_shape(q, cu_q, B, H, Tq):
    return (H, q.shape[0]) if cu_q is not None else (B, H, Tq)


def lse_strides(lse: torch.Tensor, varlen: bool):
    if varlen:  # [H, Nq]
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


# ----------------------------------------------------------------------------------------------------
# The custom op


class Masks(NamedTuple):
    """What restricts the keys a query sees, travelling to the custom ops as one ``Tensor?[]`` (``masks``),
    in this order; :meth:`pack` / :func:`unpack_masks` convert. Block-mask lists are ``[B, H, Mq]`` /
    ``[B, H, Mq, Nk]`` int32 contiguous (already expanded); ``elem_mask`` is the partial blocks' element mask
    ``[B|1, H|1, Tq, Tk]``."""

    mask: Optional[torch.Tensor] = None
    key_padding_mask: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    kv_num_blocks: Optional[torch.Tensor] = None
    kv_indices: Optional[torch.Tensor] = None
    full_kv_num_blocks: Optional[torch.Tensor] = None
    full_kv_indices: Optional[torch.Tensor] = None
    elem_mask: Optional[torch.Tensor] = None

    def pack(self) -> List[Optional[torch.Tensor]]:
        return list(self)


def unpack_masks(masks: Sequence[Optional[torch.Tensor]]) -> Masks:
    if len(masks) != len(Masks._fields):
        raise ValueError(f"masks: expected {len(Masks._fields)} entries {Masks._fields}, got {len(masks)}")
    return Masks(*masks)


def band_limited(masks: Sequence[Optional[torch.Tensor]], causal: bool, window: Sequence[int],
                 max_seqlen: Sequence[int], block_size: Sequence[int]) -> List[Optional[torch.Tensor]]:
    """``masks`` with the BlockMask lists cut to the causal/window band
    (:func:`attnzoo.ops.masks.block_mask.band_limited_lists`): the kernels walk the listed blocks with no
    band test of their own. Unchanged without a BlockMask or a band."""
    m = unpack_masks(masks)
    if m.kv_num_blocks is None or not (causal or window[0] >= 0 or window[1] >= 0):
        return list(masks)
    from attnzoo.ops.masks.block_mask import band_limited_lists

    kw = dict(causal=causal, window_left=window[0], window_right=window[1])
    sizes = (max_seqlen[0], max_seqlen[1], tuple(block_size))
    kvn, kvi = band_limited_lists(m.kv_num_blocks, m.kv_indices, *sizes, **kw)
    fn, fi = band_limited_lists(m.full_kv_num_blocks, m.full_kv_indices, *sizes, **kw)
    return m._replace(kv_num_blocks=kvn, kv_indices=kvi, full_kv_num_blocks=fn, full_kv_indices=fi).pack()


def args_from_op(q, k, v, bias, masks, scale, causal, window, max_seqlen, block_size):
    """:func:`common_args` from the custom ops' grouped arguments."""
    m = unpack_masks(masks)
    return common_args(
        q, k, v, bias, m.mask, m.key_padding_mask, m.elem_mask, m.cu_seqlens_q, m.cu_seqlens_k, m.kv_num_blocks,
        m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices, scale, causal, window[0], window[1], max_seqlen[0],
        max_seqlen[1], block_size[0], block_size[1])


@torch.library.custom_op("attnzoo::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
    masks: List[Optional[torch.Tensor]], scale: float, causal: bool, window: List[int], max_seqlen: List[int],
    block_size: List[int],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention forward: ``(o, lse, stats)``. ``masks``: a packed :class:`Masks`; ``window`` =
    (left, right), ``max_seqlen`` = (q, k), ``block_size`` = the BlockMask's (q, k) blocks ((0, 0) without
    one). ``stats`` (for the backward only): with a bias, ``[2, *lse.shape]`` fp32 = each row's score max
    and ``log2`` of its sum (the lse in two parts that a huge bias cannot round together); else empty."""
    masks = band_limited(masks, causal, window, max_seqlen, block_size)
    args, (B, H, Hkv, G, Tq, Tk, D, DV) = args_from_op(q, k, v, bias, masks, scale, causal, window, max_seqlen,
                                                       block_size)
    cu_seqlens_q = unpack_masks(masks).cu_seqlens_q
    varlen = cu_seqlens_q is not None
    o = new_output(q.shape[:-1] + (DV,), dtype=q.dtype, device=q.device)
    lse = new_output(lse_shape(q, cu_seqlens_q, B, H, Tq), dtype=torch.float32, device=q.device)
    stats = new_output(_stats_shape(lse.shape, bias), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse, stats
    so = _bhq(o, varlen)
    args.update(O=o, LSE=lse, STATS=stats if bias is not None else lse, sst=stats.stride(0) if bias is not None else 0,
                sob=so[0], sot=so[1], soh=so[2], sod=so[3])
    args["slb"], args["slh"], args["slt"] = lse_strides(lse, varlen)
    kernel, meta = launcher("fwd", _attn_fwd_kernel, GPU_FWD_CONFIGS)
    grid = lambda META: (triton.cdiv(max(Tq, 1), META["BLOCK_M"]), B * H)  # noqa: E731
    kernel[grid](**args, **meta)
    return o, lse, stats


def _stats_shape(lse_shape, bias):
    return (2, *lse_shape) if bias is not None else (0,)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, bias, masks, scale, causal, window, max_seqlen, block_size):
    H = q.shape[-2]
    o = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    if unpack_masks(masks).cu_seqlens_q is not None:  # varlen: [H, total queries]
        lse = q.new_empty((H, q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], H, q.shape[1]), dtype=torch.float32)
    return o, lse, q.new_empty(_stats_shape(lse.shape, bias), dtype=torch.float32)


def block_mask_tensors(block_mask, B: int, H: int, Tq: int, Tk: int, device):
    """Expand a BlockMask's lists to ``[B, H, ...]`` int32 contiguous and evaluate its mask_mod once into
    the partial blocks' element mask (broadcast over the dims the mask_mod ignores)."""
    from attnzoo.ops.masks.block_mask import _eval_mask_mod

    def prep(t, extra):
        if t is None:
            return None
        t = t.to(device=device, dtype=torch.int32)
        return t.expand(B, H, *t.shape[2:]).contiguous() if extra else t.expand(B, H, t.shape[2]).contiguous()

    kvn = prep(block_mask.kv_num_blocks, False)
    kvi = prep(block_mask.kv_indices, True)
    fn = prep(block_mask.full_kv_num_blocks, False)
    fi = prep(block_mask.full_kv_indices, True)
    em = None
    if block_mask.mask_mod is not None:
        em = _eval_mask_mod(block_mask.mask_mod, B, H, Tq, Tk, device)
        # keep only the dims mask_mod depends on (the rest broadcast with stride 0)
        em = em[tuple(slice(None) if st != 0 else slice(0, 1) for st in em.stride())]
    return [kvn, kvi, fn, fi, pad_elem_mask(em)], tuple(block_mask.block_size)


def pad_elem_mask(em: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The partial blocks' element mask as the kernels read it (``triton_common_jit.elem_mask``): rows
    padded with False to a multiple of 16 keys, unit stride along keys, so a tile of it loads with 128-bit
    loads. A copy only when ``Tk`` is not a multiple of 16 or the key dim is strided."""
    if em is None:
        return None
    tk = em.shape[-1]
    cols = -(-tk // 16) * 16
    if cols == tk and (em.stride(-1) == 1 or tk <= 1):
        return em
    out = torch.zeros(*em.shape[:-1], cols, dtype=em.dtype, device=em.device)
    out[..., :tk] = em
    return out
