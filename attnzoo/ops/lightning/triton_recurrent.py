"""Fused recurrent lightning-attention decode in Triton (SPEC §6), updating the state in place.

Algorithm: for a few new tokens (meant for 1..16; any count works, one loop step per token) the
recurrence is cheaper than any chunking: one program per (batch, head, Dv block) loads its fp32 state
tile ``[BD, BV]`` (all of D, padded to a power of two with masks) into registers once, then per token does
``S <- lambda S + k_t^T v_t`` (an outer product, elementwise -- no tensor-core dot, which would want >= 16
rows) and ``o_t = scale * sum_d q_t[d] S[d, :]`` (a column reduction), and finally writes the tile back
over the input state. The state is read and written once, so a decode step is memory-bound on
``B*H*D*Dv*4*2`` bytes -- the O(1)-in-context-length cost that makes linear attention worth having.
Nothing is skipped. Forward only: the op has no autograd (decode runs under no_grad; training uses the
chunked kernels).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from attnzoo.ops.triton_common import new_output


@triton.jit
def _lightning_decode_kernel(
    Q, K, V, O, S_PTR, RATE, scale, Tn,
    H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
):
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    lam = tl.exp(-tl.load(RATE + i_h).to(tl.float32))
    o_d = tl.arange(0, BD)
    o_v = i_v * BV + tl.arange(0, BV)
    m_d = o_d < D
    m_v = o_v < DV
    p_s = o_d[:, None] * DV + o_v[None, :]
    S_PTR += i_bh.to(tl.int64) * (D * DV)
    S = tl.load(S_PTR + p_s, mask=m_d[:, None] & m_v[None, :], other=0.0)
    for t in range(0, Tn):
        tok = (i_b.to(tl.int64) * Tn + t) * H + i_h
        q = tl.load(Q + tok * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        k = tl.load(K + tok * D + o_d, mask=m_d, other=0.0).to(tl.float32)
        v = tl.load(V + tok * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        S = S * lam + k[:, None] * v[None, :]
        o = tl.sum(q[:, None] * S, axis=0) * scale
        tl.store(O + tok * DV + o_v, o.to(O.dtype.element_ty), mask=m_v)
    tl.store(S_PTR + p_s, S, mask=m_d[:, None] & m_v[None, :])


def decode_impl(q, k, v, state, rate, scale: float) -> torch.Tensor:
    B, Tn, H, D = q.shape
    Dv = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = new_output((B, Tn, H, Dv), dtype=q.dtype, device=q.device)
    work = state if state.is_contiguous() else state.contiguous()
    BD = max(16, triton.next_power_of_2(D))
    BV = max(16, min(triton.next_power_of_2(Dv), max(16, 8192 // BD)))
    grid = (B * H, triton.cdiv(Dv, BV))
    _lightning_decode_kernel[grid](
        q, k, v, o, work, rate, float(scale), Tn, H=H, D=D, DV=Dv, BD=BD, BV=BV,
        num_warps=4 if BD * BV <= 4096 else 8,
    )
    if work is not state:
        state.copy_(work)
    return o


@torch.library.custom_op("attnzoo::lightning_decode", mutates_args=("state",))
def lightning_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, rate: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q, k [B, Tn, H, D]``, ``v [B, Tn, H, Dv]``, fp32 ``state [B, H, D, Dv]`` (updated in place), fp32
    ``rate [H]``. Returns ``o [B, Tn, H, Dv]``."""
    return decode_impl(q, k, v, state, rate, scale)


@lightning_decode_op.register_fake
def _(q, k, v, state, rate, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    rate: Optional[torch.Tensor] = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """Entry point over the custom op (no validation: :func:`attnzoo.ops.lightning.api.lightning_decode` does it)."""
    H = q.shape[2]
    if rate is None:
        rate = torch.zeros(H, device=q.device, dtype=torch.float32)
    rate = rate.detach().to(device=q.device, dtype=torch.float32)
    return torch.ops.attnzoo.lightning_decode(q, k, v, state, rate, float(scale))
