"""The "torch" backend of ``moh_attention`` (SPEC §3): computes only the active ``(token, head)`` rows, so its
cost follows the active fraction; any device.

Per (batch, kv head): the active rows of the group's ``H / Hkv`` query heads are packed in position order
(one ``nonzero``, a host sync), run as the queries of one attention over the group's dense K/V (causal /
window / padding tested against each row's original position, in chunks of packed rows, each chunk over
just the keys its rows may see), scaled by their gates and scattered back; inactive rows are 0 and their
gates get no gradient. Chunks are checkpointed under autograd so the backward holds one chunk's mask at a
time. Under ``torch.compile`` (no data-dependent sizes in a traced graph) every head is computed and gated.
"""

from __future__ import annotations

from typing import List

import torch
from torch.utils.checkpoint import checkpoint

from attnzoo import backends
from attnzoo.ops.attention.torch_backend import FLOAT_DTYPES, _zero_excluded, graph_anchor, sdpa_chunk
from attnzoo.ops.validate import default_scale

CHUNK = 256  # packed rows per chunk


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


def sdpa_with_lse(q, k, v, scale: float):
    """Unmasked attention and its lse through the CPU flash kernel (``[B, H, L, D]``, equal head counts)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=None,
                                                                     scale=scale)[:2]


def _prefix_band(qc, kc, vc, split: int, last: torch.Tensor, scale: float) -> torch.Tensor:
    """Inference on CPU, causal packed rows: keys ``[0, split)`` are visible to every row (no mask: SDPA's
    flash kernel, which also returns the lse), keys ``[split, S)`` form a narrow band (explicit, masked by
    each row's last visible key ``last``); the two softmaxes merge by their lse. Avoids the masked kernel,
    whose cost per element on CPU is several times the unmasked one."""
    o1, lse1 = sdpa_with_lse(qc, kc[:, :, :split], vc[:, :, :split], scale)
    ct = torch.float64 if qc.dtype == torch.float64 else torch.float32
    kb, vb = kc[:, :, split:].to(ct), vc[:, :, split:].to(ct)
    s = torch.matmul(qc.to(ct), kb.transpose(-1, -2)) * scale  # [1, 1, n, band]
    j = torch.arange(split, kc.shape[2], device=qc.device)
    s = s.masked_fill(j[None, :] > last[:, None], float("-inf"))
    lse2 = torch.logsumexp(s, dim=-1)  # -inf for rows that see no band key
    lse = torch.logaddexp(lse1.to(ct), lse2)
    w2 = torch.exp(lse2 - lse)[..., None]
    o2 = torch.matmul(torch.exp(s - lse[..., None]), vb)  # already weighted by the merge
    return (o1.to(ct) * (1 - w2) + o2).to(qc.dtype)


@backends.register("moh_attention", "torch", priority=5, supports=_supports)
def moh_attention_torch(q, k, v, gates, *, causal=False, scale=None, window=(-1, -1), key_padding_mask=None):
    B, Tq, H, D = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    offset = Tk - Tq
    scale = default_scale(D) if scale is None else float(scale)
    left, right = int(window[0]), int(window[1])
    if torch.compiler.is_compiling():
        # packing needs data-dependent sizes (nonzero, host reads of positions); a traced graph computes every
        # head through the torch attention backend and applies the gates (same values and gradients)
        from attnzoo.ops.attention.torch_backend import attention_torch

        o = attention_torch(q, k, v, causal=causal, scale=scale, window=(left, right),
                            key_padding_mask=key_padding_mask)
        g = torch.where(gates != 0, gates, gates.detach())  # no gradient into inactive gates
        return o * g[..., None].to(o.dtype)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool()
        k, v = _zero_excluded(k, key_padding_mask), _zero_excluded(v, key_padding_mask)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    active = gates != 0  # [B, Tq, H]
    per_batch = []
    for b in range(B):
        groups = []
        for g in range(Hkv):
            qg = q[b, :, g * G : (g + 1) * G].reshape(Tq * G, D)  # row t * G + j: token t, head g * G + j
            idx = active[b, :, g * G : (g + 1) * G].reshape(-1).nonzero()[:, 0]  # ascending: position order
            n = idx.shape[0]
            if n == 0:
                groups.append(q.new_zeros(Tq * G, Dv))
                continue
            pos_all = idx // G
            qa = qg.index_select(0, idx)[None, None]  # [1, 1, n, D]
            kg, vg = k[b, :, g][None, None], v[b, :, g][None, None]  # [1, 1, Tk, D]
            kpm_b = None if key_padding_mask is None else key_padding_mask[b]
            firsts = lasts = None
            if causal or left >= 0 or right >= 0:  # positions of each chunk's first and last row (one sync)
                nc = -(-n // CHUNK)
                both = torch.cat([pos_all[::CHUNK], pos_all[CHUNK - 1 :: CHUNK], pos_all[-1:]]).tolist()
                firsts, lasts = both[:nc], both[nc : 2 * nc]
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
                    outs.append(q.new_zeros(1, 1, r1 - r0, Dv))
                    continue
                pos = pos_all[r0:r1]

                args = (qa[:, :, r0:r1], kg[:, :, lo:hi], vg[:, :, lo:hi])
                split = firsts[c] + offset + 1 - lo if firsts is not None else 0  # keys every row sees
                if (not grad and causal and left < 0 and kpm_b is None and q.device.type == "cpu"
                        and 0 < split < hi - lo):
                    outs.append(_prefix_band(*args, split, pos - (lo - offset), scale))
                    continue

                def run(qc, kc, vc, pos=pos, lo=lo, hi=hi, kpm_b=kpm_b):
                    m, may_be_empty = _rows_mask(pos, lo, hi, offset, causal, (left, right), kpm_b, q.device)
                    return sdpa_chunk(qc, kc, vc, scale, m, may_be_empty=may_be_empty)

                outs.append(checkpoint(run, *args, use_reentrant=False) if grad else run(*args))
            o_rows = torch.cat(outs, dim=2)[0, 0]  # [n, Dv]
            groups.append(q.new_zeros(Tq * G, Dv).index_copy(0, idx, o_rows))
        per_batch.append(torch.stack([x.view(Tq, G, Dv) for x in groups], dim=1).reshape(Tq, H, Dv))
    o = torch.stack(per_batch, dim=0) + graph_anchor(q, k, v)  # inputs stay in the graph if no row is active
    # gates: inactive rows are 0 already (and their gates get 0 gradient through o = 0)
    return o * gates[..., None].to(o.dtype)
