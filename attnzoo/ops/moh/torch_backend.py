"""The "torch" backend of ``moh_attention`` (SPEC §3): computes only the active ``(token, head)`` rows, so its
cost follows the active fraction; any device.

Per (batch, kv head): a query head active on every token (a shared head) is plain attention (the torch
attention backend: SDPA ``is_causal``). The active rows of the group's other heads are gathered in position
order (one ``nonzero``, a host sync) and run as the queries of one attention over the group's dense K/V.
Every computed row is scaled by its gate and all land in the output with one ``index_copy``; inactive rows
are 0 and their gates get no gradient.

- No mask at all (not causal, no window, no padding): one SDPA call over the packed rows.
- Causal on CPU (no window / padding, ``Tk >= Tq``): :class:`_CausalStreams`. The packed rows of every
  (batch, kv head) go side by side, padded to equal counts per chunk, in each call: the CPU flash backward
  parallelizes over batch x heads only. A chunk holds the rows of a span of ``BAND``-token blocks; its keys
  split into a prefix every row of the chunk sees (PyTorch's CPU flash kernel, unmasked) and a band at most
  the span wide (the same kernel with an additive mask gathered from one staircase), merged by lse chunk by
  chunk; the backward runs the flash backward per part with the merged output and lse. Chunks by token
  span keep the masked band narrow at any fraction of active rows (by rows, a band of 512 rows at 25%
  active spanned 512 tokens: 35% extra work).
- Anything else (window, key padding, other devices): chunks of packed rows, each over just the keys its
  rows may see with a per-row mask tested against each row's original position; checkpointed under
  autograd so the backward holds one chunk's mask at a time.

Under ``torch.compile`` (no data-dependent sizes in a traced graph) every head is computed and gated.
"""

from __future__ import annotations

from typing import List, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from attnzoo import backends
from attnzoo.ops.attention.torch_backend import (FLOAT_DTYPES, _zero_excluded, attention_torch, graph_anchor,
                                                 sdpa_chunk)
from attnzoo.ops.validate import default_scale

CHUNK = 256  # packed rows per chunk of the masked path
# CPU flash path: a chunk holds the packed rows of BAND consecutive tokens, blocks merging until a chunk holds
# FLASH_MIN_ROWS rows or spans FLASH_MAX_SPAN tokens; its masked band is at most that span wide
BAND = 128
FLASH_MIN_ROWS = 128
FLASH_MAX_SPAN = 1024
PAD_LIMIT = 1.25  # streams run side by side unless padding would add more than this factor of rows


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


def _band_masks(rel: torch.Tensor, chunks, dtype):
    """The additive ``[1, S, R, hi - split]`` masks of the chunks' bands: rows of one ``-inf`` staircase
    ``tri[i, j] = -inf if j > i``, gathered by ``rel [S, N]`` (each slot's last visible key minus its chunk's
    ``split``): a copy per element, where comparing and selecting costs half a flash call's."""
    width = max(hi - split for _, _, split, hi in chunks)
    j = torch.arange(width, device=rel.device)
    tri = torch.zeros(width, width, dtype=dtype, device=rel.device).masked_fill_(j[None, :] > j[:, None],
                                                                                 float("-inf"))
    S = rel.shape[0]
    return [tri[:, : hi - split].index_select(0, rel[:, off : off + R].reshape(-1)).view(1, S, R, hi - split)
            for off, R, split, hi in chunks]


