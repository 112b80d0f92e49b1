"""PyTorch reference of lightning (linear) attention (SPEC §6): a parallel and a recurrent form.

Readable, slow, differentiable (every input, ``decay`` included, gets gradients through autograd).
Every lightning kernel is tested against these. Per head, with decay ``lambda = exp(-s)`` (``s >= 0``):

- recurrent (SPEC §6): ``S_t = lambda S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``, ``S_{-1} = S0``;
- parallel (SPEC §6): ``O = scale * ((Q K^T) * M) V + scale * lambda^(i+1) q_i S0`` with
  ``M_ij = lambda^(i-j)`` for ``i >= j`` else 0 (the second term is the initial state's contribution, the
  recurrence unrolled: ``S_i = lambda^(i+1) S0 + sum_{j<=i} lambda^(i-j) k_j^T v_j``), and the final state
  ``S_{T-1} = lambda^T S0 + sum_j lambda^(T-1-j) k_j^T v_j``.

Layout BTHD: ``q, k [B, T, H, D]``, ``v [B, T, H, Dv]``; ``decay`` a ``[H]`` tensor of rates ``s`` or None;
states ``[B, H, D, Dv]`` kept in fp32 (fp64 for fp64 inputs). Varlen (flash-linear-attention's convention):
``B == 1``, ``q [1, N, H, D]`` packs the sequences and int32 ``cu_seqlens [n+1]`` marks their boundaries;
states are then per sequence, ``[n, H, D, Dv]``, and the state restarts from ``initial_state[i]`` (zero when
None) at the start of each sequence. Both functions return ``(o, final_state)``; ``o`` has ``q``'s dtype.

``upcast=True`` (the default) computes in fp32 (fp64 for fp64 inputs). ``upcast=False`` computes the
token-mixing products in the inputs' own dtype (state arithmetic stays fp32): the low-precision baseline of
SPEC §0's accuracy rule ("2x the error of the reference evaluated in the kernel's own precision").
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnzoo.ops.attention.reference import compute_dtype


# the dtype of the recurrent state for inputs of a dtype: fp64 stays fp64, anything else fp32
state_dtype = compute_dtype


def _rates(decay: Optional[torch.Tensor], H: int, device, dtype) -> torch.Tensor:
    if decay is None:
        return torch.zeros(H, device=device, dtype=dtype)
    return decay.to(device=device, dtype=dtype)


def _split_varlen(fn, q, k, v, decay, scale, initial_state, cu_seqlens, upcast):
    """Run ``fn`` on each packed sequence of ``cu_seqlens`` (B == 1) with its own initial state."""
    assert q.shape[0] == 1, "varlen inputs are packed as [1, N, H, D]"
    cu = cu_seqlens.tolist()
    outs, states = [], []
    for i in range(len(cu) - 1):
        a, b = cu[i], cu[i + 1]
        s0 = None if initial_state is None else initial_state[i : i + 1]
        o_i, s_i = fn(q[:, a:b], k[:, a:b], v[:, a:b], decay, scale, s0, upcast=upcast)
        outs.append(o_i)
        states.append(s_i)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


def lightning_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    upcast: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SPEC §6 parallel form ``O = scale * ((Q K^T) * M) V`` plus the initial state's term.

    Materialises the ``[B, H, T, T]`` decay mask. Returns ``(o [B, T, H, Dv], final_state [B, H, D, Dv])``.
    """
    if cu_seqlens is not None:
        return _split_varlen(lightning_parallel, q, k, v, decay, scale, initial_state, cu_seqlens, upcast)
    B, T, H, D = q.shape
    sd = state_dtype(q.dtype)
    ct = sd if upcast else q.dtype  # dtype of the token-mixing products
    s = _rates(decay, H, q.device, sd)  # [H]
    idx = torch.arange(T, device=q.device, dtype=sd)
    diff = idx[:, None] - idx[None, :]  # i - j
    # M_ij = lambda^(i-j) for i >= j, else 0  (where(), never exp(+x) * 0, so large s cannot overflow)
    causal = diff >= 0
    M = torch.where(causal, torch.exp(-s[:, None, None] * diff.clamp(min=0)), torch.zeros((), dtype=sd, device=q.device))
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    scores = torch.einsum("bihd,bjhd->bhij", qc, kc) * M.to(ct)
    o = torch.einsum("bhij,bjhe->bihe", scores, vc) * scale
    # final state: lambda^T S0 + sum_j lambda^(T-1-j) k_j^T v_j
    w_end = torch.exp(-s[None, :] * (T - 1 - idx)[:, None])  # [T, H]
    kw = k.to(sd) * w_end[None, :, :, None]
    final = torch.einsum("bjhd,bjhe->bhde", kw, v.to(sd))
    if initial_state is not None:
        s0 = initial_state.to(sd)
        w_in = torch.exp(-s[None, :] * (idx + 1)[:, None])  # lambda^(i+1), [T, H]
        o0 = torch.einsum("bihd,bhde->bihe", q.to(sd) * w_in[None, :, :, None], s0) * scale
        o = o.to(sd) + o0
        final = final + torch.exp(-s * T)[None, :, None, None] * s0
    return o.to(q.dtype), final


def lightning_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    upcast: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SPEC §6 recurrent form, one token at a time: ``S_t = lambda S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``.

    The state is fp32 (fp64 for fp64 inputs); ``upcast`` is accepted for symmetry with
    :func:`lightning_parallel` (the recurrence always runs in the state dtype). Returns ``(o, final_state)``.
    """
    if cu_seqlens is not None:
        return _split_varlen(lightning_recurrent, q, k, v, decay, scale, initial_state, cu_seqlens, upcast)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    sd = state_dtype(q.dtype)
    lam = torch.exp(-_rates(decay, H, q.device, sd))[None, :, None, None]  # [1, H, 1, 1]
    S = torch.zeros(B, H, D, Dv, device=q.device, dtype=sd) if initial_state is None else initial_state.to(sd)
    qs, ks, vs = q.to(sd), k.to(sd), v.to(sd)
    outs = []
    for t in range(T):
        S = lam * S + ks[:, t, :, :, None] * vs[:, t, :, None, :]  # k_t^T v_t, [B, H, D, Dv]
        outs.append(scale * torch.einsum("bhd,bhde->bhe", qs[:, t], S))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, Dv, dtype=sd)
    return o.to(q.dtype), S
