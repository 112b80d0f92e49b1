"""PyTorch reference of the softmax attention core (SPEC §0, §1) and of KV-cache decoding (SPEC §2).

Readable, materialises the full ``[B, H, Tq, Tk]`` score matrix, computes in fp32 (fp64 stays fp64).
Every kernel is tested against this. Layout BTHD: ``q [B, Tq, H, D]``, ``k [B, Tk, Hkv, D]``,
``v [B, Tk, Hkv, Dv]``; varlen: ``q [Nq, H, D]`` with ``cu_seqlens_q [n+1]`` (and likewise k, v).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnzoo.ops.masks.block_mask import BlockMask
from attnzoo.ops.validate import default_scale


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every reference computes in for inputs of ``dtype``: fp64 stays fp64, anything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logsumexp(s: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """``log(sum(exp(s)))`` over ``dim`` (rows of finite scores), with the exact gradient ``softmax(s)``.

    ``torch.logsumexp``'s backward is ``exp(s - lse)``, which is wrong when ``lse`` rounds to the row max: with
    a huge finite bias (finfo.min, -1e9) on every key of a row, ``log(n)`` is below the bias' ulp, so every
    key would get weight 1 instead of ``1/n``. Here the max is a constant (its gradient cancels exactly),
    so the gradient is the softmax itself."""
    if s.shape[dim] == 0:  # no key at all: -inf, as torch.logsumexp gives
        return torch.logsumexp(s, dim=dim, keepdim=keepdim)
    m = s.detach().amax(dim=dim, keepdim=True)
    out = m + torch.log(torch.exp(s - m).sum(dim=dim, keepdim=True))
    return out if keepdim else out.squeeze(dim)


def diagonal_mask(
    Tq: int, Tk: int, *, causal: bool, window: Tuple[int, int], offset=None, device=None, rows=None, cols=None
) -> Optional[torch.Tensor]:
    """Causal / sliding-window visibility ``[.., Tq, Tk]`` measured from the bottom-right diagonal.

    Query ``i`` and key ``j`` are ``d = j - (i + offset)`` apart, ``offset = Tk - Tq`` by default (a
    ``[B]`` tensor gives a per-batch offset and a ``[B, 1, Tq, Tk]`` result). Visible iff
    ``d <= 0`` when causal, ``d >= -left`` when ``left >= 0``, ``d <= right`` when ``right >= 0``.
    ``rows = (r0, r1)`` / ``cols = (lo, hi)`` restrict it to those query rows / keys (chunked engines).
    Returns None when nothing is masked.
    """
    left, right = window
    if not causal and left < 0 and right < 0:
        return None
    if offset is None:
        offset = Tk - Tq
    r0, r1 = rows if rows is not None else (0, Tq)
    lo, hi = cols if cols is not None else (0, Tk)
    i = torch.arange(r0, r1, device=device).view(-1, 1)
    j = torch.arange(lo, hi, device=device).view(1, -1)
    if isinstance(offset, torch.Tensor):
        offset = offset.to(device).view(-1, 1, 1, 1)
    d = j - (i + offset)
    keep = torch.ones_like(d, dtype=torch.bool)
    if causal:
        keep = keep & (d <= 0)
    if left >= 0:
        keep = keep & (d >= -left)
    if right >= 0:
        keep = keep & (d <= right)
    return keep


def expand_kv_heads(t: torch.Tensor, H: int, dim: int) -> torch.Tensor:
    """Repeat kv heads (or a bias/mask with Hkv heads) along ``dim`` so that query head ``h`` reads kv head
    ``h // (H // Hkv)`` (contiguous groups, SPEC §0). Dims of size 1 or already ``H`` are left alone."""
    n = t.shape[dim]
    if n == H or n == 1:
        return t
    return t.repeat_interleave(H // n, dim=dim)


def visibility(
    B: int,
    H: int,
    Tq: int,
    Tk: int,
    *,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    mask: Optional[torch.Tensor] = None,
    block_mask: Optional[BlockMask] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    device=None,
) -> Optional[torch.Tensor]:
    """The combined keep-mask broadcastable to ``[B, H, Tq, Tk]`` (True = visible), or None if all visible."""
    keep = diagonal_mask(Tq, Tk, causal=causal, window=window, device=device)

    def both(a, b):
        return b if a is None else a & b

    if mask is not None:
        keep = both(keep, expand_kv_heads(mask.to(device), H, 1))
    if block_mask is not None:
        keep = both(keep, block_mask.to_dense(B, H, device=device))
    if key_padding_mask is not None:
        keep = both(keep, key_padding_mask.to(device).bool()[:, None, None, :])
    return keep


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor],
    keep: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense masked softmax attention on BTHD tensors already in the compute dtype.

    Returns ``o [B, Tq, H, Dv]`` and ``lse [B, H, Tq]``. A key is excluded where ``keep`` is False or the
    bias is ``-inf``. Rows with no visible key give ``o = 0`` and ``lse = -inf``; their gradients are 0
    (the fill value is a constant, never ``-inf - -inf``). See docs/masking.md.
    """
    H = q.shape[2]
    k = expand_kv_heads(k, H, 2)
    v = expand_kv_heads(v, H, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        bias = expand_kv_heads(bias.to(s.dtype), H, 1)
        s = s + bias
        # a bias of -inf excludes its key, like False in a mask (a finite bias, even finfo.min, is arithmetic)
        finite = bias > float("-inf")
        keep = finite if keep is None else keep & finite
    if keep is not None:
        keep = keep.expand_as(s)
        row_any = keep.any(dim=-1, keepdim=True)
        # masked keys -> -inf; in rows with no visible key, every score -> 0 so softmax stays finite
        s = s.masked_fill(~keep, float("-inf")).masked_fill(~row_any, 0.0)
        p = torch.softmax(s, dim=-1) * row_any
        lse = logsumexp(s, dim=-1).masked_fill(~row_any[..., 0], float("-inf"))
    else:
        p = torch.softmax(s, dim=-1)
        lse = logsumexp(s, dim=-1)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return o, lse


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    block_mask: Optional[BlockMask] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
):
    """SPEC §1 softmax attention. See :func:`attnzoo.attention` for the argument contract.

    ``max_seqlen_q``/``max_seqlen_k`` (kernel launch hints) are accepted and ignored: the reference reads
    ``cu_seqlens`` itself.

    Returns ``o`` shaped like ``q`` (last dim ``Dv``), and with ``return_lse`` the fp32 log-sum-exp,
    ``[B, H, Tq]`` (varlen: ``[H, Nq]``).
    """
    if scale is None:
        scale = default_scale(q.shape[-1])
    ct = compute_dtype(q.dtype)
    if cu_seqlens_q is not None:
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs, lses = [], []
        for i in range(len(cq) - 1):
            o_i, lse_i = attention_reference(
                q[cq[i] : cq[i + 1]][None],
                k[ck[i] : ck[i + 1]][None],
                v[ck[i] : ck[i + 1]][None],
                causal=causal,
                scale=scale,
                window=window,
                return_lse=True,
            )
            outs.append(o_i[0])
            lses.append(lse_i[0])
        o, lse = torch.cat(outs, 0), torch.cat(lses, -1)
        return (o, lse) if return_lse else o
    B, Tq, H, _ = q.shape
    Tk = k.shape[1]
    if key_padding_mask is not None:
        # padded slots are never read: zero them so NaN/inf there cannot leak through 0 * NaN in P @ V
        real = key_padding_mask.to(q.device).bool()[:, :, None, None]
        k, v = k.masked_fill(~real, 0), v.masked_fill(~real, 0)
    keep = visibility(
        B, H, Tq, Tk, causal=causal, window=window, mask=mask, block_mask=block_mask,
        key_padding_mask=key_padding_mask, device=q.device,
    )
    o, lse = softmax_attention(q.to(ct), k.to(ct), v.to(ct), scale, bias, keep)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Paged cache ``[num_pages, page_size, Hkv, D]`` + ``block_table [B, max_pages]`` -> contiguous
    ``[B, max_pages * page_size, Hkv, D]``."""
    B, P = block_table.shape
    pages = cache[block_table.long().reshape(-1)]  # [B*P, page, Hkv, D]
    return pages.view(B, P * cache.shape[1], *cache.shape[2:])


