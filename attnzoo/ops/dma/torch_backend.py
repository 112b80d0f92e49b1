"""The "torch" backend of ``dynamic_mask_attention`` (SPEC §5): cost and memory O(T x keep_window), any
device, never a ``Tq x Tk`` mask.

The bias is query-independent, so one ranking of the keys per (batch, bias head) -- by (bias desc,
position desc), :func:`attnzoo.ops.dma.selection.key_ranks` -- serves every row; a row keeps the
``keep_window`` visible keys of smallest rank. Causal rows see growing prefixes, so a key kept by any row
of a chunk of rows ``[r0, r1)`` is either among the top ``keep_window`` of row ``r0``'s visible keys (a key
in the top ``w`` of a larger set that also lies in a smaller set is in the smaller set's top ``w``) or
one of the chunk's ``r1 - r0 - 1`` newer keys. So each chunk gathers at most ``keep_window + chunk``
candidate keys (the running top ``w`` is carried from chunk to chunk: a ``topk`` over ``w + chunk``
ranks), builds its exact keep mask on them (``[chunk, w + chunk]``) and runs SDPA with the bias on the
gathered keys. Without causal every row keeps the same global top ``w``.

Gradients reach q, k, v and the bias (through the gather at kept keys); each chunk is checkpointed so the
backward holds one chunk's mask at a time. Padded key slots are zeroed (NaN there never leaks).
"""

from __future__ import annotations

from typing import List

import torch
from torch.utils.checkpoint import checkpoint

from attnzoo import backends
from attnzoo.ops.attention.torch_backend import FLOAT_DTYPES, _cast_bias, _expand_heads, _zero_excluded, sdpa_chunk
from attnzoo.ops.dma.selection import PAD_RANK, key_ranks
from attnzoo.ops.validate import default_scale

CHUNK = 128


def _supports(q, k, v, bias, **_) -> List[str]:
    reasons = [] if q.dtype in FLOAT_DTYPES else [f"q: dtype {q.dtype} is not a floating dtype"]
    if not bias.is_floating_point():
        reasons.append(f"bias: dtype {bias.dtype} is not a floating dtype")
    return reasons


def _candidates(rank: torch.Tensor, keep_window: int, Tq: int, causal: bool, chunk: int):
    """For each chunk of rows, the key indices ``[B, Hb, S]`` (int64) its rows may keep, or None when no row
    of the chunk sees a key."""
    B, Hb, Tk = rank.shape
    dev = rank.device
    off = Tk - Tq
    if not causal:
        top = rank.topk(min(keep_window, Tk), dim=-1, largest=False).indices
        return [top] * len(range(0, Tq, chunk))
    out = []
    top = torch.empty(B, Hb, 0, dtype=torch.long, device=dev)  # top-w of keys [0, seen)
    seen = 0
    for r0 in range(0, Tq, chunk):
        r1 = min(Tq, r0 + chunk)
        first = min(max(r0 + off + 1, 0), Tk)  # keys [0, first) are visible to row r0
        if first > seen:  # bring the running top-w up to row r0's visible prefix
            new = torch.arange(seen, first, device=dev).expand(B, Hb, -1)
            cand = torch.cat([top, new], dim=-1)
            r = rank.gather(-1, cand)
            top = cand.gather(-1, r.topk(min(keep_window, cand.shape[-1]), dim=-1, largest=False).indices)
            seen = first
        last = min(max(r1 - 1 + off + 1, 0), Tk)  # keys [0, last) are visible to the chunk's last row
        if last == 0:
            out.append(None)
            continue
        out.append(torch.cat([top, torch.arange(seen, last, device=dev).expand(B, Hb, -1)], dim=-1))
    return out


#: elements of one group's mask ``[chunks, B, H, CHUNK, keep_window + CHUNK]``: chunks are batched into one
#: SDPA call per group (few large ops rather than many small ones)
GROUP_ELEMS = 1 << 23


