"""The "torch" backend of ``moh_attention`` (SPEC §3): computes only the active ``(token, head)`` rows, so its
cost follows the active fraction; any device.

Per (batch, kv head): a query head active on every token (a shared head) is plain attention (the torch
attention backend: SDPA ``is_causal``). The active rows of the group's other heads are packed in position
order (one ``nonzero``, a host sync), run as the queries of one attention over the group's dense K/V,
scaled by their gates and scattered back; inactive rows are 0 and their gates get no gradient.

- No mask at all (not causal, no window, no padding): one SDPA call over the packed rows.
- Causal on CPU (no window / padding, ``Tk >= Tq``): :class:`_CausalPackedRows`, chunks of packed rows whose
  keys split into a prefix every row of the chunk sees (PyTorch's CPU flash kernel, unmasked) and a narrow
  masked band, merged by lse; its backward runs the flash backward per part with the merged output and lse.
  PyTorch's CPU flash kernel with a mask costs a few times per element what it costs without one, so only
  the band pays that.
- Anything else (window, key padding, other devices): chunks of packed rows, each over just the keys its
  rows may see with a per-row mask tested against each row's original position; checkpointed under
  autograd so the backward holds one chunk's mask at a time.

Under ``torch.compile`` (no data-dependent sizes in a traced graph) every head is computed and gated.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from attnzoo import backends
from attnzoo.ops.attention.torch_backend import (FLOAT_DTYPES, _zero_excluded, attention_torch, graph_anchor,
                                                 sdpa_chunk)
from attnzoo.ops.validate import default_scale

CHUNK = 256  # packed rows per chunk of the masked path
FLASH_CHUNK = 512  # packed rows per chunk of the CPU flash path (band width ~ FLASH_CHUNK / rows per token)


def _supports(q, k, v, gates, **_) -> List[str]:
    reasons = [] if q.dtype in FLOAT_DTYPES else [f"q: dtype {q.dtype} is not a floating dtype"]
    if not gates.is_floating_point():
        reasons.append(f"gates: dtype {gates.dtype} is not a floating dtype")
    return reasons


def _rows_mask(pos, lo, hi, offset, causal, window, kpm_b, device):
    """``([1, 1, n, S] keep mask or None, may_be_empty)`` of packed rows at positions ``pos [n]`` (ascending)
    over keys ``[lo, hi)``: one comparison per bound, nothing else."""
    left, right = window
    j = torch.arange(lo, hi, device=device)[None, :]
    diag = pos[:, None] + offset
    keep = None
    if causal or right >= 0:  # with causal the diagonal is the tighter upper bound (right >= 0)
        keep = j <= (diag if causal else diag + right)
    if left >= 0:
        low = j >= diag - left
        keep = low if keep is None else keep & low
    if kpm_b is not None:
        kp = kpm_b[lo:hi][None, :]
        keep = kp.expand(pos.shape[0], -1) if keep is None else keep & kp
    if keep is None:
        return None, False
    # every row sees a key unless padding is involved or a row's range leaves [lo, hi): pos is ascending, so
    # the first row has the smallest upper bound and the last row the largest lower bound
    p0, p1 = int(pos[0]), int(pos[-1])
    up0 = p0 + offset + (0 if causal else (right if right >= 0 else hi))
    lo1 = p1 + offset - left if left >= 0 else lo
    may_be_empty = kpm_b is not None or up0 < max(lo, lo1) or max(lo, lo1) >= hi
    return keep[None, None], may_be_empty


def _flash(q, k, v, scale: float, mask):
    """``(o, lse)`` of ``q [1, 1, n, D]`` over ``k, v [1, 1, S, D]`` through PyTorch's CPU flash kernel (the
    public SDPA does not return the lse); ``mask`` None or additive ``[1, 1, n, S]`` of q's dtype."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                     scale=scale)[:2]


