"""Chunked lightning attention in Triton (SPEC §6): forward, backward, and their torch custom ops.

Algorithm (Lightning Attention-2 tiling). Every program owns one (sequence, head) and a slice of the state
``S [D, Dv]`` and walks that sequence's chunks of ``BT`` tokens in order, keeping its state slice in fp32
registers the whole way. Per chunk: the intra-chunk part is the masked quadratic form
``((Q K^T) * M) V`` on a ``BT x BT`` tile (``M_ij = lambda^(i-j)``, entries above the diagonal are
``where``-ed to 0, never ``exp(+x) * 0``); the inter-chunk part is ``lambda^(i+1) Q S``; then
``S <- lambda^L S + (lambda^(L-1-j) K)^T V`` (``L`` = the chunk's length, shorter for the last one).
- Forward: grid ``(n_seqs * H, Dv / BV)``; state tile ``[BD, BV]`` (all of D, a block of Dv).
- Backward, no saved states -- each sweep *recomputes* its state on the fly, so the backward keeps nothing
  but q, k, v, S0 (O(1) extra memory, better than storing chunk-boundary states):
  dQ: forward sweep, grid ``(n*H, D/BK)``, state tile ``[BK, BDV]`` (a D block, all of Dv);
  dK: reverse sweep carrying ``dS = dLoss/dS_end`` (tile ``[BK, BDV]``), starting from d(final state);
  dV: reverse sweep, dS tile ``[BD, BV]``; it also writes d(initial state) = dS after chunk 0.
  ``dS <- lambda^L dS + scale * (lambda^(i+1) Q)^T dO`` depends only on (q's D block, dO's Dv block),
  so the state slices never need each other.
- Head dims are padded to powers of two >= 16 (96 -> 128, 192 -> 256) with masked loads/stores; D and
  Dv are independent. Tokens past a sequence's end are masked (loaded as 0, never stored).
- Precision: tiles are loaded in the input dtype; Q K^T and the masked score tile times V (or dO) run in
  that dtype with fp32 accumulation, like the reference in that dtype. The per-row decay weights of the
  inter-chunk terms are applied after the dot (``lambda^(i+1) * (Q S)``). Products with the fp32 state
  (``Q S``, ``dO S^T``, ``V dS^T``, ``K dS``) split the state, scaled so its max is 2^14 (no fp16
  overflow), into hi + lo halves in the input dtype: two tensor-core dots, ~22 bits kept. The
  decay-weighted K (or Q) that builds the state is split the same way: rounding it once biased the fp16
  final state past the accuracy rule. fp32 inputs use exact ("ieee") dots everywhere: correct but slow
  (no tensor cores; a quarter-size state slice keeps spills small up to head dim 128, larger ones spill);
  use fp16/bf16 for speed.
- Registers: the per-tile offsets are int32 around one int64 scalar base per chunk. Products with the
  state run transposed (the state as the tall operand: a wgmma on Hopper, see :func:`_dot_state`). Chunk
  64 (head dims <= 64, half precision), 32 (<= 128) or 16, 8 warps: chosen from offline sm_90 compiles
  (no GPU here to time them) as the largest chunks that spill nothing (:func:`default_chunk_size`);
  ``tools/cross_compile.py --gate`` holds every kernel at head dims 64 and 128 to 128-bit loads,
  cp.async pipelining and zero spill.
- Varlen: sequences come from ``cu_seqlens`` (a dense batch is ``cu = arange(B + 1) * T``); the state
  restarts from ``initial_state[i]`` (or 0) at every sequence.
- Segments (dense batches only): when ``n_seqs * H * (Dv / BV)`` programs would leave the GPU under-filled
  (long sequences, small batch), each sequence is cut into P segments that run as sequences of their own,
  their initial states (forward) and end-of-segment state gradients (backward) joined by a closed-form
  scan over the segments' states-from-zero -- see "Segments" below (:func:`segment_plan`).
Nothing is skipped: linear attention has no sparsity; only the upper triangle of each tile is masked.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops.triton_common import new_output


@triton.jit
def _dot_hi_lo(a, b, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """``a @ b`` for an fp32 tile ``a`` and an input-dtype tile ``b``: with SPLIT (fp16/bf16 inputs) ``a`` is
    split as ``hi + lo`` in ``b``'s dtype and both run on tensor cores -- nearly fp32-exact for the
    decay-weighted k or q that builds the state (rounding them once would bias the state at fp16 level)."""
    if SPLIT:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        acc = tl.dot(hi, b, input_precision=DOT_PREC) + tl.dot(lo, b, input_precision=DOT_PREC)
    else:
        acc = tl.dot(a.to(b.dtype), b, input_precision=DOT_PREC)
    return acc


@triton.jit
def _dot_state(x, S, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """``x @ S`` for an input-dtype tile ``x`` and an fp32 state tile ``S``. With SPLIT (fp16/bf16 inputs)
    ``S`` is scaled so its largest entry is 2^14 (fp16 cannot overflow), split ``hi + lo`` in ``x``'s dtype,
    and both halves run on tensor cores: ~22 bits of the state survive, at the register cost of one fp32
    copy (an fp32 "tf32x3" dot spilled heavily). fp32 inputs: one exact ("ieee") dot.

    Computed transposed, ``(S^T x^T)^T``: the state is the tall operand (M = its width >= 64 rows), so on
    Hopper the product is a warp-group MMA (wgmma) even for 32-token chunks, where ``x @ S`` (M = 32) was
    an mma.sync with the state's halves held in registers -- 253-255 registers and 8 B of spill at head
    dim 128, against ~200 and none this way (sm_90, Triton 3.9)."""
    if SPLIT:
        amax = tl.max(tl.max(tl.abs(S), axis=1), axis=0)
        sc = tl.maximum(amax, 1e-30) * (1.0 / 16384.0)
        St = tl.trans(S / sc)
        hi = St.to(x.dtype)
        lo = (St - hi.to(tl.float32)).to(x.dtype)
        xt = tl.trans(x)
        acc = tl.trans(tl.dot(hi, xt, input_precision=DOT_PREC) + tl.dot(lo, xt, input_precision=DOT_PREC)) * sc
    else:
        acc = tl.trans(tl.dot(tl.trans(S), tl.trans(x), input_precision=DOT_PREC))
    return acc


@triton.jit
def _prologue(CU, RATE, S0, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr,
              BKD: tl.constexpr, BKV: tl.constexpr, BLOCK_OF_D: tl.constexpr, HAS_S0: tl.constexpr,
              TRANSPOSED: tl.constexpr):
    """What every kernel derives from its program ids ``(sequence * H + head, state block)`` before its
    chunk loop. The state slice is ``[BKD, BKV]``: with BLOCK_OF_D a block of D and all of Dv, else all of
    D and a block of Dv. Returns
    - ``i_h, bos, T, s``: the head, the sequence's first token (int64) and length from ``CU``, and the
      head's decay rate (``lambda = exp(-s)``);
    - ``o_t, m_d, m_v, off_d, off_v``: token offsets, the D / Dv masks and the int32 in-chunk tile
      offsets of the D- and Dv-wide tensors;
    - ``m_s, base_s, p_s, S``: the state slice's mask, int64 scalar base and int32 tile offsets, and the
      fp32 slice loaded from ``S0`` (with HAS_S0) or zeros;
    - ``M, w_q``: the intra-chunk decay mask ``M_ij = lambda^(i-j)`` for ``i >= j``, else 0 (TRANSPOSED:
      ``M^T``), and the per-row weights ``lambda^(i+1)`` of the state carried into a chunk."""
    i_nh = tl.program_id(0)
    i_blk = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(CU + i_n).to(tl.int64)
    T = tl.load(CU + i_n + 1).to(tl.int64) - bos
    s = tl.load(RATE + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    if BLOCK_OF_D:
        o_d = i_blk * BKD + tl.arange(0, BKD)
        o_v = tl.arange(0, BKV)
    else:
        o_d = tl.arange(0, BKD)
        o_v = i_blk * BKV + tl.arange(0, BKV)
    m_d = o_d < D
    m_v = o_v < DV
    m_s = m_d[:, None] & m_v[None, :]
    off_d = o_t[:, None] * (H * D) + o_d[None, :]
    off_v = o_t[:, None] * (H * DV) + o_v[None, :]
    base_s = i_nh.to(tl.int64) * (D * DV)
    p_s = o_d[:, None] * DV + o_v[None, :]
    if HAS_S0:
        S = tl.load(S0 + base_s + p_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BKD, BKV], dtype=tl.float32)

    if TRANSPOSED:
        diff = o_t[None, :] - o_t[:, None]
    else:
        diff = o_t[:, None] - o_t[None, :]
    M = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    w_q = tl.exp(-s * (o_t + 1).to(tl.float32))
    return i_h, bos, T, s, o_t, m_d, m_v, off_d, off_v, m_s, base_s, p_s, S, M, w_q


@triton.jit
def _key_decay(m_t, L, o_t, s):
    """Per-row weights ``lambda^(L-1-j)`` up to the chunk's end (0 past the sequence's end)."""
    return tl.where(m_t, tl.exp(-s * tl.maximum(L - 1 - o_t, 0).to(tl.float32)), 0.0)


@triton.jit
def _chunk(t0, o_t, T, bos, i_h, H: tl.constexpr, BT: tl.constexpr):
    """The chunk starting at token ``t0``: its token mask, length ``L`` and int64 scalar row base."""
    m_t = (t0 + o_t) < T
    L = tl.minimum(T - t0, BT)
    row = (bos + t0) * H + i_h  # int64 scalar; tile offsets stay int32 (no 64-bit offset tiles)
    return m_t, L, row


@triton.jit
def _advance_state(S, x, w, y, s, L, scale, SCALED: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """``S <- lambda^L S + (w * x)^T y`` (the added term times ``scale`` with SCALED): the state (or dS) after
    a chunk of length ``L``; ``w * x`` is split hi + lo (see :func:`_dot_hi_lo`)."""
    xw = x.to(tl.float32) * w[:, None]
    decayed = S * tl.exp(-s * L.to(tl.float32))
    inc = _dot_hi_lo(tl.trans(xw), y, SPLIT, DOT_PREC)
    if SCALED:
        inc = inc * scale
    return decayed + inc


@triton.jit
def _lightning_fwd_kernel(
    Q, K, V, O, RATE, CU, H0, HT, scale,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, STORE_O: tl.constexpr,
):
    # STORE_O False: the state pass of the segmented forward (final states only; q is never read)
    i_h, bos, T, s, o_t, m_d, m_v, off_d, off_v, m_s, base_s, p_s, S, M, w_q = _prologue(
        CU, RATE, H0, H, D, DV, BT, BD, BV, False, HAS_H0, False)

    for i_t in range(0, tl.cdiv(T, BT)):
        m_t, L, row = _chunk(i_t * BT, o_t, T, bos, i_h, H, BT)
        k = tl.load(K + row * D + off_d, mask=m_t[:, None] & m_d[None, :], other=0.0)
        v = tl.load(V + row * DV + off_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
        if STORE_O:
            q = tl.load(Q + row * D + off_d, mask=m_t[:, None] & m_d[None, :], other=0.0)
            A = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * M
            o = tl.dot(A.to(v.dtype), v, input_precision=DOT_PREC)
            o += w_q[:, None] * _dot_state(q, S, SPLIT, DOT_PREC)
            tl.store(O + row * DV + off_v, (o * scale).to(O.dtype.element_ty),
                     mask=m_t[:, None] & m_v[None, :])
        S = _advance_state(S, k, _key_decay(m_t, L, o_t, s), v, s, L, scale, False, SPLIT, DOT_PREC)

    tl.store(HT + base_s + p_s, S, mask=m_s)


@triton.jit
def _lightning_bwd_dq_kernel(
    K, V, DO, DQ, RATE, CU, H0, scale,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
    HAS_H0: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    # dq_i = scale * [ sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j + lambda^(i+1) do_i S_prev^T ]
    i_h, bos, T, s, o_t, m_k, m_v, off_k, off_v, m_s, base_s, p_s, S, M, w_q = _prologue(
        CU, RATE, H0, H, D, DV, BT, BK, BDV, True, HAS_H0, False)

    for i_t in range(0, tl.cdiv(T, BT)):
        m_t, L, row = _chunk(i_t * BT, o_t, T, bos, i_h, H, BT)
        k = tl.load(K + row * D + off_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
        v = tl.load(V + row * DV + off_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
        do = tl.load(DO + row * DV + off_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
        A = tl.dot(do, tl.trans(v), input_precision=DOT_PREC) * M
        dq = tl.dot(A.to(k.dtype), k, input_precision=DOT_PREC)
        dq += w_q[:, None] * _dot_state(do, tl.trans(S), SPLIT, DOT_PREC)
        tl.store(DQ + row * D + off_k, (dq * scale).to(DQ.dtype.element_ty),
                 mask=m_t[:, None] & m_k[None, :])
        S = _advance_state(S, k, _key_decay(m_t, L, o_t, s), v, s, L, scale, False, SPLIT, DOT_PREC)


@triton.jit
def _lightning_bwd_dk_kernel(
    Q, V, DO, DK, RATE, CU, DHT, scale,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
    HAS_DHT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    # dk_j = scale * sum_{i>=j} lambda^(i-j) (do_i . v_j) q_i + lambda^(L-1-j) v_j dS^T
    # Mt[j, i] = lambda^(i-j) for i >= j (the transposed decay mask)
    i_h, bos, T, s, o_t, m_k, m_v, off_k, off_v, m_s, base_s, p_s, dS, Mt, w_q = _prologue(
        CU, RATE, DHT, H, D, DV, BT, BK, BDV, True, HAS_DHT, True)

    NT = tl.cdiv(T, BT)
    for i_r in range(0, NT):
        m_t, L, row = _chunk((NT - 1 - i_r) * BT, o_t, T, bos, i_h, H, BT)
        q = tl.load(Q + row * D + off_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
        v = tl.load(V + row * DV + off_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
        do = tl.load(DO + row * DV + off_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
        A = tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * Mt
        dk = tl.dot(A.to(q.dtype), q, input_precision=DOT_PREC) * scale
        dk += _key_decay(m_t, L, o_t, s)[:, None] * _dot_state(v, tl.trans(dS), SPLIT, DOT_PREC)
        tl.store(DK + row * D + off_k, dk.to(DK.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
        dS = _advance_state(dS, q, w_q, do, s, L, scale, True, SPLIT, DOT_PREC)


@triton.jit
def _lightning_bwd_dv_kernel(
    Q, K, DO, DV_, RATE, CU, DHT, DH0, scale,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr, STORE_DV: tl.constexpr,
):
    # dv_j = scale * sum_{i>=j} lambda^(i-j) (q_i . k_j) do_i + lambda^(L-1-j) k_j dS ; dS after chunk 0 = dS0
    # STORE_DV False: the dS pass of the segmented backward (d(initial state) only; k is never read)
    i_h, bos, T, s, o_t, m_d, m_v, off_d, off_v, m_s, base_s, p_s, dS, Mt, w_q = _prologue(
        CU, RATE, DHT, H, D, DV, BT, BD, BV, False, HAS_DHT, True)

    NT = tl.cdiv(T, BT)
    for i_r in range(0, NT):
        m_t, L, row = _chunk((NT - 1 - i_r) * BT, o_t, T, bos, i_h, H, BT)
        q = tl.load(Q + row * D + off_d, mask=m_t[:, None] & m_d[None, :], other=0.0)
        do = tl.load(DO + row * DV + off_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
        if STORE_DV:
            k = tl.load(K + row * D + off_d, mask=m_t[:, None] & m_d[None, :], other=0.0)
            A = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * Mt
            dv = tl.dot(A.to(do.dtype), do, input_precision=DOT_PREC) * scale
            dv += _key_decay(m_t, L, o_t, s)[:, None] * _dot_state(k, dS, SPLIT, DOT_PREC)
            tl.store(DV_ + row * DV + off_v, dv.to(DV_.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        dS = _advance_state(dS, q, w_q, do, s, L, scale, True, SPLIT, DOT_PREC)

    tl.store(DH0 + base_s + p_s, dS, mask=m_s)


# ---------------------------------------------------------------------------------------------------
# Launch helpers (packed layout: q, k [N, H, D], v [N, H, Dv], cu_seqlens [n + 1], states [n, H, D, Dv])

_STATE_BUDGET = 8192  # fp32 elements of a program's state tile (registers)


def _new(*shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A fresh output on ``like``'s device: NaN-filled under ``ATTNZOO_FILL_NAN=1`` (tests), so an element a
    kernel forgets to write shows up (:func:`attnzoo.ops.triton_common.new_output`)."""
    return new_output(shape, dtype=dtype or like.dtype, device=like.device)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _precision(dtype: torch.dtype) -> str:
    """``input_precision`` of every dot: exact for fp32 inputs; fp16/bf16 operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _tiles(D: int, Dv: int, dtype: torch.dtype = torch.float16):
    """(BD, BDV, BV, BK): padded head dims and the state slice a program owns. fp32 inputs get a quarter
    of the state budget (their exact FMA dots hold operands in registers)."""
    budget = _STATE_BUDGET // 4 if dtype == torch.float32 else _STATE_BUDGET
    BD, BDV = _pow2(D), _pow2(Dv)
    BV = max(16, min(BDV, budget // BD))
    BK = max(16, min(BD, budget // BDV))
    return BD, BDV, BV, BK


def _warps(BT: int, BD: int, BV: int) -> int:
    return 4 if max(BD, BV) <= 32 else 8


def default_chunk_size(device: torch.device, D: int = 128, Dv: int = 128, dtype: torch.dtype = torch.float16) -> int:
    """Chunk length. Under the CPU interpreter 16 (tests: many chunk boundaries on short sequences). On a
    GPU, fp16/bf16: 64 for padded head dims <= 64, 32 up to 128, else 16; fp32 (exact FMA dots): 16.
    Chosen offline (no GPU was available to time them) from sm_90 compiles with Triton 3.6 and 3.9
    (tools/cross_compile.py): the largest chunk whose four kernels spill no registers at 8 warps and stay
    under ~150 KB of shared memory (chunk 64 at head dim 128 spilled 40-80 B per thread). A longer chunk
    means fewer serial steps and taller tensor-core tiles; its intra-chunk cost grows only as C * D."""
    if device.type != "cuda" or dtype == torch.float32:
        return 16
    pad = max(_pow2(D), _pow2(Dv))
    return 64 if pad <= 64 else 32 if pad <= 128 else 16


def _check_chunk(chunk_size: int) -> int:
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    return chunk_size


def _launch_fwd(q, k, v, rate, cu, h0, scale: float, BT: int, store_o: bool = True):
    """One forward sweep over the sequences of ``cu``: ``(o or None, final states [len(cu) - 1, H, D, Dv])``."""
    N, H, D = q.shape
    Dv = v.shape[-1]
    n = cu.shape[0] - 1
    o = _new(N, H, Dv, like=q) if store_o else None
    ht = _new(n, H, D, Dv, like=q, dtype=torch.float32)
    BD, BDV, BV, BK = _tiles(D, Dv, q.dtype)
    _lightning_fwd_kernel[(n * H, triton.cdiv(Dv, BV))](
        q, k, v, o if store_o else q, rate, cu, h0 if h0 is not None else ht, ht, float(scale),
        H=H, D=D, DV=Dv, BT=BT, BD=BD, BV=BV, HAS_H0=h0 is not None,
        DOT_PREC=_precision(q.dtype), SPLIT=q.dtype != torch.float32, STORE_O=store_o,
        num_warps=_warps(BT, BD, BV),
    )
    return o, ht


def _launch_dv(q, k, do, rate, cu, dht, scale: float, BT: int, store_dv: bool = True):
    """The reverse dS sweep: ``(dv or None, d(initial states) [len(cu) - 1, H, D, Dv])``."""
    N, H, D = q.shape
    Dv = do.shape[-1]
    n = cu.shape[0] - 1
    dv = _new(N, H, Dv, like=q) if store_dv else None
    dh0 = _new(n, H, D, Dv, like=q, dtype=torch.float32)
    BD, BDV, BV, BK = _tiles(D, Dv, q.dtype)
    _lightning_bwd_dv_kernel[(n * H, triton.cdiv(Dv, BV))](
        q, k, do, dv if store_dv else do, rate, cu, dht if dht is not None else dh0, dh0, float(scale),
        H=H, D=D, DV=Dv, BT=BT, BD=BD, BV=BV, HAS_DHT=dht is not None, DOT_PREC=_precision(q.dtype),
        SPLIT=q.dtype != torch.float32, STORE_DV=store_dv, num_warps=_warps(BT, BD, BV),
    )
    return dv, dh0


# ---------------------------------------------------------------------------------------------------
# Segments: more programs for long sequences at small batch x heads
#
# A program walks its sequence's chunks in order, so n_seqs * H * (Dv / BV) programs are all the GPU gets;
# at 128k tokens, batch 1, 32 heads that is 64 programs on 132 SMs. A dense batch can instead be cut into
# P segments of Lseg tokens (a multiple of the chunk), each run as its own "sequence" of the varlen path:
#   forward:  (1) a state pass (no output; q never read) gives each segment's final state from zero,
#             ``local[p]``; (2) the segments' initial states follow in closed form,
#             ``S_in[p] = lambda^(Lseg p) S0 + sum_{r<p} lambda^(Lseg (p-1-r)) local[r]`` (one einsum);
#             (3) the full forward over the segments from ``S_in``; its last segment's final state is the
#             sequence's.
#   backward: S_in again (1-2), then a dS pass (no dV; k never read) gives each segment's d(initial state)
#             from its own queries, ``g[p]``; the gradient reaching segment p's end is
#             ``dS_end[p] = sum_{r>p} lambda^(Lseg (r-1-p)) g[r] + lambda^(Lseg (P-2-p) + L_last) dS_T``
#             (``dS_end[P-1] = dS_T``); then the usual three sweeps over the segments.
# Extra work: one state pass (forward) and one state + one dS pass (backward); extra memory: three
# [n * P, H, D, Dv] fp32 state tensors, O(T D Dv / Lseg), transient (nothing is saved for the backward
# beyond q, k, v, S0). With Lseg >= MIN_SEGMENT = 4096 >= Dv * chunk for every GPU default chunk
# (64 x 64, 128 x 32, 256 x 16) that stays within the O(T D / C) budget. Varlen input is never cut (its
# lengths live on the device; reading them would sync).

MIN_SEGMENT = 4096  # tokens: the memory bound above; shorter segments would also spend more on extra passes
PROGRAMS_PER_SM = 2


def segment_plan(T: int, programs: int, BT: int, device: torch.device, segments: int = 0) -> Tuple[int, int]:
    """``(P, Lseg)`` for a dense batch of sequences of ``T`` tokens. ``segments`` > 0 asks for that many
    (tests); 0 = automatic: 1 unless ``programs`` (the unsegmented grid) fills fewer than PROGRAMS_PER_SM
    programs per SM of a CUDA device, then enough segments of >= MIN_SEGMENT tokens to reach it."""
    if segments <= 0:
        if device.type != "cuda" or T < 2 * MIN_SEGMENT:
            return 1, T
        want = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        segments = min(-(-want // max(programs, 1)), T // MIN_SEGMENT)
    if segments <= 1 or T <= BT:
        return 1, T
    seg_len = -(-(-(-T // segments)) // BT) * BT  # ceil(T / segments), rounded up to whole chunks
    return -(-T // seg_len), seg_len


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _segment_cu(n: int, T: int, P: int, seg_len: int, device) -> torch.Tensor:
    """Boundaries of ``n`` sequences of ``T`` tokens cut into ``P`` segments each (the last may be short)."""
    starts = torch.arange(P, device=device, dtype=torch.int64) * seg_len
    cu = (torch.arange(n, device=device, dtype=torch.int64)[:, None] * T + starts[None, :]).reshape(-1)
    return torch.cat([cu, cu.new_full((1,), n * T)]).to(torch.int32)


def _decay_powers(rate: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
    """``lambda_h ^ exponents`` = ``exp(-s_h * e)`` for ``e >= 0`` (``[H, *exponents.shape]``, fp32)."""
    return torch.exp(-rate.view(-1, *([1] * exponents.dim())) * exponents.clamp_min(0).to(torch.float32))


def _segment_initial_states(local, h0, rate, n: int, P: int, seg_len: int) -> torch.Tensor:
    """``S_in [n * P, H, D, Dv]`` from the segments' states-from-zero ``local [n * P, H, D, Dv]``."""
    p = torch.arange(P, device=local.device)
    gap = (p[:, None] - 1 - p[None, :]).to(torch.float32) * seg_len  # [p, r]
    w = _decay_powers(rate, gap) * (p[None, :] < p[:, None])  # [H, p, r]
    s_in = torch.einsum("hpr,nrhde->nphde", w, local.view(n, P, *local.shape[1:]))
    if h0 is not None:
        s_in = s_in + _decay_powers(rate, p.to(torch.float32) * seg_len).t()[None, :, :, None, None] * h0[:, None]
    return s_in.reshape(local.shape).contiguous()  # the kernels index states as contiguous


