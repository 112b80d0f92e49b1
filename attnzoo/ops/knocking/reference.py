"""Knocking-heads attention, reference math (SPEC §4, arXiv 2510.23052).

Every head's vectors are multiplied by matrices shared by all heads (``head_dim x head_dim``, acting on
each head separately -- not a heads-by-heads mix), after the Q/K/V projections and before QK-norm/RoPE.

- KHA-Linear: ``X~_i = X_i T`` for ``X`` in Q, K, V (``T^Q``, ``T^K`` optional). Foldable:
  ``W'_i = W_i T`` per head, see :func:`fold_linear_into_proj`.
- KHA-MLP (on V only): ``V~ = 2 * ((V W_up) * sigmoid(V W_gate)) W_down``; at init ``W_up = W_down = I``,
  ``W_gate = 0`` so ``V~ = V``. Not foldable.

Matrices act on row vectors: ``x @ T`` with ``T [D_in, D_out]``.
"""

from __future__ import annotations

from typing import Optional

import torch

from attnzoo.ops.attention.reference import compute_dtype


def kha_linear(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x [..., H, D] @ t [D, D]`` -- the same matrix for every head."""
    return torch.matmul(x, t.to(x.dtype))


def kha_mlp(v: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """``2 * ((v @ w_up) * sigmoid(v @ w_gate)) @ w_down`` on ``v [..., D]``, computed in fp32."""
    ct = compute_dtype(v.dtype)
    vf = v.to(ct)
    h = (vf @ w_up.to(ct)) * torch.sigmoid(vf @ w_gate.to(ct))
    return (2.0 * (h @ w_down.to(ct))).to(v.dtype)


def fold_linear_into_proj(
    weight: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor, num_heads: int
):
    """Fold ``T`` into a projection whose output is ``num_heads`` heads of ``D``.

    ``y = x W^T + b`` with ``W [H*D, dim]``; per head ``y_i T = x (W_i^T T) + b_i T``, so
    ``W'_i = T^T W_i`` and ``b'_i = b_i T``. Returns ``(W', b')``.
    """
    D = t.shape[0]
    w = weight.view(num_heads, D, -1)  # [H, D, dim]
    w_new = torch.einsum("ed,hek->hdk", t.to(w.dtype), w).reshape_as(weight)
    b_new = None if bias is None else (bias.view(num_heads, D) @ t.to(bias.dtype)).reshape_as(bias)
    return w_new, b_new
