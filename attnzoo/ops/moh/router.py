"""MoH routing, reference math (SPEC §3, arXiv 2410.11842).

Heads are ordered ``[shared | routed]``: ``num_shared`` always-active heads, then ``h_r`` routed heads of
which each token activates ``top_k``. Gates ``[B, T, H]`` multiply each head's output row before the
unchanged output projection; a gate of exactly 0 marks an inactive ``(token, head)`` pair, whose
attention the kernels skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from attnzoo.errors import InputError

NORMALIZE = ("code", "paper")


@dataclass
class RouterOutput:
    gates: torch.Tensor  # [B, T, H]: shared then routed; 0 for inactive routed heads
    probs: Optional[torch.Tensor]  # [B, T, h_r]: routed probabilities before top-k (for the aux loss)
    selected: torch.Tensor  # [B, T, h_r] bool: routed heads each token activated


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of the last dim; ties go to the lower index (a stable sort:
    ``torch.topk`` leaves ties unspecified, and at init every router logit ties)."""
    idx = scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def _scaled_softmax(logits: torch.Tensor, scale: float, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``scale * softmax(logits)`` over the last dim, restricted to ``keep`` (others 0), computed as
    ``(scale * e_i) / sum_j e_j`` with ``e = exp(logits - max)``: equal logits give ``e = 1`` and a sum of
    exactly ``n``, so ``scale = n`` gives gates of exactly 1 (``n * softmax`` rounds, e.g. ``12 * (1/12)``)."""
    m = logits.detach().amax(dim=-1, keepdim=True)
    e = torch.exp(logits - m)
    if keep is not None:
        e = e * keep
    return (scale * e) / e.sum(-1, keepdim=True)


def router_logits(
    x: torch.Tensor, w_routed: Optional[torch.Tensor], w_shared: Optional[torch.Tensor], w_mix: Optional[torch.Tensor]
):
    """``(x W_r^T, x W_s^T, x W_h^T)`` in fp32 (None for an absent weight): the router's matmuls."""
    xf = x.float()
    return tuple(xf @ w.float().t() if w is not None else None for w in (w_routed, w_shared, w_mix))


def router_gates(
    logits_routed: Optional[torch.Tensor],
    logits_shared: Optional[torch.Tensor],
    logits_mix: Optional[torch.Tensor],
    top_k: int,
    normalize: str = "code",
    gates_dtype: Optional[torch.dtype] = None,
) -> RouterOutput:
    """The learned router after its matmuls: logits ``[B, T, h_r]``, ``[B, T, h_s]``, ``[B, T, 2]`` (None
    when that kind is absent) -> gates ``[B, T, H]`` (shared first), computed in the logits' precision (at
    least fp32: fp64 logits give the fp64 reference the kernels are tested against).

    - ``"code"`` (official code, default): routed gate = ``k p_i / sum_topk p``, shared gate =
      ``h_s softmax(W_s x)_i``, ``[a1, a2] = 2 softmax(W_h x)``: every active gate is exactly 1 at init.
    - ``"paper"``: routed gate = ``a2 p_i``, shared gate = ``a1 softmax(W_s x)_i``, ``[a1, a2] = softmax(W_h x)``.
    Top-k ties go to the lower head index (:func:`topk_mask`).
    """
    if normalize not in NORMALIZE:
        raise InputError(f"normalize: expected one of {NORMALIZE}, got {normalize!r}")
    code = normalize == "code"
    present = [t for t in (logits_routed, logits_shared, logits_mix) if t is not None]
    cd = torch.float32
    for t in present:
        cd = torch.promote_types(cd, t.dtype)
    parts = []
    a = None
    if logits_mix is not None:
        a = torch.softmax(logits_mix.to(cd), dim=-1) * (2.0 if code else 1.0)
    if logits_shared is not None:
        hs = logits_shared.shape[-1]
        g_s = _scaled_softmax(logits_shared.to(cd), hs if code else 1.0)
        parts.append(g_s * a[..., :1] if a is not None else g_s)
    ref = logits_routed if logits_routed is not None else logits_shared
    probs = None
    selected = torch.zeros(*ref.shape[:2], 0, dtype=torch.bool, device=ref.device)
    if logits_routed is not None:
        logits = logits_routed.to(cd)
        probs = torch.softmax(logits, dim=-1)
        selected = topk_mask(probs.detach(), top_k)
        # code: k p_i / sum_topk p_j, computed from the logits so that equal logits give exactly 1
        g_r = _scaled_softmax(logits, float(top_k), selected) if code else probs * selected
        parts.append(g_r * a[..., 1:] if a is not None else g_r)
    return RouterOutput(torch.cat(parts, dim=-1).to(gates_dtype or ref.dtype), probs, selected)


def learned_router(
    x: torch.Tensor,
    w_routed: Optional[torch.Tensor],
    w_shared: Optional[torch.Tensor],
    w_mix: Optional[torch.Tensor],
    top_k: int,
    normalize: str = "code",
) -> RouterOutput:
    """Learned router on the block input ``x [B, T, d]``: :func:`router_logits` then :func:`router_gates`.
    ``w_routed [h_r, d]``, ``w_shared [h_s, d]``, ``w_mix [2, d]`` (only when both kinds exist), no biases."""
    return router_gates(*router_logits(x, w_routed, w_shared, w_mix), top_k, normalize, gates_dtype=x.dtype)


def qnorm_router(q: torch.Tensor, num_shared: int, top_k: int) -> RouterOutput:
    """Parameter-free router for converted LLMs (MoH-LLaMA3): score of routed head ``i`` = L2 norm of its
    query vector; top ``k``; binary gates. Straight-through estimator: forward value ``g_hard`` (0/1),
    gradient through ``g_soft = top_k * softmax(scores)`` over the routed heads (``top_k * softmax`` so
    that a uniform router's soft gate equals 1, the hard gate's value). Shared gates are 1.

    ``q [B, T, H, D]`` (before RoPE; RoPE does not change the norm).
    """
    B, T, H, _ = q.shape
    scores = q[:, :, num_shared:].float().norm(dim=-1)  # [B, T, h_r]
    selected = topk_mask(scores.detach(), top_k)
    g_soft = top_k * torch.softmax(scores, dim=-1)
    g_hard = selected.float()
    g_r = g_hard + (g_soft - g_soft.detach())  # forward value exactly g_hard (0/1); gradient of g_soft
    g_s = torch.ones(B, T, num_shared, device=q.device)
    return RouterOutput(torch.cat([g_s, g_r], dim=-1).to(q.dtype), torch.softmax(scores, dim=-1), selected)


def load_balance_loss(
    probs: torch.Tensor, selected: torch.Tensor, form: str = "code", token_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``P_i`` = mean router probability of routed head ``i``, ``f_i`` = fraction of tokens that selected it;
    paper ``sum_i P_i f_i``, official code ``h_r sum_i P_i f_i``. ``token_mask [B, T]`` (True = real token)
    excludes padding from both means."""
    h_r = probs.shape[-1]
    p = probs.reshape(-1, h_r).float()
    f = selected.reshape(-1, h_r).float()
    if token_mask is not None:
        keep = token_mask.reshape(-1)
        p, f = p[keep], f[keep]
    n = max(p.shape[0], 1)
    loss = (p.sum(0) / n * (f.sum(0) / n)).sum()
    return loss * h_r if form == "code" else loss