def _segment_end_grads(g, dht, rate, n: int, P: int, seg_len: int, last_len: int) -> torch.Tensor:
    """``dS_end [n * P, H, D, Dv]``: the gradient reaching each segment's final state, from the segments'
    d(initial state)-from-their-own-queries ``g [n * P, H, D, Dv]`` and ``dht [n, H, D, Dv]`` (or None)."""
    p = torch.arange(P, device=g.device)
    gap = (p[None, :] - 1 - p[:, None]).to(torch.float32) * seg_len  # [p, r]
    w = _decay_powers(rate, gap) * (p[None, :] > p[:, None])
    d_end = torch.einsum("hpr,nrhde->nphde", w, g.view(n, P, *g.shape[1:]))
    if dht is not None:
        e = ((P - 2 - p).to(torch.float32) * seg_len + last_len).masked_fill(p == P - 1, 0.0)
        d_end = d_end + _decay_powers(rate, e).t()[None, :, :, None, None] * dht[:, None]
    return d_end.reshape(g.shape).contiguous()


def fwd_impl(q, k, v, rate, cu_seqlens, h0, scale: float, chunk_size: int, segments: int = 1):
    """``segments``: 1 = never cut (varlen input must pass 1), 0 = automatic, P > 1 = P segments."""
    N, H, D = q.shape
    n = cu_seqlens.shape[0] - 1
    BT = _check_chunk(chunk_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if h0 is not None:
        h0 = h0.to(torch.float32).contiguous()
    P, seg_len = _plan(q, v, n, BT, segments)
    if P == 1:
        return _launch_fwd(q, k, v, rate, cu_seqlens, h0, scale, BT)
    T = N // n
    cu = _segment_cu(n, T, P, seg_len, q.device)
    _, local = _launch_fwd(q, k, v, rate, cu, None, scale, BT, store_o=False)
    s_in = _segment_initial_states(local, h0, rate, n, P, seg_len)
    o, ht = _launch_fwd(q, k, v, rate, cu, s_in, scale, BT)
    return o, ht.view(n, P, *ht.shape[1:])[:, -1].clone(memory_format=torch.contiguous_format)  # a fresh tensor


def _plan(q, v, n: int, BT: int, segments: int) -> Tuple[int, int]:
    N, H, D = q.shape
    if segments == 1 or n == 0 or N == 0:
        return 1, 0
    BD, BDV, BV, BK = _tiles(D, v.shape[-1], q.dtype)
    return segment_plan(N // n, n * H * triton.cdiv(v.shape[-1], BV), BT, q.device, segments)


def bwd_impl(do, dht, q, k, v, rate, cu_seqlens, h0, scale: float, chunk_size: int, segments: int = 1):
    N, H, D = q.shape
    Dv = v.shape[-1]
    n = cu_seqlens.shape[0] - 1
    BT = _check_chunk(chunk_size)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous().to(q.dtype)
    if h0 is not None:
        h0 = h0.to(torch.float32).contiguous()
    if dht is not None:
        dht = dht.to(torch.float32).contiguous()
    P, seg_len = _plan(q, v, n, BT, segments)
    cu, n_run = cu_seqlens, n
    if P > 1:
        T = N // n
        cu, n_run = _segment_cu(n, T, P, seg_len, q.device), n * P
        _, local = _launch_fwd(q, k, v, rate, cu, None, scale, BT, store_o=False)
        h0 = _segment_initial_states(local, h0, rate, n, P, seg_len)
        _, g = _launch_dv(q, k, do, rate, cu, None, scale, BT, store_dv=False)
        dht = _segment_end_grads(g, dht, rate, n, P, seg_len, T - (P - 1) * seg_len)
    dq = _new(*q.shape, like=q)
    dk = _new(*k.shape, like=k)
    BD, BDV, BV, BK = _tiles(D, Dv, q.dtype)
    common = dict(H=H, D=D, DV=Dv, BT=BT, DOT_PREC=_precision(q.dtype), SPLIT=q.dtype != torch.float32)
    gk = (n_run * H, triton.cdiv(D, BK))
    _lightning_bwd_dq_kernel[gk](
        k, v, do, dq, rate, cu, h0 if h0 is not None else rate, float(scale),
        BK=BK, BDV=BDV, HAS_H0=h0 is not None, num_warps=_warps(BT, BK, BDV), **common,
    )
    _lightning_bwd_dk_kernel[gk](
        q, v, do, dk, rate, cu, dht if dht is not None else rate, float(scale),
        BK=BK, BDV=BDV, HAS_DHT=dht is not None, num_warps=_warps(BT, BK, BDV), **common,
    )
    dv, dh0 = _launch_dv(q, k, do, rate, cu, dht, scale, BT)
    if P > 1:
        dh0 = dh0.view(n, P, *dh0.shape[1:])[:, 0].clone(memory_format=torch.contiguous_format)
    return dq, dk, dv, dh0


# ---------------------------------------------------------------------------------------------------
# torch custom ops (namespace attnzoo): opaque to torch.compile, with fakes and autograd


@torch.library.custom_op("attnzoo::lightning_fwd", mutates_args=())
def lightning_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rate: torch.Tensor,
    cu_seqlens: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    scale: float,
    chunk_size: int,
    segments: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed chunked forward: ``q, k [N, H, D]``, ``v [N, H, Dv]``, fp32 ``rate [H]``, int32 ``cu_seqlens``,
    fp32 ``initial_state [n, H, D, Dv]`` or None; ``segments`` as :func:`fwd_impl` (1 for varlen).
    Returns ``(o [N, H, Dv], final_state [n, H, D, Dv] fp32)``."""
    return fwd_impl(q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size, segments)


@lightning_fwd.register_fake
def _(q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size, segments):
    N, H, D = q.shape
    n = cu_seqlens.shape[0] - 1
    return q.new_empty(N, H, v.shape[-1]), q.new_empty(n, H, D, v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("attnzoo::lightning_bwd", mutates_args=())
def lightning_bwd(
    do: torch.Tensor,
    dht: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rate: torch.Tensor,
    cu_seqlens: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    scale: float,
    chunk_size: int,
    segments: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked backward. Returns ``(dq, dk, dv, d_initial_state [n, H, D, Dv] fp32)``."""
    return bwd_impl(do, dht, q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size, segments)


@lightning_bwd.register_fake
def _(do, dht, q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size, segments):
    N, H, D = q.shape
    n = cu_seqlens.shape[0] - 1
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        q.new_empty(n, H, D, v.shape[-1], dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size, segments = inputs
    ctx.save_for_backward(q, k, v, rate, cu_seqlens, initial_state)
    ctx.scale = scale
    ctx.chunk_size = chunk_size
    ctx.segments = segments
    ctx.has_h0 = initial_state is not None


def _backward(ctx, do, dht):
    q, k, v, rate, cu_seqlens, initial_state = ctx.saved_tensors
    if do is None:
        do = torch.zeros(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)
    dq, dk, dv, dh0 = torch.ops.attnzoo.lightning_bwd(
        do, dht, q, k, v, rate, cu_seqlens, initial_state, ctx.scale, ctx.chunk_size, ctx.segments
    )
    return dq, dk, dv, None, None, (dh0 if ctx.has_h0 else None), None, None, None


lightning_fwd.register_autograd(_backward, setup_context=_setup_context)


def lightning_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rate: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    segments: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BTHD entry point over the custom op (no validation: :func:`attnzoo.lightning_attention` does it).

    ``q, k [B, T, H, D]``, ``v [B, T, H, Dv]`` (varlen: ``B == 1`` and ``cu_seqlens``); returns
    ``(o [B, T, H, Dv], final_state [B or n, H, D, Dv] fp32)``. ``segments``: cut each sequence of a dense
    batch into that many segments run in parallel (see :func:`segment_plan`); None = automatic. Varlen
    input is never cut.
    """
    B, T, H, D = q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B + 1, device=q.device, dtype=torch.int32) * T
        segments = 0 if segments is None else int(segments)
    else:
        cu_seqlens = cu_seqlens.to(torch.int32)
        segments = 1
    if rate is None:
        rate = torch.zeros(H, device=q.device, dtype=torch.float32)
    rate = rate.detach().to(device=q.device, dtype=torch.float32)
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32)
    chunk_size = chunk_size or default_chunk_size(q.device, D, v.shape[-1], q.dtype)
    o, ht = torch.ops.attnzoo.lightning_fwd(
        q.reshape(B * T, H, D), k.reshape(B * T, H, D), v.reshape(B * T, H, v.shape[-1]),
        rate, cu_seqlens, initial_state, float(scale), int(chunk_size), segments,
    )
    return o.view(B, T, H, v.shape[-1]), ht