class _CausalStreams(torch.autograd.Function):
    """Causal attention on CPU of ``S`` streams of packed rows side by side: ``q [1, S, N, D]`` (stream ``s``:
    one batch's one kv head's active rows, in position order, then padding) over each stream's own
    ``k, v [1, S, Tk, D]`` (``Tk >= Tq``). ``chunks = [(off, R, split, hi)]``: slots ``[off, off + R)`` of every
    stream hold the rows of one span of tokens; keys ``[0, split)`` are visible to all of them and run
    through PyTorch's flash kernel *unmasked*; keys ``[split, hi)`` form a band as wide as the span, masked
    by ``rel [S, N]`` (:func:`_band_masks`). The two softmaxes merge by their lse, chunk by chunk, while the
    parts are in cache. The backward runs the flash backward on each part with the merged output and lse
    (:func:`_flash_backward`). All streams go in each call because the CPU flash backward parallelizes over
    batch x heads only; the mask (the kernel costs ~5% more per element with one, building a mask by
    comparisons ~50% more) covers only the narrow band; memory is O(chunk x band)."""

    @staticmethod
    def forward(ctx, q, k, v, rel, scale: float, chunks):
        S, N, Dv = q.shape[1], q.shape[2], v.shape[-1]
        out = q.new_empty(1, S, N, Dv)
        lse = q.new_empty(1, S, N, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
        for (off, R, split, hi), mask in zip(chunks, _band_masks(rel, chunks, q.dtype)):
            qc = q[:, :, off : off + R]
            o_band, lse_band = _flash(qc, k[:, :, split:hi], v[:, :, split:hi], scale, mask)
            if split == 0:
                out[:, :, off : off + R], lse[:, :, off : off + R] = o_band, lse_band
                continue
            # every slot sees its chunk's first band key, so the band lse is finite
            o_pre, lse_pre = _flash(qc, k[:, :, :split], v[:, :, :split], scale, None)
            merged = torch.logaddexp(lse_band, lse_pre)
            ct = merged.dtype
            o = o_band.to(ct).mul_(torch.exp(lse_band - merged)[..., None])
            out[:, :, off : off + R] = o.addcmul_(o_pre.to(ct), torch.exp(lse_pre - merged)[..., None])
            lse[:, :, off : off + R] = merged
        ctx.save_for_backward(q, k, v, rel, out, lse)
        ctx.scale, ctx.chunks = scale, chunks
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, rel, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32  # dk, dv sum over chunks
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
        for (off, R, split, hi), mask in zip(ctx.chunks, _band_masks(rel, ctx.chunks, q.dtype)):
            rows = (dout[:, :, off : off + R], q[:, :, off : off + R])
            state = (out[:, :, off : off + R], lse[:, :, off : off + R])
            gq, gk, gv = _flash_backward(*rows, k[:, :, split:hi], v[:, :, split:hi], *state, ctx.scale, mask)
            dk[:, :, split:hi] += gk
            dv[:, :, split:hi] += gv
            if split > 0:
                gq1, gk1, gv1 = _flash_backward(*rows, k[:, :, :split], v[:, :, :split], *state, ctx.scale, None)
                gq += gq1
                dk[:, :, :split] += gk1
                dv[:, :, :split] += gv1
            dq[:, :, off : off + R] = gq
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None


class _StreamPlan(NamedTuple):
    chunks: list  # [(off, R, split, hi)]: slots [off, off + R) of every stream, keys [0, split) + band [split, hi)
    src: torch.Tensor  # [S, N] int64: the stream's packed row in each slot (0 in padding)
    valid: torch.Tensor  # [S, N] bool: the slot holds a row
    rel: torch.Tensor  # [S, N] int64: the slot's last visible key minus its chunk's split (padding: all the band)


def _stream_plan(pos_list: List[torch.Tensor], offset: int) -> _StreamPlan:
    """The chunks of :class:`_CausalStreams` for streams of packed rows at ascending positions ``pos_list[s]``:
    tokens go in blocks of ``BAND``; a block joins the chunk before it while no stream has
    ``FLASH_MIN_ROWS`` rows in that chunk and it spans under ``FLASH_MAX_SPAN`` tokens. A chunk gives every
    stream ``R`` slots, its most rows; ``split`` / ``hi`` are the diagonals of the chunk's first and one past its
    last row. So the band is at most a chunk's span wide whatever the fraction of active rows, and a chunk
    has rows enough to keep the flash kernel efficient (host reads: ``S x T / BAND`` row bounds)."""
    dev = pos_list[0].device
    ends = torch.stack([torch.stack([p[0], p[-1]]) for p in pos_list]).tolist()
    first = min(e[0] for e in ends) // BAND * BAND
    starts = torch.arange(first, max(e[1] for e in ends) + 1, BAND, device=dev)
    counts = torch.tensor([p.shape[0] for p in pos_list], device=dev)
    bounds = torch.cat([torch.stack([torch.searchsorted(p, starts) for p in pos_list]), counts[:, None]], dim=1)
    bl = bounds.tolist()  # rows of stream s in block b: [bl[s][b], bl[s][b + 1])
    spans, b0 = [], 0
    for b in range(1, len(bl[0])):
        most = max(row[b] - row[b0] for row in bl)
        if most == 0:  # no row yet: the chunk starts at the next block
            b0 = b
        elif b == len(bl[0]) - 1 or most >= FLASH_MIN_ROWS or (b - b0) * BAND >= FLASH_MAX_SPAN:
            spans.append((b0, b))
            b0 = b
    b_lo = torch.tensor([x for x, _ in spans], device=dev)
    b_hi = torch.tensor([y for _, y in spans], device=dev)
    row0, n_sc = bounds[:, b_lo], bounds[:, b_hi] - bounds[:, b_lo]  # [S, C]
    # the chunk's first and last row positions over the streams that have rows in it
    n_max = max(p.shape[0] for p in pos_list)
    pos_pad = torch.stack([torch.cat([p, p.new_zeros(n_max - p.shape[0])]) for p in pos_list])  # [S, n_max]
    has = n_sc > 0
    big = torch.iinfo(torch.int64).max
    p_first = torch.where(has, pos_pad.gather(1, row0.clamp(max=n_max - 1)), big).amin(0)
    p_last = torch.where(has, pos_pad.gather(1, (row0 + n_sc - 1).clamp(min=0)), -1).amax(0)
    R = n_sc.amax(0)  # [C] slots per chunk
    R_l, first_l, last_l = R.tolist(), p_first.tolist(), p_last.tolist()
    offs = [0]
    for r in R_l:
        offs.append(offs[-1] + r)
    chunks = [(offs[c], R_l[c], first_l[c] + offset, last_l[c] + offset + 1) for c in range(len(R_l))]
    chunk_of = torch.repeat_interleave(torch.arange(len(R_l), device=dev), R)  # [N]
    local = torch.arange(offs[-1], device=dev) - torch.tensor(offs[:-1], device=dev)[chunk_of]
    valid = local[None, :] < n_sc[:, chunk_of]
    src = torch.where(valid, row0[:, chunk_of] + local[None, :], 0)
    width = (p_last - p_first)[chunk_of]  # the band's width - 1
    rel = torch.where(valid, pos_pad.gather(1, src) - p_first[chunk_of], width)
    return _StreamPlan(chunks, src, valid, rel)


def _causal_streams(q, k, v, streams, offset: int, scale: float):
    """Causal attention on CPU of ``streams = [(b, g, rows)]`` (``rows``: flat indices ``t * H + h`` of batch b's
    active rows of kv head g's non-shared heads, ascending) through :class:`_CausalStreams`.
    ``(outputs [m, Dv], their flat indices (b * Tq + t) * H + h)``. Streams of very unequal sizes would pad
    too much: then each runs on its own."""
    B, Tq, H, D = q.shape
    pos_list = [rows // H for _, _, rows in streams]
    plan = _stream_plan(pos_list, offset)
    S, N = plan.src.shape
    if S > 1 and S * N > PAD_LIMIT * sum(p.shape[0] for p in pos_list):
        parts = [_causal_streams(q, k, v, [st], offset, scale) for st in streams]
        return torch.cat([o for o, _ in parts]), torch.cat([w for _, w in parts])
    n_max = max(p.shape[0] for p in pos_list)
    flat = torch.stack([torch.cat([rows + b * Tq * H, rows.new_zeros(n_max - rows.shape[0])])
                        for b, _, rows in streams]).gather(1, plan.src)  # [S, N] rows of q.view(-1, D)
    # padding slots repeat the stream's first row (src 0): finite where the rows are, and their outputs and
    # zero output gradients are dropped
    q_pad = q.reshape(-1, D).index_select(0, flat.reshape(-1)).view(S, N, D)
    bs = torch.tensor([b for b, _, _ in streams], device=q.device)
    gs = torch.tensor([g for _, g, _ in streams], device=q.device)
    k_s, v_s = k.permute(0, 2, 1, 3)[bs, gs], v.permute(0, 2, 1, 3)[bs, gs]  # [S, Tk, D], dense rows
    o = _CausalStreams.apply(q_pad[None], k_s[None], v_s[None], plan.rel, scale, plan.chunks)[0]
    keep = plan.valid.reshape(-1)
    return o.reshape(S * N, -1)[keep], flat.reshape(-1)[keep]


def _chunk_ends(pos: torch.Tensor, chunk: int):
    """``(firsts, lasts)``: the positions of the first and last row of each chunk of ``chunk`` packed rows at
    ascending positions ``pos [n]`` (one host read)."""
    n = pos.shape[0]
    nc = -(-n // chunk)
    both = torch.cat([pos[::chunk], pos[chunk - 1 :: chunk], pos[-1:]]).tolist()
    return both[:nc], both[nc : 2 * nc]


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


def _packed_heads(q_rows, rows, H: int, kg, vg, kpm_b, offset: int, causal: bool, window, scale: float,
                  grad: bool):
    """The outputs ``[n, Dv]`` of the (token, head) rows ``rows [n]`` (flat indices ``t * H + h``, ascending:
    position order) of ``q_rows [Tq * H, D]`` (one batch's queries), all heads of one kv group, over
    ``kg, vg [1, Tk, 1, D]``: the rows packed and run as the queries of one attention."""
    pos = rows // H
    qa = q_rows.index_select(0, rows)[None, None]  # [1, 1, n, D]
    kg, vg = kg.permute(0, 2, 1, 3).contiguous(), vg.permute(0, 2, 1, 3).contiguous()  # [1, 1, Tk, D], rows dense
    left, right = window
    if kpm_b is None and left < 0 and right < 0 and not causal:  # every row sees every key
        return F.scaled_dot_product_attention(qa, kg, vg, scale=scale)[0, 0]
    kpm = None if kpm_b is None else kpm_b[0]
    return _masked_rows(qa, kg, vg, pos, kpm, offset, causal, window, scale, grad)


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
    outs, where = [], []  # outputs [m, Dv] of computed (token, head) rows; their flat indices (b * Tq + t) * H + h
    # causal packed rows on CPU: every (batch, kv head) stream goes through the flash kernel together, at the end
    cpu_flash = (causal and key_padding_mask is None and left < 0 and right < 0 and offset >= 0
                 and q.device.type == "cpu" and D == v.shape[-1])
    streams = []
    for b in range(B):
        kpm_b = None if key_padding_mask is None else key_padding_mask[b : b + 1]
        q_rows = q[b].reshape(Tq * H, D)
        for g in range(Hkv):
            kg, vg = k[b : b + 1, :, g : g + 1], v[b : b + 1, :, g : g + 1]  # [1, Tk, 1, D]
            group = range(g * G, (g + 1) * G)
            dense = [h for h in group if full[b][h]]
            if dense:
                sel = torch.tensor(dense, device=q.device)
                o_dense = attention_torch(q[b : b + 1].index_select(2, sel), kg, vg, causal=causal, scale=scale,
                                          window=(left, right), key_padding_mask=kpm_b)[0]  # [Tq, len, Dv]
                outs.append(o_dense.reshape(-1, o_dense.shape[-1]))
                where.append((torch.arange(Tq, device=q.device)[:, None] * H + sel[None, :]).reshape(-1) + b * Tq * H)
            if len(dense) < G:
                in_group = torch.zeros(H, dtype=torch.bool, device=q.device)
                in_group[g * G : (g + 1) * G] = True
                in_group[dense] = False
                rows = (active[b] & in_group).reshape(-1).nonzero()[:, 0]
                if rows.shape[0] and cpu_flash:
                    streams.append((b, g, rows))
                elif rows.shape[0]:
                    outs.append(_packed_heads(q_rows, rows, H, kg, vg, kpm_b, offset, causal, (left, right), scale,
                                              grad))
                    where.append(rows + b * Tq * H)
    if streams:
        o_streams, where_streams = _causal_streams(q, k, v, streams, offset, scale)
        outs.append(o_streams)
        where.append(where_streams)
    Dv = v.shape[-1]
    o = q.new_zeros(B * Tq * H, Dv)
    if not outs:  # no row is active: the inputs stay in the graph (zero gradients), as in the reference
        return o.view(B, Tq, H, Dv) + graph_anchor(q, k, v, gates)
    where = torch.cat(where)
    o_rows = torch.cat(outs)
    # gates scale the computed rows only; inactive rows stay 0 and their gates get no gradient. The anchor (an
    # exact 0) keeps q, k, v in the graph where no computed row reached them (a row seeing no key)
    g_rows = gates.reshape(-1).index_select(0, where) + graph_anchor(q, k, v)
    o_rows = o_rows * g_rows[:, None].to(o_rows.dtype)
    return o.index_copy(0, where, o_rows).view(B, Tq, H, Dv)
