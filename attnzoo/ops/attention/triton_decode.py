"""Triton decode kernel (SPEC §2): a few new queries against a KV cache, contiguous or paged, split-K.

Algorithm (flash-decoding). Decode is memory-bound, so the unit of work is a KV tile, read once:
one program per (key split, batch, kv head, block of query rows) where the query rows are *all* ``G * Tn``
(query head of the GQA group, new token) pairs of that kv head -- row ``r`` is token ``r // G`` of query
head ``kv_head * G + r % G`` -- so every K/V tile is loaded once for the whole group (one block of rows
covers up to 64 pairs, so this holds for all usual group sizes). The cache is cut into ``num_splits``
contiguous key ranges, one per program, so long caches fill the GPU even at batch 1. Inside a program the
query rows stay in registers with the fp32 online-softmax state (max, sum, accumulator) while BLOCK_N key
tiles stream in (pipelined through shared memory). For a paged cache each key's address is
``block_table[b, j // page_size] * page_stride + (j % page_size) * slot_stride`` (per-element gather, so
any page size works). Each program writes its normalised partial output and its lse (fp32); a second
small kernel merges the splits with the log-sum-exp: ``o = sum_s exp(lse_s - lse) o_s``.

What is skipped: keys at or beyond ``cache_seqlens[b]`` and, with a sliding window, keys left of the
window of the oldest new query are never loaded (a split whose range is empty stores ``lse = -inf`` and
does no work). Causal is bottom-right per batch: new token ``t`` sits at position ``t + len - Tn``.
MoH (``gates [B, Tn, H]``, :func:`decode_launch`): rows with gate 0 are masked out of every key tile, a
program none of whose rows is active reads no K/V (so kv heads left without an active query head cost
nothing but the launch), and the merge multiplies by the gate.
Precision as in the forward kernel (fp32 accumulation, IEEE fp32 dots for fp32 inputs). Head dims are
constexprs: K/V tiles stream through 16-byte ``cp.async``; keys at or past ``cache_seqlens`` are masked out
of the loads, so whatever stale slots hold (NaN, inf) never contributes (SPEC §0.3).

Launch shape: fixed heuristic tiles (not autotuned): BLOCK_N = 64 for rows of <= 256 bytes (fp16 D <= 128),
smaller for wider rows, so the pipelined K/V tiles fit shared memory; 16 under the interpreter.
``num_splits`` targets ~2 programs per SM. Decode has no backward (inference).

This module imports triton: import it lazily (``attnzoo.ops.attention.triton_backend`` does).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from attnzoo.ops import triton_common as TC
from attnzoo.ops.attention import triton_fwd as F
from attnzoo.ops.attention.triton_common_jit import softmax_finish, softmax_step

MAX_ROWS_PER_PROGRAM = 64


@triton.jit(do_not_specialize=["Tn", "G", "Hkv", "page_size", "keys_per_split", "win_left",
                               "win_right", "R"])
def _decode_kernel(
    Q, K, V, Lens, BT, Gates, OP, LP,
    sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd, sbtb, sbtp, sgb, sgt, sgh,
    sopb, soph, sops, sopr, sopd, slpb, slph, slps, slpr,
    Tn, G, Hkv, D: tl.constexpr, DV: tl.constexpr, R, page_size, keys_per_split, scale_log2, win_left, win_right,
    PAGED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_GATES: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_r = tl.program_id(2)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    b64 = b.to(tl.int64)
    L = tl.load(Lens + b)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < R
    t = offs_r // G
    h = hkv * G + offs_r % G
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b64 * sqb + t[:, None] * sqt + h[:, None] * sqh + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    qpos = t + L - Tn  # absolute position of each row's token

    lo = L * 0
    if HAS_LEFT:
        lo = tl.maximum(L - Tn - win_left, 0)
    s_lo = tl.maximum(pid_s * keys_per_split, lo)
    s_hi = tl.minimum((pid_s + 1) * keys_per_split, L)
    row_on = row_ok  # rows that attend (all rows are stored: inactive ones as o = 0, lse = -inf)
    if HAS_GATES:
        # MoH: only active (token, head) rows attend; a block with none reads no K/V at all
        gate = tl.load(Gates + b64 * sgb + t * sgt + h * sgh, mask=row_ok, other=0.0)
        row_on = row_ok & (gate != 0)
        s_hi = tl.where(tl.max(row_on.to(tl.int32), 0) > 0, s_hi, s_lo)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    start = (s_lo // BLOCK_N) * BLOCK_N
    for start_n in range(start, s_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < s_hi) & (offs_n >= s_lo)
        if PAGED:
            page = tl.load(BT + b64 * sbtb + (offs_n // page_size) * sbtp, mask=n_ok, other=0).to(tl.int64)
            k_off = page * skb + (offs_n % page_size) * skt
            v_off = page * svb + (offs_n % page_size) * svt
        else:
            k_off = b64 * skb + offs_n.to(tl.int64) * skt
            v_off = b64 * svb + offs_n.to(tl.int64) * svt
        kt = tl.load(K + k_off[None, :] + hkv * skh + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * scale_log2
        keep = row_on[:, None] & n_ok[None, :]
        if HAS_LEFT or HAS_RIGHT:
            dd = offs_n[None, :] - qpos[:, None]
            if HAS_LEFT:
                keep = keep & (dd >= -win_left)
            if HAS_RIGHT:
                keep = keep & (dd <= win_right)
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(V + v_off[:, None] + hkv * svh + offs_dv[None, :] * svd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, s, v, DOT_PREC, False)

    o, lse, _m, _log2l = softmax_finish(acc, l_i, m_i, False)
    base_o = OP + b64 * sopb + hkv * soph + pid_s * sops
    tl.store(base_o + offs_r[:, None] * sopr + offs_dv[None, :] * sopd, o,
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LP + b64 * slpb + hkv * slph + pid_s * slps + offs_r * slpr, lse, mask=row_ok)


@triton.jit(do_not_specialize=["S", "G", "Hkv", "Tn", "R"])
def _decode_merge_kernel(
    OP, LP, O, LSE, Gates,
    sopb, soph, sops, sopr, sopd, slpb, slph, slps, slpr,
    sob, sot, soh, sod, slb, slh, slt, sgb, sgt, sgh,
    S, G, Hkv, Tn, DV: tl.constexpr, R,
    HAS_GATES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)  # over (b, hkv, r)
    r = pid % R
    bh = pid // R
    b = bh // Hkv
    hkv = bh % Hkv
    b64 = b.to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lp = tl.load(LP + b64 * slpb + hkv * slph + offs_s * slps + r * slpr, mask=offs_s < S, other=float("-inf"))
    m = tl.max(lp, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lp - m_safe)
    tot = tl.sum(w, 0)
    op = tl.load(OP + b64 * sopb + hkv * soph + offs_s[:, None] * sops + r * sopr + offs_dv[None, :] * sopd,
                 mask=(offs_s[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
    tot_safe = tl.where(tot == 0.0, 1.0, tot)
    o = tl.sum(op * w[:, None], 0) / tot_safe
    lse = tl.where(tot == 0.0, float("-inf"), m_safe + tl.log(tot_safe))
    t = r // G
    h = hkv * G + r % G
    if HAS_GATES:
        o = o * tl.load(Gates + b64 * sgb + t * sgt + h * sgh).to(tl.float32)  # inactive rows: o = 0 * 0
    tl.store(O + b64 * sob + t * sot + h * soh + offs_dv * sod, o.to(O.dtype.element_ty), mask=offs_dv < DV)
    tl.store(LSE + b64 * slb + h * slh + t * slt, lse)


@functools.lru_cache(None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def decode_launch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor], scale: float, causal: bool, window_left: int, window_right: int,
    gates: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split-K decode: ``o [B, Tn, H, Dv]`` (q's dtype) and ``lse [B, H, Tn]`` fp32; ``cache_seqlens`` int32.
    With ``gates [B, Tn, H]`` (MoH): ``o = gate * attention`` and rows with gate 0 do no work (their ``o``
    is 0, their lse ``-inf``); a (batch, kv head) whose query heads are all inactive reads no K/V."""
    B, Tn, H, D = q.shape
    Hkv, DV = k_cache.shape[2], v_cache.shape[3]
    G = H // Hkv
    R = G * Tn
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    o = TC.new_output((B, Tn, H, DV), dtype=q.dtype, device=q.device)
    lse = TC.new_output((B, H, Tn), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    interp = TC.interpreter()
    bd = TC.head_block(max(D, DV))
    row_bytes = bd * q.element_size()  # bytes of one K (or V) row in shared memory
    block_n = 16 if interp else (64 if row_bytes <= 256 else 32 if row_bytes <= 512 else 16)
    num_stages = 3 if q.element_size() == 2 else 2
    block_r = max(16, triton.next_power_of_2(min(R, MAX_ROWS_PER_PROGRAM)))
    n_rblocks = triton.cdiv(R, block_r)
    n_tiles = max(triton.cdiv(capacity, block_n), 1)
    if interp:
        splits = min(n_tiles, 3)  # small, but > 1, so the merge is exercised
    else:
        want = max(1, (2 * _num_sms(q.device)) // (B * Hkv * n_rblocks))
        splits = max(1, min(want, n_tiles, 128))
    keys_per_split = triton.cdiv(n_tiles, splits) * block_n
    splits = triton.cdiv(capacity, keys_per_split) if capacity > 0 else 1

    op = TC.new_output((B, Hkv, splits, R, DV), dtype=torch.float32, device=q.device)
    lp = TC.new_output((B, Hkv, splits, R), dtype=torch.float32, device=q.device)
    right = 0 if causal else window_right
    bt = block_table if paged else cache_seqlens
    has_gates = gates is not None
    g_arg, g_strides = (gates, gates.stride()) if has_gates else (cache_seqlens, (0, 0, 0))
    _decode_kernel[(splits, B * Hkv, n_rblocks)](
        q, k_cache, v_cache, cache_seqlens, bt, g_arg, op, lp,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *(block_table.stride() if paged else (0, 0)), *g_strides,
        *op.stride(), *lp.stride(),
        Tn, G, Hkv, D, DV, R, k_cache.shape[1] if paged else 1, keys_per_split,
        scale * TC.LOG2E, max(window_left, 0), max(right, 0),
        PAGED=paged, HAS_LEFT=window_left >= 0, HAS_RIGHT=causal or window_right >= 0, HAS_GATES=has_gates,
        DOT_PREC=F.dot_precision(q.dtype), BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=TC.head_block(D),
        BLOCK_DV=TC.head_block(DV), num_warps=4, num_stages=num_stages,
    )
    _decode_merge_kernel[(B * Hkv * R,)](
        op, lp, o, lse, g_arg, *op.stride(), *lp.stride(), *o.stride(), *lse.stride(), *g_strides,
        splits, G, Hkv, Tn, DV, R,
        HAS_GATES=has_gates, BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=TC.head_block(DV), num_warps=4,
    )
    return o, lse


@torch.library.custom_op("attnzoo::attention_decode", mutates_args=())
def attention_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor], scale: float, causal: bool, window_left: int, window_right: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns ``o [B, Tn, H, Dv]`` (q's dtype) and ``lse [B, H, Tn]`` fp32; ``cache_seqlens`` int32."""
    return decode_launch(q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, window_left, window_right)


@attention_decode.register_fake
def _attention_decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, window_left, window_right):
    B, Tn, H, _ = q.shape
    return q.new_empty((B, Tn, H, v_cache.shape[-1])), q.new_empty((B, H, Tn), dtype=torch.float32)