def _flash_backward(do, q, k, v, o, lse, scale: float, mask):
    """``(dq, dk, dv)`` of one key range's share of an attention whose *whole* output ``o`` and lse are given:
    the kernel's ``P = exp(s - lse)`` and ``delta = rowsum(do * o)`` then are the merged softmax's, so the
    shares of disjoint key ranges add up to the exact gradient (as in split-KV flash-decoding)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, o, lse, 0.0, False, attn_mask=mask, scale=scale)


def _band_mask(last: torch.Tensor, split: int, hi: int, dtype) -> torch.Tensor:
    """Additive ``[1, 1, n, hi - split]`` mask of rows whose last visible key is ``last [n]`` over keys
    ``[split, hi)``."""
    j = torch.arange(split, hi, device=last.device)
    return torch.where(j[None, :] > last[:, None], float("-inf"), 0.0).to(dtype)[None, None]


class _CausalPackedRows(torch.autograd.Function):
    """Causal attention of packed rows ``q [1, 1, n, D]`` at ascending positions ``pos [n]`` over one kv head's
    ``k, v [1, 1, Tk, D]`` (``Tk >= Tq``), on CPU. Rows go in chunks ``plan = [(r0, r1, split, hi)]``: keys
    ``[0, split)`` (``split`` = the chunk's first row's diagonal) are visible to every row of the chunk and run
    through the flash kernel *unmasked*; keys ``[split, hi)`` form a band as wide as the chunk's span of
    positions, masked. The two softmaxes merge by their lse (once, over all rows). The backward runs the
    flash backward on each part with the merged output and lse (:func:`_flash_backward`). So the mask --
    a few times the cost per element of the unmasked kernel on CPU -- covers only the narrow band, in
    training as in inference, and memory is O(chunk x band)."""

    @staticmethod
    def forward(ctx, q, k, v, pos, offset: int, scale: float, plan):
        last = pos + offset  # each row's last visible key
        band = [_flash(q[:, :, r0:r1], k[:, :, split:hi], v[:, :, split:hi], scale,
                       _band_mask(last[r0:r1], split, hi, q.dtype)) for r0, r1, split, hi in plan]
        out, lse = torch.cat([o for o, _ in band], dim=2), torch.cat([x for _, x in band], dim=2)
        # every row sees its chunk's first band key, so the band lse is finite; splits ascend, so the chunks
        # with a prefix (split > 0) hold the rows [rp, n)
        prefix = [(r0, r1, split) for r0, r1, split, _ in plan if split > 0]
        if prefix:
            rp = prefix[0][0]
            parts = [_flash(q[:, :, r0:r1], k[:, :, :split], v[:, :, :split], scale, None) for r0, r1, split in prefix]
            o1, lse1 = torch.cat([o for o, _ in parts], dim=2), torch.cat([x for _, x in parts], dim=2)
            lse2 = lse[:, :, rp:]
            merged = torch.logaddexp(lse2, lse1)
            ct = merged.dtype  # fp32 (fp64 for fp64 inputs)
            out[:, :, rp:] = (out[:, :, rp:].to(ct) * torch.exp(lse2 - merged)[..., None]
                              + o1.to(ct) * torch.exp(lse1 - merged)[..., None]).to(q.dtype)
            lse[:, :, rp:] = merged
        ctx.save_for_backward(q, k, v, last, out, lse)
        ctx.scale, ctx.plan = scale, plan
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, last, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # dk, dv sum over chunks
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        for r0, r1, split, hi in ctx.plan:
            rows = (dout[:, :, r0:r1], q[:, :, r0:r1])
            state = (out[:, :, r0:r1], lse[:, :, r0:r1])
            mask = _band_mask(last[r0:r1], split, hi, q.dtype)
            gq, gk, gv = _flash_backward(*rows, k[:, :, split:hi], v[:, :, split:hi], *state, ctx.scale, mask)
            dk[:, :, split:hi] += gk
            dv[:, :, split:hi] += gv
            if split > 0:
                gq1, gk1, gv1 = _flash_backward(*rows, k[:, :, :split], v[:, :, :split], *state, ctx.scale, None)
                gq += gq1
                dk[:, :, :split] += gk1
                dv[:, :, :split] += gv1
            dq[:, :, r0:r1] = gq
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _chunk_ends(pos: torch.Tensor, chunk: int):
    """``(firsts, lasts)``: the positions of the first and last row of each chunk of ``chunk`` packed rows at
    ascending positions ``pos [n]`` (one host read)."""
    n = pos.shape[0]
    nc = -(-n // chunk)
    both = torch.cat([pos[::chunk], pos[chunk - 1 :: chunk], pos[-1:]]).tolist()
    return both[:nc], both[nc : 2 * nc]


def _causal_plan(pos: torch.Tensor, offset: int):
    """``[(r0, r1, split, hi)]`` of :class:`_CausalPackedRows`: chunks of ``FLASH_CHUNK`` rows, ``split`` the
    first row's diagonal, ``hi`` one past the last row's."""
    firsts, lasts = _chunk_ends(pos, FLASH_CHUNK)
    n = pos.shape[0]
    return [(r0, min(n, r0 + FLASH_CHUNK), firsts[c] + offset, lasts[c] + offset + 1)
            for c, r0 in enumerate(range(0, n, FLASH_CHUNK))]


def _masked_rows(qa, kg, vg, pos_all, kpm_b, offset: int, causal: bool, window, scale: float, grad: bool):
    """Packed rows ``qa [1, 1, n, D]`` at ascending positions ``pos_all [n]`` over ``kg, vg [1, 1, Tk, D]``
    with a per-row mask (window, key padding, causal where the flash path does not apply), in chunks of
    ``CHUNK`` rows over just the keys a chunk may see; chunks are checkpointed under autograd. ``[n, Dv]``."""
    left, right = window
    n, Tk, Dv = qa.shape[2], kg.shape[2], vg.shape[-1]
    firsts = lasts = None
    if causal or left >= 0 or right >= 0:
        firsts, lasts = _chunk_ends(pos_all, CHUNK)
    outs = []
    for c, r0 in enumerate(range(0, n, CHUNK)):
        r1 = min(n, r0 + CHUNK)
        lo, hi = 0, Tk
        if firsts is not None:
            p_first, p_last = firsts[c], lasts[c]
            if causal:
                hi = min(hi, p_last + offset + 1)
            if right >= 0:
                hi = min(hi, p_last + offset + right + 1)
            if left >= 0:
                lo = max(lo, p_first + offset - left)
        if hi <= lo:
            outs.append(qa.new_zeros(1, 1, r1 - r0, Dv))
            continue
        pos = pos_all[r0:r1]

        args = (qa[:, :, r0:r1], kg[:, :, lo:hi], vg[:, :, lo:hi])

        def run(qc, kc, vc, pos=pos, lo=lo, hi=hi):
            m, may_be_empty = _rows_mask(pos, lo, hi, offset, causal, window, kpm_b, qa.device)
            return sdpa_chunk(qc, kc, vc, scale, m, may_be_empty=may_be_empty)

        outs.append(checkpoint(run, *args, use_reentrant=False) if grad else run(*args))
    return torch.cat(outs, dim=2)[0, 0]


def _packed_heads(qs, act, kg, vg, kpm_b, offset: int, causal: bool, window, scale: float, grad: bool):
    """The active rows of some query heads of one kv group: ``qs [Tq, n_heads, D]``, ``act [Tq, n_heads]``
    bool, ``kg, vg [1, Tk, 1, D]`` -> ``[Tq, n_heads, Dv]`` (inactive rows 0). Rows are packed in position
    order (row ``t * n_heads + j``: token t, head j) and run as the queries of one attention."""
    Tq, nh, D = qs.shape
    Dv = vg.shape[-1]
    idx = act.reshape(-1).nonzero()[:, 0]  # ascending: position order
    if idx.shape[0] == 0:
        return qs.new_zeros(Tq, nh, Dv)
    pos = idx // nh
    qa = qs.reshape(Tq * nh, D).index_select(0, idx)[None, None]  # [1, 1, n, D]
    kg, vg = kg.permute(0, 2, 1, 3).contiguous(), vg.permute(0, 2, 1, 3).contiguous()  # [1, 1, Tk, D], rows dense
    left, right = window
    if kpm_b is None and left < 0 and right < 0 and not causal:  # every row sees every key
        o_rows = F.scaled_dot_product_attention(qa, kg, vg, scale=scale)[0, 0]
    elif kpm_b is None and left < 0 and right < 0 and offset >= 0 and qs.device.type == "cpu" and D == Dv:
        o_rows = _CausalPackedRows.apply(qa, kg, vg, pos, offset, scale, _causal_plan(pos, offset))[0, 0]
    else:
        kpm = None if kpm_b is None else kpm_b[0]
        o_rows = _masked_rows(qa, kg, vg, pos, kpm, offset, causal, window, scale, grad)
    return qs.new_zeros(Tq * nh, Dv).index_copy(0, idx, o_rows).view(Tq, nh, Dv)


@backends.register("moh_attention", "torch", priority=5, supports=_supports)
def moh_attention_torch(q, k, v, gates, *, causal=False, scale=None, window=(-1, -1), key_padding_mask=None):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    offset = Tk - Tq
    scale = default_scale(D) if scale is None else float(scale)
    left, right = int(window[0]), int(window[1])
    if torch.compiler.is_compiling():
        # packing needs data-dependent sizes (nonzero, host reads of positions); a traced graph computes every
        # head through the torch attention backend and applies the gates (same values and gradients)
        o = attention_torch(q, k, v, causal=causal, scale=scale, window=(left, right),
                            key_padding_mask=key_padding_mask)
        g = torch.where(gates != 0, gates, gates.detach())  # no gradient into inactive gates
        return o * g[..., None].to(o.dtype)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool()
        k, v = _zero_excluded(k, key_padding_mask), _zero_excluded(v, key_padding_mask)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    active = gates != 0  # [B, Tq, H]
    full = active.all(dim=1).tolist()  # [B][H]: a head active on every token is plain attention
    per_batch = []
    for b in range(B):
        kpm_b = None if key_padding_mask is None else key_padding_mask[b : b + 1]
        heads = [None] * H  # [Tq, Dv] per head
        for g in range(Hkv):
            kg, vg = k[b : b + 1, :, g : g + 1], v[b : b + 1, :, g : g + 1]  # [1, Tk, 1, D]
            for dense, hs in ((True, [h for h in range(g * G, (g + 1) * G) if full[b][h]]),
                              (False, [h for h in range(g * G, (g + 1) * G) if not full[b][h]])):
                if not hs:
                    continue
                sel = torch.tensor(hs, device=q.device)
                qs = q[b : b + 1].index_select(2, sel)  # [1, Tq, len(hs), D]
                if dense:
                    os_ = attention_torch(qs, kg, vg, causal=causal, scale=scale, window=(left, right),
                                          key_padding_mask=kpm_b)[0]
                else:
                    os_ = _packed_heads(qs[0], active[b].index_select(1, sel), kg, vg, kpm_b, offset, causal,
                                        (left, right), scale, grad)
                for i, h in enumerate(hs):
                    heads[h] = os_[:, i]
        per_batch.append(torch.stack(heads, dim=1))  # [Tq, H, Dv]
    o = torch.stack(per_batch, dim=0) + graph_anchor(q, k, v)  # inputs stay in the graph if no row is active
    # gates: inactive rows are 0 already (and their gates get 0 gradient through o = 0)
    return o * gates[..., None].to(o.dtype)
