"""The "xformers" engine of ``attention``: ``xformers.ops.memory_efficient_attention`` where it is installed
(``pip install attnzoo[xformers]``) and its features fit.

Layout BMHK is attnzoo's BTHD; GQA goes through xformers' 5-D grouped form ``[B, M, G, Hq/G, K]`` (kv heads
expanded with stride 0, no copy). Masks are xformers' structured biases, never a dense tensor:
bottom-right causal (``LowerTriangularFromBottomRightMask``), causal with a left window
(``LowerTriangularFromBottomRightLocalAttentionMask``), and varlen as block-diagonal masks
(``BlockDiagonalMask`` / ``BlockDiagonalCausalFromBottomRightMask`` over the packed sequences).

Declared unsupported (with the reason): non-CUDA tensors, bias / bool / block masks / key padding,
``return_lse``, a right window or a window without causal, and causal with ``Tq > Tk`` (rows that see no
key, which xformers does not promise to return as 0 -- the masking contract).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import List

import torch

from attnzoo import backends
from attnzoo.ops.validate import default_scale

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)  # a find_spec walks sys.path: once per process, not per call
def installed() -> bool:
    try:
        return importlib.util.find_spec("xformers") is not None and importlib.util.find_spec("xformers.ops") is not None
    except (ImportError, ValueError):
        return False


def device_reasons(device: torch.device) -> List[str]:
    if not installed():
        return ["xformers is not installed (pip install attnzoo[xformers])"]
    if device.type != "cuda":
        return [f"xformers' memory_efficient_attention runs on CUDA tensors here (got {device.type})"]
    return []


backends.register_availability("xformers", device_reasons)


def supports_attention(q, k, v, *, causal=False, window=(-1, -1), bias=None, mask=None, block_mask=None,
                       key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False, **_) -> List[str]:
    reasons = device_reasons(q.device)
    if q.dtype not in DTYPES:
        reasons.append(f"q: dtype {q.dtype}; xformers takes float16, bfloat16 or float32")
    for name, t in (("bias", bias), ("mask", mask), ("block_mask", block_mask), ("key_padding_mask", key_padding_mask)):
        if t is not None:
            reasons.append(f"{name}: not mapped to an xformers attn_bias (attnzoo's Triton or torch backends take it)")
    if return_lse:
        reasons.append("return_lse: xformers' memory_efficient_attention does not return the lse")
    left, right = window
    if right >= 0 or (left >= 0 and not causal):
        reasons.append(f"window {tuple(window)}: only a left window with causal=True maps to an xformers mask")
    if causal and cu_seqlens_q is None and q.shape[1] > k.shape[1]:
        reasons.append(f"causal with Tq={q.shape[1]} > Tk={k.shape[1]}: rows that see no key are not promised "
                       "to be 0 by xformers (masking contract)")
    if causal and cu_seqlens_q is not None and not torch.compiler.is_compiling():
        lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1])
        lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1])
        if bool((lq > lk).any()):
            reasons.append("causal varlen with a query sequence longer than its key sequence: rows that see no "
                           "key are not promised to be 0 by xformers (masking contract)")
    return reasons


def _grouped(q, k, v):
    """BTHD with ``H = Hkv * G`` -> xformers' 5-D ``[B, M, Hkv, G, K]`` (k, v expanded with stride 0)."""
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    if G == 1:
        return q, k, v, False
    qg = q.reshape(B, Tq, Hkv, G, D)
    kg = k[:, :, :, None].expand(B, k.shape[1], Hkv, G, k.shape[-1])
    vg = v[:, :, :, None].expand(B, v.shape[1], Hkv, G, v.shape[-1])
    return qg, kg, vg, True


@backends.register("attention", "xformers", priority=15, supports=supports_attention)
def attention_xformers(q, k, v, *, causal=False, scale=None, window=(-1, -1), bias=None, mask=None, block_mask=None,
                       key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                       max_seqlen_k=None, return_lse=False):
    xops = importlib.import_module("xformers.ops")
    fmha = importlib.import_module("xformers.ops.fmha.attn_bias")
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    left = int(window[0])
    varlen = cu_seqlens_q is not None
    if varlen:
        lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        if causal:
            attn_bias = fmha.BlockDiagonalCausalFromBottomRightMask.from_seqlens(lq, lk)
            if left >= 0:
                attn_bias = attn_bias.make_local_attention(left + 1)
        else:
            attn_bias = fmha.BlockDiagonalMask.from_seqlens(lq, lk)
        q, k, v = q[None], k[None], v[None]
    elif causal:
        attn_bias = (fmha.LowerTriangularFromBottomRightLocalAttentionMask(left + 1) if left >= 0
                     else fmha.LowerTriangularFromBottomRightMask())
    else:
        attn_bias = None
    qg, kg, vg, grouped = _grouped(q, k, v)
    o = xops.memory_efficient_attention(qg, kg, vg, attn_bias=attn_bias, scale=scale)
    if grouped:
        o = o.reshape(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    return o[0] if varlen else o