@backends.register("dynamic_mask_attention", "torch", priority=5, supports=_supports)
def dynamic_mask_attention_torch(q, k, v, bias, *, keep_window, causal=True, scale=None, key_padding_mask=None):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    Hb = bias.shape[1]
    if keep_window >= Tk:  # every visible key is kept: attention with the bias
        from attnzoo.ops.attention.torch_backend import attention_torch

        return attention_torch(q, k, v, causal=causal, scale=scale, bias=bias[:, :, None, :],
                               key_padding_mask=key_padding_mask)
    scale = default_scale(D) if scale is None else float(scale)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool()
        k, v = _zero_excluded(k, key_padding_mask), _zero_excluded(v, key_padding_mask)
    C = CHUNK
    S = keep_window + C  # candidates per chunk, padded to one size
    n_chunks = -(-Tq // C)
    off = Tk - Tq
    dev = q.device
    with torch.no_grad():
        rank = key_ranks(bias, key_padding_mask)  # [B, Hb, Tk]; padded keys PAD_RANK
        cands = _candidates(rank, keep_window, Tq, causal, C)
        idx = torch.zeros(n_chunks, B, Hb, S, dtype=torch.long, device=dev)
        valid = torch.zeros(n_chunks, B, Hb, S, dtype=torch.bool, device=dev)
        for c, cand in enumerate(cands):
            if cand is not None:
                idx[c, :, :, : cand.shape[-1]] = cand
                valid[c, :, :, : cand.shape[-1]] = True
        kv_head = torch.arange(Hb, device=dev) // (Hb // Hkv)  # the kv head each bias head reads
        flat = kv_head[None, None, :, None] * Tk + idx  # [n, B, Hb, S] into k's [B, Hkv * Tk]
    pad = n_chunks * C - Tq
    qp = q if pad == 0 else torch.cat([q, q.new_zeros(B, pad, H, D)], dim=1)
    qc_all = qp.view(B, n_chunks, C, H, D).permute(1, 0, 3, 2, 4)  # [n, B, H, C, D]
    kflat = k.transpose(1, 2).reshape(B, Hkv * Tk, D)
    vflat = v.transpose(1, 2).reshape(B, Hkv * Tk, Dv)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias))
    per_group = max(1, GROUP_ELEMS // max(B * H * C * S, 1))
    outs = []
    for c0 in range(0, n_chunks, per_group):
        c1 = min(n_chunks, c0 + per_group)
        n = c1 - c0
        with torch.no_grad():
            ix, r = idx[c0:c1], rank.gather(-1, idx[c0:c1].permute(1, 2, 0, 3).reshape(B, Hb, n * S))
            r = r.view(B, Hb, n, S).permute(2, 0, 1, 3)  # [n, B, Hb, S]
            vis = (valid[c0:c1] & (r != PAD_RANK))[:, :, :, None, :]  # [n, B, Hb, 1, S]
            if causal:
                rows = torch.arange(c0 * C, c1 * C, device=dev).view(n, 1, 1, C, 1)
                vis = vis & (ix[:, :, :, None, :] <= rows + off)
            vis = vis.expand(n, B, Hb, C, S)
            mr = torch.where(vis, r[:, :, :, None, :], torch.full((), PAD_RANK, dtype=r.dtype, device=dev))
            kth = mr.kthvalue(min(keep_window, S), dim=-1, keepdim=True).values
            keep = (vis & (mr <= kth)).reshape(n * B, Hb, C, S)
            fl = flat[c0:c1].reshape(n, B, Hb * S, 1).permute(1, 0, 2, 3).reshape(B, n * Hb * S, 1)
            bidx = ix.permute(1, 2, 0, 3).reshape(B, Hb, n * S)

        def run(qc, kf, vf, bias_, keep=keep, fl=fl, bidx=bidx, n=n):
            kc = kf.gather(1, fl.expand(-1, -1, D)).view(B, n, Hb, S, D).transpose(0, 1).reshape(n * B, Hb, S, D)
            vc = vf.gather(1, fl.expand(-1, -1, Dv)).view(B, n, Hb, S, Dv).transpose(0, 1).reshape(n * B, Hb, S, Dv)
            bc = _cast_bias(bias_, q.dtype).gather(-1, bidx).view(B, Hb, n, S).permute(2, 0, 1, 3)
            m = bc.reshape(n * B, Hb, 1, S).masked_fill(~keep, float("-inf"))
            qc = qc.reshape(n * B, H, C, D)
            if Hb == H and Hkv != H:
                return sdpa_chunk(qc, kc, vc, scale, m)  # gathered per query head: no GQA left
            return sdpa_chunk(qc, kc, vc, scale, _expand_heads(m, H))

        args = (qc_all[c0:c1], kflat, vflat, bias)
        o = checkpoint(run, *args, use_reentrant=False) if grad else run(*args)
        outs.append(o.view(n, B, H, C, Dv))
    o = torch.cat(outs, dim=0).permute(1, 0, 3, 2, 4).reshape(B, n_chunks * C, H, Dv)
    return o[:, :Tq]
