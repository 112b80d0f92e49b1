"""The "flash_attn" engine of ``attention`` and ``attention_with_kvcache``: Tri Dao's flash-attn, where it is
installed (``pip install attnzoo[flash]``) and its features fit.

Which library: FA3 (``flash_attn_interface``, Hopper) when importable and the GPU is sm_90, else FA4
(``flash_attn.cute``, Hopper/Blackwell) when importable and the GPU is sm_90+, else FA2 (``flash_attn``).
Importing attnzoo never imports any of them: availability is a ``find_spec`` and the import happens on
first use.

What it runs (everything else is declared with a reason): fp16/bf16 CUDA tensors, head dims that are
multiples of 8 up to 256 (``Dv == D``), plain / causal (bottom-right, as SPEC §0) / sliding window / GQA-MQA
/ varlen (``cu_seqlens``), decode against a contiguous or paged cache (``flash_attn_with_kvcache``, paged
blocks a multiple of 256 tokens). No bias, no bool or block masks, no key padding (unpad to varlen
first); ``return_lse`` only without gradients through the lse (flash-attn's lse is not differentiable).
Masking contract: rows with no visible key come back as 0; flash-attn's lse for them (+inf) is mapped to
``-inf``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import List, Optional, Tuple

import torch

from attnzoo import backends
from attnzoo.ops.validate import default_scale

DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
PAGE_MULTIPLE = 256


@functools.lru_cache(maxsize=None)  # a find_spec walks sys.path: once per process, not per call
def _spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is not importable
        return False


def library(device: Optional[torch.device] = None) -> Optional[str]:
    """The flash-attn module to use here: ``"flash_attn_interface"`` (FA3), ``"flash_attn.cute"`` (FA4),
    ``"flash_attn"`` (FA2), or None when none is installed."""
    major = None
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        major = torch.cuda.get_device_capability(device)[0]
    if _spec("flash_attn_interface") and (major is None or major == 9):
        return "flash_attn_interface"
    if _spec("flash_attn") and _spec("flash_attn.cute") and (major is None or major >= 9):
        return "flash_attn.cute"
    if _spec("flash_attn"):
        return "flash_attn"
    return None


def device_reasons(device: torch.device) -> List[str]:
    if library(device) is None:
        return ["flash-attn is not installed (pip install attnzoo[flash]: flash-attn / FA3 flash_attn_interface)"]
    if device.type != "cuda":
        return [f"flash-attn runs on CUDA tensors (got {device.type})"]
    return []


backends.register_availability("flash_attn", device_reasons)


def _tensor_reasons(q: torch.Tensor, v: torch.Tensor) -> List[str]:
    reasons = device_reasons(q.device)
    if q.dtype not in DTYPES:
        reasons.append(f"q: dtype {q.dtype}; flash-attn takes float16 or bfloat16")
    D, Dv = q.shape[-1], v.shape[-1]
    if D % 8 or D > MAX_HEAD_DIM:
        reasons.append(f"head dim {D}: flash-attn needs a multiple of 8 up to {MAX_HEAD_DIM}")
    if Dv != D:
        reasons.append(f"v head dim {Dv} != q head dim {D}: flash-attn needs them equal")
    return reasons


def _grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def supports_attention(q, k, v, *, bias=None, mask=None, block_mask=None, key_padding_mask=None, return_lse=False,
                       **_) -> List[str]:
    reasons = _tensor_reasons(q, v)
    for name, t in (("bias", bias), ("mask", mask), ("block_mask", block_mask)):
        if t is not None:
            reasons.append(f"{name}: flash-attn has no arbitrary {name} (attnzoo's Triton or torch backends do)")
    if key_padding_mask is not None:
        reasons.append("key_padding_mask: flash-attn takes padding as varlen (cu_seqlens); pass packed inputs")
    if return_lse and _grad(q, k, v):
        reasons.append("return_lse with gradients: flash-attn's lse is not differentiable")
    return reasons


def supports_decode(q, k_cache, v_cache, cache_seqlens, *, block_table=None, **_) -> List[str]:
    reasons = _tensor_reasons(q, v_cache)
    if block_table is not None and k_cache.shape[1] % PAGE_MULTIPLE:
        reasons.append(f"paged cache with {k_cache.shape[1]}-token pages: flash-attn needs a multiple of "
                       f"{PAGE_MULTIPLE}")
    if _grad(q, k_cache, v_cache):
        reasons.append("flash_attn_with_kvcache is inference-only (inputs require grad)")
    return reasons


def _lib(device):
    return importlib.import_module(library(device))


def _window(window: Tuple[int, int]) -> Tuple[int, int]:
    return int(window[0]), int(window[1])  # flash-attn's convention too: -1 = unbounded


def _fix_lse(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn marks rows with no key by lse = +inf; the contract says -inf."""
    return lse.float().masked_fill(torch.isposinf(lse), float("-inf"))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@backends.register("attention", "flash_attn", priority=20, supports=supports_attention)
def attention_flash(q, k, v, *, causal=False, scale=None, window=(-1, -1), bias=None, mask=None, block_mask=None,
                    key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                    max_seqlen_k=None, return_lse=False):
    fa = _lib(q.device)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    kw = dict(softmax_scale=scale, causal=bool(causal), window_size=_window(window))
    if cu_seqlens_q is not None:
        mq = max_seqlen_q if max_seqlen_q is not None else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        mk = max_seqlen_k if max_seqlen_k is not None else int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        out = fa.flash_attn_varlen_func(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), mq, mk,
                                        return_attn_probs=return_lse, **kw)
    else:
        out = fa.flash_attn_func(q, k, v, return_attn_probs=return_lse, **kw)
    if not return_lse:
        return _first(out)
    o, lse = out[0], out[1]  # lse [B, H, Tq] (varlen: [H, Nq])
    return o, _fix_lse(lse)


@backends.register("attention_with_kvcache", "flash_attn", priority=20, supports=supports_decode)
def attention_with_kvcache_flash(q, k_cache, v_cache, cache_seqlens, *, block_table=None, causal=True, scale=None,
                                 window=(-1, -1), return_lse=False):
    fa = _lib(q.device)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    out = fa.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens.to(torch.int32),
        block_table=None if block_table is None else block_table.to(torch.int32), softmax_scale=scale,
        causal=bool(causal), window_size=_window(window), return_softmax_lse=return_lse,
    )
    if not return_lse:
        return _first(out)
    return out[0], _fix_lse(out[1])