def attention_with_kvcache_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    block_table: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    return_lse: bool = False,
):
    """Decode reference: ``q [B, Tn, H, D]`` against the first ``cache_seqlens[b]`` keys of batch ``b``
    (which already include the ``Tn`` new ones). Causal is bottom-right per batch: query ``i`` sees key
    ``j`` iff ``j <= i + cache_seqlens[b] - Tn``."""
    if block_table is not None:
        k_cache, v_cache = gather_paged(k_cache, block_table), gather_paged(v_cache, block_table)
    if scale is None:
        scale = default_scale(q.shape[-1])
    B, Tn, H, _ = q.shape
    Tmax = k_cache.shape[1]
    lens = cache_seqlens.to(q.device).long()
    valid = torch.arange(Tmax, device=q.device)[None, :] < lens[:, None]  # [B, Tmax]
    # slots past cache_seqlens are never read: zero them so garbage there (e.g. NaN in a torch.empty
    # buffer) cannot leak through 0 * NaN in P @ V
    k_cache = k_cache.masked_fill(~valid[:, :, None, None], 0)
    v_cache = v_cache.masked_fill(~valid[:, :, None, None], 0)
    keep = valid[:, None, None, :]
    diag = diagonal_mask(Tn, Tmax, causal=causal, window=window, offset=lens - Tn, device=q.device)
    if diag is not None:
        keep = keep & diag
    ct = compute_dtype(q.dtype)
    o, lse = softmax_attention(q.to(ct), k_cache.to(ct), v_cache.to(ct), scale, None, keep)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o
