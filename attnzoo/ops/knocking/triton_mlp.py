"""Fused Triton kernels for KHA-MLP (SPEC §4), forward and backward, and their custom ops.

``V~ = 2 * ((V W_up) * sigmoid(V W_gate)) W_down`` on ``V [N, D]`` (every head's vectors flattened to
rows; the three ``D x D`` weights are shared by all heads).

Algorithm (forward). One program per tile of BLOCK_M rows. The V tile ``[BLOCK_M, D]`` and the fp32
output accumulator ``[BLOCK_M, D]`` stay in registers; the hidden dimension is walked in chunks of
BLOCK_H columns: ``A = V W_up[:, j]``, ``G = V W_gate[:, j]`` (fp32 accumulation), ``H = A * sigmoid(G)``
in fp32, then ``acc += H W_down[j, :]`` with H fed to the dot in the input dtype (see Precision). Only ``[BLOCK_M,
BLOCK_H]`` slices of the intermediate ever exist; the weight chunks come from L2. The factor 2 is folded
into H (exact), so with the identity init ``V~ = (2 V/2) I = V`` bit for bit (no subnormal loss).

Backward, two kernels, both recomputing the intermediate instead of storing it. Memory choice: the
forward saves nothing but its inputs (V and the weights, which autograd holds anyway); ``V W_up`` and
``V W_gate`` are recomputed chunk by chunk in the backward (2 extra GEMM-lets per chunk per kernel), so
no ``[N, D]`` activations are kept between forward and backward.
- dV kernel: one program per row tile, ``dV [BLOCK_M, D]`` fp32 in registers; per hidden chunk:
  recompute A, G; ``dH = 2 dY W_down[j, :]^T``; ``dA = dH * s``, ``dG = dH * A * s (1 - s)`` with
  ``s = sigmoid(G)``; ``dV += dA W_up[:, j]^T + dG W_gate[:, j]^T``. Written once: deterministic.
- dW kernel: grid (row split ``s``, hidden chunk ``j``). The program holds its three weight chunks and
  three fp32 accumulators ``dW_up[:, j]``, ``dW_gate[:, j]`` ``[D, BLOCK_H]`` and ``dW_down[j, :]``
  ``[BLOCK_H, D]`` in registers and walks the row tiles of its split (recomputing A, G, dH as above):
  ``dW_up += V^T dA``, ``dW_gate += V^T dG``, ``dW_down += (2 H)^T dY``. Each split stores its partial
  to an fp32 ``[S, D, D]`` buffer (no atomics); the host sums over ``S`` with ``torch.sum``. The split
  count depends only on N, D and the device, so weight gradients are deterministic (bitwise
  run-to-run for a fixed autotuned config).

Precision: fp16/bf16 dots accumulate in fp32. The fp32 intermediates that feed a second dot (H, dA,
dG) are passed to the tensor cores as a 16-bit hi + lo pair (two dots, ``SPLIT_16BIT``), so the kernel
computes the reference's fp32 math: the only 16-bit roundings are of the inputs and the outputs. That
costs 4 dots per chunk in the forward (vs 3), 7 (vs 5) in the dV kernel and 9 (vs 6) in the dW kernel; with
plain casts instead, the rounding of H/dA/dG to 16 bits fails SPEC §0's 2x rule on a few percent of random
small-D cases against the fp32-internal reference. fp32 inputs use IEEE fp32 dots (no TF32).

Head dims that are not powers of two are padded to BLOCK_D (>= 16) with load masks (padded weight rows
and columns load as 0, so padded hidden units contribute 0). Strides are passed for V, dY and every
weight (non-contiguous and transposed weights work). Weights must already have V's dtype (the backend
casts them).

This module imports triton: import it lazily (``attnzoo.ops.knocking.triton_backend`` does).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops.triton_common import head_block, interpreter, length_bucket, new_output, tuning_configs

# fp16/bf16: feed fp32 intermediates (H, dA, dG) to the tensor cores as hi + lo 16-bit pairs, so the
# kernel computes the reference's fp32 math (see the header). False: plain casts, fewer dots.
SPLIT_16BIT = True
# The row count may be 1: it stays a runtime int (one compile per config). D is specialised like any int
# argument (divisible by 16 or not): with D % 16 == 0 the head-dim masks are provably constant over
# 16-element runs, so tiles move as 128-bit loads and the weight chunks pipeline through cp.async
# (D unspecialised, every load was 16-bit and nothing was pipelined).
_NO_SPEC = ["N"]


def _new(shape, *, dtype, device) -> torch.Tensor:
    return new_output(shape, dtype=dtype, device=device)


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for fp16/bf16 operands


def _split(dtype: torch.dtype) -> bool:
    return SPLIT_16BIT and dtype in (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _load_chunks(Wu, Wg, Wd, offs_d, offs_h, dmask, hmask, swu0, swu1, swg0, swg1, swd0, swd1):
    """``W_up[:, j]``, ``W_gate[:, j]`` as ``[BLOCK_D, BLOCK_H]`` and ``W_down[j, :]`` as ``[BLOCK_H, BLOCK_D]``."""
    m_dh = dmask[:, None] & hmask[None, :]
    wu = tl.load(Wu + offs_d[:, None] * swu0 + offs_h[None, :] * swu1, mask=m_dh, other=0.0)
    wg = tl.load(Wg + offs_d[:, None] * swg0 + offs_h[None, :] * swg1, mask=m_dh, other=0.0)
    wd = tl.load(Wd + offs_h[:, None] * swd0 + offs_d[None, :] * swd1, mask=hmask[:, None] & dmask[None, :], other=0.0)
    return wu, wg, wd


@triton.jit
def _hi_lo(x, like, SPLIT: tl.constexpr):
    """fp32 ``x`` as operands in ``like``'s dtype: ``hi`` and, with SPLIT, the remainder ``lo`` (``hi + lo``
    carries ~22 bits in fp16, ~16 in bf16: far below the output's rounding)."""
    hi = x.to(like.dtype)
    if SPLIT:
        lo = (x - hi.to(tl.float32)).to(like.dtype)
    else:
        lo = hi
    return hi, lo


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit(do_not_specialize=_NO_SPEC)
def _kha_mlp_fwd_kernel(
    V, Wu, Wg, Wd, Out,
    N, D, N_BUCKET,
    svn, svd, swu0, swu1, swg0, swg1, swd0, swd1, son, sod,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < N
    dmask = offs_d < D
    rows = rows.to(tl.int64)  # element offsets may pass 2^31 on large or strided inputs
    v = tl.load(V + rows[:, None] * svn + offs_d[None, :] * svd, mask=rmask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for h0 in range(0, D, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h < D
        wu, wg, wd = _load_chunks(Wu, Wg, Wd, offs_d, offs_h, dmask, hmask, swu0, swu1, swg0, swg1, swd0, swd1)
        a = tl.dot(v, wu, input_precision=DOT_PREC)
        g = tl.dot(v, wg, input_precision=DOT_PREC)
        h_hi, h_lo = _hi_lo(2.0 * a * _sigmoid(g), v, SPLIT)  # the factor 2 folded into H (exact)
        acc += tl.dot(h_hi, wd, input_precision=DOT_PREC)
        if SPLIT:
            acc += tl.dot(h_lo, wd, input_precision=DOT_PREC)
    out = acc.to(Out.dtype.element_ty)
    tl.store(Out + rows[:, None] * son + offs_d[None, :] * sod, out, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _recompute(v, do, wu, wg, wd, DOT_PREC: tl.constexpr):
    """Recompute the chunk's ``A``, ``s = sigmoid(G)``; return ``(2 H, dA, dG)`` in fp32."""
    a = tl.dot(v, wu, input_precision=DOT_PREC)
    g = tl.dot(v, wg, input_precision=DOT_PREC)
    s = _sigmoid(g)
    dh = 2.0 * tl.dot(do, tl.trans(wd), input_precision=DOT_PREC)
    da = dh * s
    dg = dh * a * s * (1.0 - s)
    return 2.0 * a * s, da, dg


@triton.jit(do_not_specialize=_NO_SPEC)
def _kha_mlp_bwd_dv_kernel(
    V, DO, Wu, Wg, Wd, DV,
    N, D, N_BUCKET,
    svn, svd, sdon, sdod, swu0, swu1, swg0, swg1, swd0, swd1, sdvn, sdvd,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < N
    dmask = offs_d < D
    m_rd = rmask[:, None] & dmask[None, :]
    rows = rows.to(tl.int64)
    v = tl.load(V + rows[:, None] * svn + offs_d[None, :] * svd, mask=m_rd, other=0.0)
    do = tl.load(DO + rows[:, None] * sdon + offs_d[None, :] * sdod, mask=m_rd, other=0.0)
    dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for h0 in range(0, D, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        hmask = offs_h < D
        wu, wg, wd = _load_chunks(Wu, Wg, Wd, offs_d, offs_h, dmask, hmask, swu0, swu1, swg0, swg1, swd0, swd1)
        _, da, dg = _recompute(v, do, wu, wg, wd, DOT_PREC)
        da_hi, da_lo = _hi_lo(da, v, SPLIT)
        dg_hi, dg_lo = _hi_lo(dg, v, SPLIT)
        dv += tl.dot(da_hi, tl.trans(wu), input_precision=DOT_PREC)
        dv += tl.dot(dg_hi, tl.trans(wg), input_precision=DOT_PREC)
        if SPLIT:
            dv += tl.dot(da_lo, tl.trans(wu), input_precision=DOT_PREC)
            dv += tl.dot(dg_lo, tl.trans(wg), input_precision=DOT_PREC)
    tl.store(DV + rows[:, None] * sdvn + offs_d[None, :] * sdvd, dv.to(DV.dtype.element_ty), mask=m_rd)


@triton.jit(do_not_specialize=_NO_SPEC)
def _kha_mlp_bwd_dw_kernel(
    V, DO, Wu, Wg, Wd, PWu, PWg, PWd,
    N, D, N_BUCKET, ROWS_PER_SPLIT,
    svn, svd, sdon, sdod, swu0, swu1, swg0, swg1, swd0, swd1,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    sid = tl.program_id(0)
    hid = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = hid * BLOCK_H + tl.arange(0, BLOCK_H)
    dmask = offs_d < D
    hmask = offs_h < D
    wu, wg, wd = _load_chunks(Wu, Wg, Wd, offs_d, offs_h, dmask, hmask, swu0, swu1, swg0, swg1, swd0, swd1)
    acc_u = tl.zeros([BLOCK_D, BLOCK_H], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_D, BLOCK_H], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    row0 = sid * ROWS_PER_SPLIT
    row_end = tl.minimum(row0 + ROWS_PER_SPLIT, N)
    for m0 in range(row0, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m_rd = (rows < row_end)[:, None] & dmask[None, :]
        rows = rows.to(tl.int64)
        v = tl.load(V + rows[:, None] * svn + offs_d[None, :] * svd, mask=m_rd, other=0.0)
        do = tl.load(DO + rows[:, None] * sdon + offs_d[None, :] * sdod, mask=m_rd, other=0.0)
        h2, da, dg = _recompute(v, do, wu, wg, wd, DOT_PREC)
        vt = tl.trans(v)
        da_hi, da_lo = _hi_lo(da, v, SPLIT)
        dg_hi, dg_lo = _hi_lo(dg, v, SPLIT)
        h_hi, h_lo = _hi_lo(h2, v, SPLIT)
        acc_u += tl.dot(vt, da_hi, input_precision=DOT_PREC)
        acc_g += tl.dot(vt, dg_hi, input_precision=DOT_PREC)
        acc_d += tl.dot(tl.trans(h_hi), do, input_precision=DOT_PREC)
        if SPLIT:
            acc_u += tl.dot(vt, da_lo, input_precision=DOT_PREC)
            acc_g += tl.dot(vt, dg_lo, input_precision=DOT_PREC)
            acc_d += tl.dot(tl.trans(h_lo), do, input_precision=DOT_PREC)
    base = sid * D * D
    m_dh = dmask[:, None] & hmask[None, :]
    p_dh = base + offs_d[:, None] * D + offs_h[None, :]
    tl.store(PWu + p_dh, acc_u, mask=m_dh)
    tl.store(PWg + p_dh, acc_g, mask=m_dh)
    tl.store(PWd + base + offs_h[:, None] * D + offs_d[None, :], acc_d, mask=hmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------------
# Launch configuration: autotuned on a GPU, one small fixed tile under the interpreter (so tests with
# tiny shapes still cross row tiles, hidden chunks and row splits).

# (BLOCK_M, BLOCK_H, num_warps, num_stages) per padded head dim, each list at most 6 long: configs whose
# sm_90 compiles (tools/cross_compile.py, Triton 3.9, fp16 and bf16) spill nothing, load 128-bit and
# pipeline the weight chunks (dW: the row tiles) through cp.async. Heuristic picks from those (no GPU was
# available to time them): tall row tiles, wide hidden chunks, registers well under 255. The autotuner
# times them on a GPU; ``ATTNZOO_AUTOTUNE=first`` keeps only the first. Head dims under 64 use the 64
# list (hidden chunks cut to the head dim), over 256 the 256 list.
FWD_CONFIGS: Dict[int, List[Tuple[int, int, int, int]]] = {
    64: [(64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 3)],
    128: [(64, 32, 8, 2), (128, 32, 8, 2), (64, 16, 4, 3), (128, 16, 8, 2), (32, 64, 8, 2), (32, 32, 4, 3)],
    256: [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 3), (16, 16, 4, 2)],
}
DV_CONFIGS: Dict[int, List[Tuple[int, int, int, int]]] = {
    64: [(64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 8, 2), (64, 16, 4, 2), (32, 64, 4, 2)],
    128: [(64, 16, 4, 2), (128, 16, 8, 2), (128, 32, 8, 2), (32, 32, 8, 2), (64, 16, 8, 3), (32, 32, 4, 2)],
    256: [(16, 32, 8, 2), (32, 32, 8, 2), (16, 16, 8, 2), (16, 16, 4, 2)],
}
DW_CONFIGS: Dict[int, List[Tuple[int, int, int, int]]] = {
    64: [(64, 32, 4, 2), (128, 16, 8, 2), (64, 16, 4, 3), (32, 32, 4, 3), (64, 16, 8, 2), (32, 32, 8, 2)],
    128: [(64, 16, 8, 2), (32, 32, 8, 2), (64, 16, 8, 3), (32, 16, 4, 3), (32, 64, 8, 3), (32, 16, 8, 2)],
    256: [(32, 16, 8, 2), (32, 32, 8, 3), (32, 16, 8, 3)],
}
INTERP_BLOCK_M, INTERP_BLOCK_H = 16, 16
ROWS_PER_SPLIT_GRAIN = 128  # a multiple of every BLOCK_M, so no row tile straddles two splits
_KEY = ["N_BUCKET", "BLOCK_D", "DOT_PREC", "SPLIT"]


def gpu_configs(table: Dict[int, List[Tuple[int, int, int, int]]], block_d: int) -> List[Tuple[int, int, int, int]]:
    """The configs offered at padded head dim ``block_d`` (hidden chunks no wider than the head)."""
    row = table[min(max(block_d, 64), 256)]
    out = []
    for bm, bh, w, st in row:
        c = (bm, min(bh, block_d), w, st)
        if c not in out:
            out.append(c)
    return out


_tuned = {}


def _launcher(name, kernel, table, block_d: int):
    """The kernel to launch at padded head dim ``block_d`` and the meta-arguments to pass: one autotuner per
    (kernel, head block) over its own list, or one fixed small tile under the interpreter."""
    if interpreter():
        return kernel, {"BLOCK_M": INTERP_BLOCK_M, "BLOCK_H": INTERP_BLOCK_H}
    if (name, block_d) not in _tuned:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_H": bh}, num_warps=w, num_stages=s)
                   for bm, bh, w, s in gpu_configs(table, block_d)]
        _tuned[name, block_d] = triton.autotune(configs=tuning_configs(configs), key=_KEY)(kernel)
    return _tuned[name, block_d], {}


_FWD, _BWD_DV, _BWD_DW = _kha_mlp_fwd_kernel, _kha_mlp_bwd_dv_kernel, _kha_mlp_bwd_dw_kernel


def _splits(n: int, d: int, device: torch.device) -> Tuple[int, int]:
    """``(rows_per_split, n_splits)`` of the dW kernel: enough programs to fill the GPU with the hidden
    chunks, each split a multiple of the largest row tile. Depends only on (N, D, device)."""
    if interpreter():
        grain, target = 2 * INTERP_BLOCK_M, 4
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        grain, target = ROWS_PER_SPLIT_GRAIN, max(1, (2 * sms) // triton.cdiv(d, 64))
    rps = max(grain, triton.cdiv(triton.cdiv(n, target), grain) * grain)
    return rps, triton.cdiv(n, rps)


def _w_strides(w: torch.Tensor):
    return w.stride(0), w.stride(1)


def _check(v, w_up, w_gate, w_down):
    D = v.shape[-1]
    for name, w in (("w_up", w_up), ("w_gate", w_gate), ("w_down", w_down)):
        torch._check(w.dim() == 2 and w.shape[0] == D and w.shape[1] == D, lambda: f"{name} must be [D, D]")
        torch._check(w.dtype == v.dtype, lambda: f"{name} must have v's dtype")


# ----------------------------------------------------------------------------------------------------
# Custom ops


@torch.library.custom_op("attnzoo::kha_mlp_fwd", mutates_args=())
def kha_mlp_fwd(v: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``2 * ((v @ w_up) * sigmoid(v @ w_gate)) @ w_down`` on ``v [..., D]``; weights ``[D, D]`` in v's dtype.
    Returns a contiguous tensor of v's shape and dtype."""
    _check(v, w_up, w_gate, w_down)
    D = v.shape[-1]
    v2 = v.reshape(-1, D)
    N = v2.shape[0]
    out = _new((N, D), dtype=v.dtype, device=v.device)
    if N > 0:
        kernel, meta = _launcher("fwd", _FWD, FWD_CONFIGS, head_block(D))
        grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]),)  # noqa: E731
        kernel[grid](
            v2, w_up, w_gate, w_down, out, N, D, length_bucket(N),
            v2.stride(0), v2.stride(1), *_w_strides(w_up), *_w_strides(w_gate), *_w_strides(w_down),
            out.stride(0), out.stride(1),
            BLOCK_D=head_block(D), DOT_PREC=_dot_prec(v.dtype), SPLIT=_split(v.dtype), **meta,
        )
    return out.view(v.shape)


@kha_mlp_fwd.register_fake
def _kha_mlp_fwd_fake(v, w_up, w_gate, w_down):
    _check(v, w_up, w_gate, w_down)
    return v.new_empty(v.shape)


@torch.library.custom_op("attnzoo::kha_mlp_bwd", mutates_args=())
def kha_mlp_bwd(
    dout: torch.Tensor, v: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor,
    need_dv: bool, need_dw: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dv, dw_up, dw_gate, dw_down)`` of :func:`kha_mlp_fwd` given ``dout``. Skipped parts
    (``need_dv`` / ``need_dw`` false) come back as zeros."""
    _check(v, w_up, w_gate, w_down)
    D = v.shape[-1]
    v2 = v.reshape(-1, D)
    do2 = dout.to(v.dtype).reshape(-1, D)
    N = v2.shape[0]
    dev, dt = v.device, v.dtype
    ws = (*_w_strides(w_up), *_w_strides(w_gate), *_w_strides(w_down))
    common = dict(BLOCK_D=head_block(D), DOT_PREC=_dot_prec(dt), SPLIT=_split(dt))
    if need_dv and N > 0:
        dv = _new((N, D), dtype=dt, device=dev)
        kernel, meta = _launcher("bwd_dv", _BWD_DV, DV_CONFIGS, head_block(D))
        grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]),)  # noqa: E731
        kernel[grid](
            v2, do2, w_up, w_gate, w_down, dv, N, D, length_bucket(N),
            v2.stride(0), v2.stride(1), do2.stride(0), do2.stride(1), *ws, dv.stride(0), dv.stride(1),
            **common, **meta,
        )
    else:
        dv = torch.zeros((N, D), dtype=dt, device=dev)
    if need_dw and N > 0:
        rps, S = _splits(N, D, dev)
        part = _new((3, S, D, D), dtype=torch.float32, device=dev)
        kernel, meta = _launcher("bwd_dw", _BWD_DW, DW_CONFIGS, head_block(D))
        grid = lambda META: (S, triton.cdiv(D, META["BLOCK_H"]))  # noqa: E731
        kernel[grid](
            v2, do2, w_up, w_gate, w_down, part[0], part[1], part[2], N, D, length_bucket(N), rps,
            v2.stride(0), v2.stride(1), do2.stride(0), do2.stride(1), *ws,
            **common, **meta,
        )
        # fixed-order reduction over the S splits: deterministic (three separate tensors: outputs must not alias)
        dwu, dwg, dwd = (part[i].sum(dim=0).to(dt) for i in range(3))
    else:
        dwu, dwg, dwd = (torch.zeros((D, D), dtype=dt, device=dev) for _ in range(3))
    return dv.view(v.shape), dwu, dwg, dwd


@kha_mlp_bwd.register_fake
def _kha_mlp_bwd_fake(dout, v, w_up, w_gate, w_down, need_dv, need_dw):
    _check(v, w_up, w_gate, w_down)
    D = v.shape[-1]
    return v.new_empty(v.shape), v.new_empty((D, D)), v.new_empty((D, D)), v.new_empty((D, D))


def _setup_context(ctx, inputs, output):
    v, w_up, w_gate, w_down = inputs
    ctx.save_for_backward(v, w_up, w_gate, w_down)


def _backward(ctx, dout):
    v, w_up, w_gate, w_down = ctx.saved_tensors
    need = ctx.needs_input_grad
    dv, dwu, dwg, dwd = kha_mlp_bwd(dout, v, w_up, w_gate, w_down, bool(need[0]), bool(any(need[1:])))
    return (dv if need[0] else None, dwu if need[1] else None, dwg if need[2] else None, dwd if need[3] else None)


kha_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)
