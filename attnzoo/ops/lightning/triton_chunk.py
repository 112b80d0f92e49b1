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
- Precision: tiles are loaded in the input dtype; products of two inputs (Q K^T, A V, (w K)^T V, ...) run
  in that dtype with fp32 accumulation; products with the fp32 state use fp32 operands at "tf32x3"
  (near-fp32, and no fp16 overflow of a large state) for fp16/bf16 inputs and "ieee" for fp32 inputs.
- Varlen: sequences come from ``cu_seqlens`` (a dense batch is ``cu = arange(B + 1) * T``); the state
  restarts from ``initial_state[i]`` (or 0) at every sequence.
Nothing is skipped: linear attention has no sparsity; only the upper triangle of each tile is masked.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _lightning_fwd_kernel(
    Q, K, V, O, RATE, CU, H0, HT, scale,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STATE_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(CU + i_n).to(tl.int64)
    T = tl.load(CU + i_n + 1).to(tl.int64) - bos
    s = tl.load(RATE + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_v = o_v < DV
    m_s = m_d[:, None] & m_v[None, :]
    p_s = i_nh.to(tl.int64) * D * DV + o_d[:, None] * DV + o_v[None, :]

    if HAS_H0:
        S = tl.load(H0 + p_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BD, BV], dtype=tl.float32)

    # intra-chunk decay mask M_ij = lambda^(i-j) (i >= j) and the initial-state weights lambda^(i+1)
    diff = o_t[:, None] - o_t[None, :]
    M = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    w_q = tl.exp(-s * (o_t + 1).to(tl.float32))

    for i_t in range(0, tl.cdiv(T, BT)):
        t0 = i_t * BT
        m_t = (t0 + o_t) < T
        L = tl.minimum(T - t0, BT)
        tok = (bos + t0 + o_t) * H + i_h
        q = tl.load(Q + tok[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        k = tl.load(K + tok[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        v = tl.load(V + tok[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        A = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * M
        o = tl.dot(A.to(v.dtype), v, input_precision=DOT_PREC)
        o += tl.dot(q.to(tl.float32) * w_q[:, None], S, input_precision=STATE_PREC)
        tl.store(O + tok[:, None] * DV + o_v[None, :], (o * scale).to(O.dtype.element_ty),
                 mask=m_t[:, None] & m_v[None, :])
        w_k = tl.where(m_t, tl.exp(-s * tl.maximum(L - 1 - o_t, 0).to(tl.float32)), 0.0)
        kw = (k.to(tl.float32) * w_k[:, None]).to(k.dtype)
        S = S * tl.exp(-s * L.to(tl.float32)) + tl.dot(tl.trans(kw), v, input_precision=DOT_PREC)

    tl.store(HT + p_s, S, mask=m_s)


@triton.jit
def _lightning_bwd_dq_kernel(
    K, V, DO, DQ, RATE, CU, H0, scale,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
    HAS_H0: tl.constexpr, STATE_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # dq_i = scale * [ sum_{j<=i} lambda^(i-j) (do_i . v_j) k_j + lambda^(i+1) do_i S_prev^T ]
    i_nh = tl.program_id(0)
    i_k = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(CU + i_n).to(tl.int64)
    T = tl.load(CU + i_n + 1).to(tl.int64) - bos
    s = tl.load(RATE + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BDV)
    m_k = o_k < D
    m_v = o_v < DV
    m_s = m_k[:, None] & m_v[None, :]
    p_s = i_nh.to(tl.int64) * D * DV + o_k[:, None] * DV + o_v[None, :]
    if HAS_H0:
        S = tl.load(H0 + p_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BDV], dtype=tl.float32)

    diff = o_t[:, None] - o_t[None, :]
    M = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    w_q = tl.exp(-s * (o_t + 1).to(tl.float32))

    for i_t in range(0, tl.cdiv(T, BT)):
        t0 = i_t * BT
        m_t = (t0 + o_t) < T
        L = tl.minimum(T - t0, BT)
        tok = (bos + t0 + o_t) * H + i_h
        k = tl.load(K + tok[:, None] * D + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        v = tl.load(V + tok[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        do = tl.load(DO + tok[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        A = tl.dot(do, tl.trans(v), input_precision=DOT_PREC) * M
        dq = tl.dot(A.to(k.dtype), k, input_precision=DOT_PREC)
        dq += tl.dot(do.to(tl.float32) * w_q[:, None], tl.trans(S), input_precision=STATE_PREC)
        tl.store(DQ + tok[:, None] * D + o_k[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=m_t[:, None] & m_k[None, :])
        w_k = tl.where(m_t, tl.exp(-s * tl.maximum(L - 1 - o_t, 0).to(tl.float32)), 0.0)
        kw = (k.to(tl.float32) * w_k[:, None]).to(k.dtype)
        S = S * tl.exp(-s * L.to(tl.float32)) + tl.dot(tl.trans(kw), v, input_precision=DOT_PREC)


@triton.jit
def _lightning_bwd_dk_kernel(
    Q, V, DO, DK, RATE, CU, DHT, scale,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr,
    HAS_DHT: tl.constexpr, STATE_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # dk_j = scale * sum_{i>=j} lambda^(i-j) (do_i . v_j) q_i + lambda^(L-1-j) v_j dS^T
    i_nh = tl.program_id(0)
    i_k = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(CU + i_n).to(tl.int64)
    T = tl.load(CU + i_n + 1).to(tl.int64) - bos
    s = tl.load(RATE + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = tl.arange(0, BDV)
    m_k = o_k < D
    m_v = o_v < DV
    m_s = m_k[:, None] & m_v[None, :]
    p_s = i_nh.to(tl.int64) * D * DV + o_k[:, None] * DV + o_v[None, :]
    if HAS_DHT:
        dS = tl.load(DHT + p_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BDV], dtype=tl.float32)

    # transposed mask: Mt[j, i] = lambda^(i-j) for i >= j
    diff = o_t[None, :] - o_t[:, None]
    Mt = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    w_q = tl.exp(-s * (o_t + 1).to(tl.float32))

    NT = tl.cdiv(T, BT)
    for i_r in range(0, NT):
        t0 = (NT - 1 - i_r) * BT
        m_t = (t0 + o_t) < T
        L = tl.minimum(T - t0, BT)
        tok = (bos + t0 + o_t) * H + i_h
        q = tl.load(Q + tok[:, None] * D + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        v = tl.load(V + tok[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        do = tl.load(DO + tok[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        A = tl.dot(v, tl.trans(do), input_precision=DOT_PREC) * Mt
        dk = tl.dot(A.to(q.dtype), q, input_precision=DOT_PREC) * scale
        w_k = tl.where(m_t, tl.exp(-s * tl.maximum(L - 1 - o_t, 0).to(tl.float32)), 0.0)
        dk += tl.dot(v.to(tl.float32) * w_k[:, None], tl.trans(dS), input_precision=STATE_PREC)
        tl.store(DK + tok[:, None] * D + o_k[None, :], dk.to(DK.dtype.element_ty), mask=m_t[:, None] & m_k[None, :])
        qw = (q.to(tl.float32) * w_q[:, None]).to(q.dtype)
        dS = dS * tl.exp(-s * L.to(tl.float32)) + tl.dot(tl.trans(qw), do, input_precision=DOT_PREC) * scale


@triton.jit
def _lightning_bwd_dv_kernel(
    Q, K, DO, DV_, RATE, CU, DHT, DH0, scale,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STATE_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # dv_j = scale * sum_{i>=j} lambda^(i-j) (q_i . k_j) do_i + lambda^(L-1-j) k_j dS ; dS after chunk 0 = dS0
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    bos = tl.load(CU + i_n).to(tl.int64)
    T = tl.load(CU + i_n + 1).to(tl.int64) - bos
    s = tl.load(RATE + i_h).to(tl.float32)

    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_v = o_v < DV
    m_s = m_d[:, None] & m_v[None, :]
    p_s = i_nh.to(tl.int64) * D * DV + o_d[:, None] * DV + o_v[None, :]
    if HAS_DHT:
        dS = tl.load(DHT + p_s, mask=m_s, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BD, BV], dtype=tl.float32)

    diff = o_t[None, :] - o_t[:, None]
    Mt = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    w_q = tl.exp(-s * (o_t + 1).to(tl.float32))

    NT = tl.cdiv(T, BT)
    for i_r in range(0, NT):
        t0 = (NT - 1 - i_r) * BT
        m_t = (t0 + o_t) < T
        L = tl.minimum(T - t0, BT)
        tok = (bos + t0 + o_t) * H + i_h
        q = tl.load(Q + tok[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        k = tl.load(K + tok[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
        do = tl.load(DO + tok[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        A = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * Mt
        dv = tl.dot(A.to(do.dtype), do, input_precision=DOT_PREC) * scale
        w_k = tl.where(m_t, tl.exp(-s * tl.maximum(L - 1 - o_t, 0).to(tl.float32)), 0.0)
        dv += tl.dot(k.to(tl.float32) * w_k[:, None], dS, input_precision=STATE_PREC)
        tl.store(DV_ + tok[:, None] * DV + o_v[None, :], dv.to(DV_.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
        qw = (q.to(tl.float32) * w_q[:, None]).to(q.dtype)
        dS = dS * tl.exp(-s * L.to(tl.float32)) + tl.dot(tl.trans(qw), do, input_precision=DOT_PREC) * scale

    tl.store(DH0 + p_s, dS, mask=m_s)


# ---------------------------------------------------------------------------------------------------
# Launch helpers (packed layout: q, k [N, H, D], v [N, H, Dv], cu_seqlens [n + 1], states [n, H, D, Dv])

_STATE_BUDGET = 8192  # fp32 elements of a program's state tile (registers)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _precisions(dtype: torch.dtype) -> Tuple[str, str]:
    """(precision of input x input dots, precision of dots with the fp32 state)."""
    if dtype == torch.float32:
        return "ieee", "ieee"
    return "ieee", "tf32x3"  # the first is ignored for fp16/bf16 operands


def _tiles(D: int, Dv: int):
    BD, BDV = _pow2(D), _pow2(Dv)
    BV = max(16, min(BDV, _STATE_BUDGET // BD))
    BK = max(16, min(BD, _STATE_BUDGET // BDV))
    return BD, BDV, BV, BK


def _warps(BT: int, BD: int, BV: int) -> int:
    return 8 if BD * max(BV, BT) >= 16384 or BT * BD >= 16384 else 4


def default_chunk_size(device: torch.device) -> int:
    """64 on a GPU; 16 under the CPU interpreter (tests: many chunk boundaries on short sequences)."""
    return 64 if device.type == "cuda" else 16


def _check_chunk(chunk_size: int) -> int:
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    return chunk_size


def fwd_impl(q, k, v, rate, cu_seqlens, h0, scale: float, chunk_size: int):
    N, H, D = q.shape
    Dv = v.shape[-1]
    n = cu_seqlens.shape[0] - 1
    BT = _check_chunk(chunk_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty(N, H, Dv, device=q.device, dtype=q.dtype)
    ht = torch.empty(n, H, D, Dv, device=q.device, dtype=torch.float32)
    if h0 is not None:
        h0 = h0.to(torch.float32).contiguous()
    BD, BDV, BV, BK = _tiles(D, Dv)
    dot_prec, state_prec = _precisions(q.dtype)
    grid = (n * H, triton.cdiv(Dv, BV))
    _lightning_fwd_kernel[grid](
        q, k, v, o, rate, cu_seqlens, h0 if h0 is not None else ht, ht, float(scale),
        H=H, D=D, DV=Dv, BT=BT, BD=BD, BV=BV, HAS_H0=h0 is not None,
        STATE_PREC=state_prec, DOT_PREC=dot_prec, num_warps=_warps(BT, BD, BV),
    )
    return o, ht


def bwd_impl(do, dht, q, k, v, rate, cu_seqlens, h0, scale: float, chunk_size: int):
    N, H, D = q.shape
    Dv = v.shape[-1]
    n = cu_seqlens.shape[0] - 1
    BT = _check_chunk(chunk_size)
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous().to(q.dtype)
    if h0 is not None:
        h0 = h0.to(torch.float32).contiguous()
    if dht is not None:
        dht = dht.to(torch.float32).contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dh0 = torch.empty(n, H, D, Dv, device=q.device, dtype=torch.float32)
    BD, BDV, BV, BK = _tiles(D, Dv)
    dot_prec, state_prec = _precisions(q.dtype)
    common = dict(H=H, D=D, DV=Dv, BT=BT, STATE_PREC=state_prec, DOT_PREC=dot_prec)
    gk = (n * H, triton.cdiv(D, BK))
    gv = (n * H, triton.cdiv(Dv, BV))
    _lightning_bwd_dq_kernel[gk](
        k, v, do, dq, rate, cu_seqlens, h0 if h0 is not None else dh0, float(scale),
        BK=BK, BDV=BDV, HAS_H0=h0 is not None, num_warps=_warps(BT, BK, BDV), **common,
    )
    _lightning_bwd_dk_kernel[gk](
        q, v, do, dk, rate, cu_seqlens, dht if dht is not None else dh0, float(scale),
        BK=BK, BDV=BDV, HAS_DHT=dht is not None, num_warps=_warps(BT, BK, BDV), **common,
    )
    _lightning_bwd_dv_kernel[gv](
        q, k, do, dv, rate, cu_seqlens, dht if dht is not None else dh0, dh0, float(scale),
        BD=BD, BV=BV, HAS_DHT=dht is not None, num_warps=_warps(BT, BD, BV), **common,
    )
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed chunked forward: ``q, k [N, H, D]``, ``v [N, H, Dv]``, fp32 ``rate [H]``, int32 ``cu_seqlens``,
    fp32 ``initial_state [n, H, D, Dv]`` or None. Returns ``(o [N, H, Dv], final_state [n, H, D, Dv] fp32)``."""
    return fwd_impl(q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size)


@lightning_fwd.register_fake
def _(q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size):
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunked backward. Returns ``(dq, dk, dv, d_initial_state [n, H, D, Dv] fp32)``."""
    return bwd_impl(do, dht, q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size)


@lightning_bwd.register_fake
def _(do, dht, q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size):
    N, H, D = q.shape
    n = cu_seqlens.shape[0] - 1
    return (
        torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
        q.new_empty(n, H, D, v.shape[-1], dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, rate, cu_seqlens, initial_state, scale, chunk_size = inputs
    ctx.save_for_backward(q, k, v, rate, cu_seqlens, initial_state)
    ctx.scale = scale
    ctx.chunk_size = chunk_size
    ctx.has_h0 = initial_state is not None


def _backward(ctx, do, dht):
    q, k, v, rate, cu_seqlens, initial_state = ctx.saved_tensors
    if do is None:
        do = torch.zeros(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)
    dq, dk, dv, dh0 = torch.ops.attnzoo.lightning_bwd(
        do, dht, q, k, v, rate, cu_seqlens, initial_state, ctx.scale, ctx.chunk_size
    )
    return dq, dk, dv, None, None, (dh0 if ctx.has_h0 else None), None, None


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BTHD entry point over the custom op (no validation: :func:`attnzoo.lightning_attention` does it).

    ``q, k [B, T, H, D]``, ``v [B, T, H, Dv]`` (varlen: ``B == 1`` and ``cu_seqlens``); returns
    ``(o [B, T, H, Dv], final_state [B or n, H, D, Dv] fp32)``.
    """
    B, T, H, D = q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B + 1, device=q.device, dtype=torch.int32) * T
    else:
        cu_seqlens = cu_seqlens.to(torch.int32)
    if rate is None:
        rate = torch.zeros(H, device=q.device, dtype=torch.float32)
    rate = rate.detach().to(device=q.device, dtype=torch.float32)
    if initial_state is not None:
        initial_state = initial_state.to(torch.float32)
    chunk_size = chunk_size or default_chunk_size(q.device)
    o, ht = torch.ops.attnzoo.lightning_fwd(
        q.reshape(B * T, H, D), k.reshape(B * T, H, D), v.reshape(B * T, H, v.shape[-1]),
        rate, cu_seqlens, initial_state, float(scale), int(chunk_size),
    )
    return o.view(B, T, H, v.shape[-1]), ht
