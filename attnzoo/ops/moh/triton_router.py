"""Triton kernels of the MoH learned router (SPEC §3); the active-row packing is in ``triton_packing.py``.

Algorithm.
* Router (forward): one program per block of BLOCK_T tokens (``B * T`` flattened). The three logit tiles
  (routed ``[BLOCK_T, h_r]``, shared ``[BLOCK_T, h_s]``, mix ``[BLOCK_T, 2]``; the matmuls ``x @ W^T`` stay
  in cuBLAS) are loaded once and everything else stays in registers, in fp32: ``e = exp(l - max)``,
  router probabilities ``p = e / sum e``; top-k by rank, ``rank_i = #{j : l_j > l_i or (l_j == l_i and
  j < i)}`` (a loop over the ``h_r`` columns; selected iff ``rank < k``: ties go to the lower head index, as
  in ``router.topk_mask``); routed gate ``(k e_i) / sum_topk e`` ("code") or ``p_i`` ("paper") on selected heads,
  shared gate ``(s e_i) / sum e`` with ``s = h_s`` ("code") or 1, mix ``[a1, a2] = (c e) / sum e`` with
  ``c = 2`` ("code") or 1. Every division is IEEE-rounded (``div_rn``), so equal logits give gates of
  exactly 1 ("code"), as in :func:`attnzoo.ops.moh.router.learned_router`. Writes gates ``[B, T, H]``
  (shared then routed), probs ``[B, T, h_r]`` (fp32, for the load-balance loss) and the selection.
* Router (backward): the same programs recompute the forward from the logits (nothing but the logits is
  saved) and apply the softmax Jacobians: scaled softmax ``y = s softmax(l)``: ``dl = y (dy - sum
  softmax * dy)``; the top-k selection is piecewise constant (no gradient), as in the reference.
Selection note: the reference takes the top-k of the probabilities, this kernel of the logits (same order,
softmax is monotone). They can differ only when two different logits round to the same probability.

This module imports triton: import it lazily (:mod:`attnzoo.ops.moh.router_api` does).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops.triton_common import interpreter, new_output

_NO_SPEC = ["N", "T", "HR", "HS", "top_k"]


@triton.jit
def _load_tile(Ptr, b, t, tok_ok, sb, st, sh, n_cols, BLOCK_C: tl.constexpr):
    """fp32 tile ``[BLOCK_T, BLOCK_C]``, ``-inf`` in the padding columns (0 in padding token rows)."""
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    x = tl.load(Ptr + b[:, None] * sb + t[:, None] * st + cols[None, :] * sh,
                mask=tok_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return tl.where(col_ok[None, :], x, float("-inf")), col_ok


@triton.jit
def _exp_max(x):
    """``(e, sum e)`` with ``e = exp(x - rowmax)`` (0 in ``-inf`` padding columns)."""
    e = tl.exp(x - tl.max(x, 1)[:, None])
    return e, tl.sum(e, 1)


@triton.jit
def _div(num, den):
    """IEEE round-to-nearest ``num / den`` (Triton's ``/`` is approximate on NVIDIA GPUs)."""
    return tl.math.div_rn(num, tl.broadcast_to(den, num.shape))


@triton.jit
def _routed(LR, b, t, tok_ok, s_rb, s_rt, s_rh, HR, top_k, CODE: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    """Routed part: (p [probs], g [gate before the mix], r [renormalised softmax or p], sel)."""
    lr, col_ok = _load_tile(LR, b, t, tok_ok, s_rb, s_rt, s_rh, HR, BLOCK_R)
    e, z = _exp_max(lr)
    p = _div(e, z[:, None])
    cols = tl.arange(0, BLOCK_R)
    rank = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.int32)
    for j in range(0, HR):
        lj = tl.load(LR + b * s_rb + t * s_rt + j * s_rh, mask=tok_ok, other=0.0).to(tl.float32)[:, None]
        beats = (lj > lr) | ((lj == lr) & (cols[None, :] > j))
        rank += beats.to(tl.int32)
    sel = (rank < top_k) & col_ok[None, :]
    if CODE:
        es = tl.where(sel, e, 0.0)
        zs = tl.sum(es, 1)[:, None]
        g = _div(top_k.to(tl.float32) * es, zs)
        r = _div(es, zs)
    else:
        g = tl.where(sel, p, 0.0)
        r = g
    return p, g, r, sel


@triton.jit
def _shared(LS, b, t, tok_ok, s_sb, s_st, s_sh, HS, CODE: tl.constexpr, BLOCK_S: tl.constexpr):
    """Shared part: (g = scale * softmax [before the mix], softmax)."""
    ls, col_ok = _load_tile(LS, b, t, tok_ok, s_sb, s_st, s_sh, HS, BLOCK_S)
    e, z = _exp_max(ls)
    if CODE:
        g = _div(HS.to(tl.float32) * e, z[:, None])
    else:
        g = _div(e, z[:, None])
    return g, _div(e, z[:, None])


@triton.jit
def _mix(LM, b, t, tok_ok, s_mb, s_mt, s_mh, CODE: tl.constexpr):
    """(a1, a2, softmax_1, softmax_2), each ``[BLOCK_T]``; ``a = c * softmax(l_mix)``."""
    base = LM + b * s_mb + t * s_mt
    l1 = tl.load(base, mask=tok_ok, other=0.0).to(tl.float32)
    l2 = tl.load(base + s_mh, mask=tok_ok, other=0.0).to(tl.float32)
    m = tl.maximum(l1, l2)
    e1 = tl.exp(l1 - m)
    e2 = tl.exp(l2 - m)
    z = e1 + e2
    c = 2.0 if CODE else 1.0
    return tl.math.div_rn(c * e1, z), tl.math.div_rn(c * e2, z), tl.math.div_rn(e1, z), tl.math.div_rn(e2, z)


@triton.jit
def _tokens(N, T, BLOCK_T: tl.constexpr):
    """This program's flattened tokens ``n`` (int64), their mask and their (batch, position). One 64-bit
    division for the tile's first token; the per-token ones are 32-bit (``t0 + BLOCK_T`` fits): 64-bit
    divisions per token were ``div_s64`` subroutine calls, across which ptxas kept a register on the stack."""
    n0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    b0 = n0 // T
    t = (n0 - b0 * T).to(tl.int32) + tl.arange(0, BLOCK_T)
    n = n0 + tl.arange(0, BLOCK_T)
    return n, n < N, b0 + t // T, t % T


@triton.jit(do_not_specialize=_NO_SPEC)
def _router_fwd_kernel(
    LR, LS, LM, G, P, SEL,
    s_rb, s_rt, s_rh, s_sb, s_st, s_sh, s_mb, s_mt, s_mh,
    N, T, HR, HS, top_k,
    HAS_ROUTED: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_MIX: tl.constexpr, CODE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, tok_ok, b, t = _tokens(N, T, BLOCK_T)
    H = HS + HR
    if HAS_MIX:
        a1, a2, _s1, _s2 = _mix(LM, b, t, tok_ok, s_mb, s_mt, s_mh, CODE)
    if HAS_SHARED:
        gs, _q = _shared(LS, b, t, tok_ok, s_sb, s_st, s_sh, HS, CODE, BLOCK_S)
        if HAS_MIX:
            gs = gs * a1[:, None]
        cs = tl.arange(0, BLOCK_S)
        tl.store(G + n[:, None] * H + cs[None, :], gs.to(G.dtype.element_ty),
                 mask=tok_ok[:, None] & (cs[None, :] < HS))
    if HAS_ROUTED:
        p, gr, _r, sel = _routed(LR, b, t, tok_ok, s_rb, s_rt, s_rh, HR, top_k, CODE, BLOCK_T, BLOCK_R)
        if HAS_MIX:
            gr = gr * a2[:, None]
        cr = tl.arange(0, BLOCK_R)
        m2 = tok_ok[:, None] & (cr[None, :] < HR)
        tl.store(G + n[:, None] * H + HS + cr[None, :], gr.to(G.dtype.element_ty), mask=m2)
        tl.store(P + n[:, None] * HR + cr[None, :], p, mask=m2)
        tl.store(SEL + n[:, None] * HR + cr[None, :], sel, mask=m2)


@triton.jit(do_not_specialize=_NO_SPEC)
def _router_bwd_kernel(
    LR, LS, LM, DG, DP, DLR, DLS, DLM,
    s_rb, s_rt, s_rh, s_sb, s_st, s_sh, s_mb, s_mt, s_mh,
    s_gb, s_gt, s_gh, s_pb, s_pt, s_ph,
    N, T, HR, HS, top_k,
    HAS_ROUTED: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_MIX: tl.constexpr, CODE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, tok_ok, b, t = _tokens(N, T, BLOCK_T)
    dg_base = DG + b[:, None] * s_gb + t[:, None] * s_gt
    da1 = tl.zeros([BLOCK_T], dtype=tl.float32)
    da2 = tl.zeros([BLOCK_T], dtype=tl.float32)
    if HAS_MIX:
        a1, a2, s1, s2 = _mix(LM, b, t, tok_ok, s_mb, s_mt, s_mh, CODE)
    if HAS_SHARED:
        cs = tl.arange(0, BLOCK_S)
        ms = tok_ok[:, None] & (cs[None, :] < HS)
        gs, q = _shared(LS, b, t, tok_ok, s_sb, s_st, s_sh, HS, CODE, BLOCK_S)
        dgs = tl.load(dg_base + cs[None, :] * s_gh, mask=ms, other=0.0).to(tl.float32)
        if HAS_MIX:
            da1 = tl.sum(dgs * gs, 1)
            dgs = dgs * a1[:, None]
        # gs = scale * q, q = softmax: dl = gs * (dgs - sum_j q_j dgs_j)
        dls = gs * (dgs - tl.sum(q * dgs, 1)[:, None])
        tl.store(DLS + n[:, None] * HS + cs[None, :], dls.to(DLS.dtype.element_ty), mask=ms)
    if HAS_ROUTED:
        cr = tl.arange(0, BLOCK_R)
        mr = tok_ok[:, None] & (cr[None, :] < HR)
        p, gr, r, sel = _routed(LR, b, t, tok_ok, s_rb, s_rt, s_rh, HR, top_k, CODE, BLOCK_T, BLOCK_R)
        dgr = tl.load(dg_base + (HS + cr[None, :]) * s_gh, mask=mr, other=0.0).to(tl.float32)
        dp = tl.load(DP + b[:, None] * s_pb + t[:, None] * s_pt + cr[None, :] * s_ph, mask=mr,
                     other=0.0).to(tl.float32)
        if HAS_MIX:
            da2 = tl.sum(dgr * gr, 1)
            dgr = dgr * a2[:, None]
        if CODE:
            # gr = k * r, r = softmax over the selected heads (0 elsewhere)
            dlr = gr * (dgr - tl.sum(r * dgr, 1)[:, None])
        else:
            # gr = p on the selected heads: its gradient joins the probabilities'
            dp += tl.where(sel, dgr, 0.0)
            dlr = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        dlr += p * (dp - tl.sum(p * dp, 1)[:, None])
        tl.store(DLR + n[:, None] * HR + cr[None, :], dlr.to(DLR.dtype.element_ty), mask=mr)
    if HAS_MIX:
        # a = c * softmax(l): dl_j = a_j (da_j - sum_i softmax_i da_i)
        dot = s1 * da1 + s2 * da2
        tl.store(DLM + n * 2, (a1 * (da1 - dot)).to(DLM.dtype.element_ty), mask=tok_ok)
        tl.store(DLM + n * 2 + 1, (a2 * (da2 - dot)).to(DLM.dtype.element_ty), mask=tok_ok)


# ----------------------------------------------------------------------------------------------------
# Launch


def _block_c(n: int) -> int:
    return max(2, triton.next_power_of_2(max(n, 1)))


def _launch_cfg(hr: int, hs: int) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_S, num_warps)."""
    br, bs = _block_c(hr), _block_c(hs)
    if interpreter():
        return 16, br, bs, 1
    block_t = max(16, min(128, 4096 // max(br, bs)))
    return block_t, br, bs, 4


def _dims(lr: Optional[torch.Tensor], ls: Optional[torch.Tensor]):
    ref = lr if lr is not None else ls
    B, T = ref.shape[:2]
    return ref, B, T, (lr.shape[-1] if lr is not None else 0), (ls.shape[-1] if ls is not None else 0)


def _strides(t: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0)


def _common(lr, ls, lm, ref, code: bool):
    dummy = ref
    a = dict(LR=lr if lr is not None else dummy, LS=ls if ls is not None else dummy,
             LM=lm if lm is not None else dummy,
             HAS_ROUTED=lr is not None, HAS_SHARED=ls is not None, HAS_MIX=lm is not None, CODE=bool(code))
    a["s_rb"], a["s_rt"], a["s_rh"] = _strides(lr)
    a["s_sb"], a["s_st"], a["s_sh"] = _strides(ls)
    a["s_mb"], a["s_mt"], a["s_mh"] = _strides(lm)
    return a


@torch.library.custom_op("attnzoo::moh_router_fwd", mutates_args=())
def moh_router_fwd(
    logits_routed: Optional[torch.Tensor], logits_shared: Optional[torch.Tensor],
    logits_mix: Optional[torch.Tensor], top_k: int, code: bool, gates_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gates [B, T, h_s + h_r]`` (``gates_dtype``), ``probs [B, T, h_r]`` (fp32), ``selected [B, T, h_r]``
    (bool). Logits ``[B, T, h_r]``, ``[B, T, h_s]``, ``[B, T, 2]`` (any strides), at least one of the first two."""
    ref, B, T, hr, hs = _dims(logits_routed, logits_shared)
    gates = new_output((B, T, hs + hr), dtype=gates_dtype, device=ref.device)
    probs = new_output((B, T, hr), dtype=torch.float32, device=ref.device)
    selected = torch.empty(B, T, hr, dtype=torch.bool, device=ref.device)
    N = B * T
    if N == 0:
        return gates, probs, selected
    bt, br, bs, warps = _launch_cfg(hr, hs)
    _router_fwd_kernel[(triton.cdiv(N, bt),)](
        **_common(logits_routed, logits_shared, logits_mix, ref, code), G=gates, P=probs, SEL=selected,
        N=N, T=T, HR=hr, HS=hs, top_k=int(top_k), BLOCK_T=bt, BLOCK_R=br, BLOCK_S=bs, num_warps=warps)
    return gates, probs, selected


@moh_router_fwd.register_fake
def _moh_router_fwd_fake(logits_routed, logits_shared, logits_mix, top_k, code, gates_dtype):
    ref, B, T, hr, hs = _dims(logits_routed, logits_shared)
    return (ref.new_empty(B, T, hs + hr, dtype=gates_dtype), ref.new_empty(B, T, hr, dtype=torch.float32),
            ref.new_empty(B, T, hr, dtype=torch.bool))


@torch.library.custom_op("attnzoo::moh_router_bwd", mutates_args=())
def moh_router_bwd(
    dgates: torch.Tensor, dprobs: torch.Tensor, logits_routed: Optional[torch.Tensor],
    logits_shared: Optional[torch.Tensor], logits_mix: Optional[torch.Tensor], top_k: int, code: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the three logit tensors (each in its own dtype; an empty tensor for an absent one)
    from ``dgates [B, T, H]`` and ``dprobs [B, T, h_r]`` (any strides)."""
    ref, B, T, hr, hs = _dims(logits_routed, logits_shared)
    outs = [new_output(t.shape, dtype=t.dtype, device=t.device) if t is not None else ref.new_empty(0)
            for t in (logits_routed, logits_shared, logits_mix)]
    N = B * T
    if N == 0:
        return outs[0], outs[1], outs[2]
    bt, br, bs, warps = _launch_cfg(hr, hs)
    a = _common(logits_routed, logits_shared, logits_mix, ref, code)
    a["s_gb"], a["s_gt"], a["s_gh"] = dgates.stride()
    a["s_pb"], a["s_pt"], a["s_ph"] = dprobs.stride()
    _router_bwd_kernel[(triton.cdiv(N, bt),)](
        **a, DG=dgates, DP=dprobs, DLR=outs[0], DLS=outs[1], DLM=outs[2],
        N=N, T=T, HR=hr, HS=hs, top_k=int(top_k), BLOCK_T=bt, BLOCK_R=br, BLOCK_S=bs, num_warps=warps)
    return outs[0], outs[1], outs[2]


@moh_router_bwd.register_fake
def _moh_router_bwd_fake(dgates, dprobs, logits_routed, logits_shared, logits_mix, top_k, code):
    ref = logits_routed if logits_routed is not None else logits_shared
    return tuple(torch.empty_like(t) if t is not None else ref.new_empty(0)
                 for t in (logits_routed, logits_shared, logits_mix))


def _router_setup_context(ctx, inputs, output):
    lr, ls, lm, top_k, code, _gates_dtype = inputs
    ctx.save_for_backward(lr, ls, lm)
    ctx.params = (top_k, code)


def _router_backward(ctx, dgates, dprobs, _dselected):
    lr, ls, lm = ctx.saved_tensors
    ref, B, T, hr, hs = _dims(lr, ls)
    if dgates is None:
        dgates = ref.new_zeros(B, T, hs + hr, dtype=torch.float32)
    if dprobs is None:
        dprobs = ref.new_zeros(B, T, hr, dtype=torch.float32)
    dlr, dls, dlm = moh_router_bwd(dgates, dprobs, lr, ls, lm, *ctx.params)
    return (dlr if lr is not None else None, dls if ls is not None else None, dlm if lm is not None else None,
            None, None, None)


moh_router_fwd.register_autograd(_router_backward, setup_context=_router_setup_context)
