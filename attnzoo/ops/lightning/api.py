"""``lightning_attention`` and ``lightning_decode``: validate (SPEC §0, §6), then dispatch to a backend.

Backends: ``"reference"`` (PyTorch, any device, priority 0) registered here, and ``"triton"`` (chunked
kernels, priority 10) registered by :mod:`attnzoo.ops.lightning.triton_backend`, imported at the bottom
(it imports no Triton code until a kernel runs).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from attnzoo import backends
from attnzoo.errors import InputError
from attnzoo.ops import validate as V
from attnzoo.ops.lightning.reference import lightning_parallel, lightning_recurrent, state_dtype


def _decay_tensor(decay, H: int, q: torch.Tensor) -> Optional[torch.Tensor]:
    """``decay`` checked by :func:`attnzoo.ops.validate.check_decay`, as a ``[H]`` tensor on q's device (a
    number is shared by every head; a tensor given on the host is moved)."""
    decay = V.check_decay(decay, H)
    if decay is None:
        return None
    if not isinstance(decay, torch.Tensor):
        return torch.full((H,), float(decay), device=q.device, dtype=state_dtype(q.dtype))
    if decay.device != q.device:
        if decay.device.type != "cpu":
            raise InputError(f"decay: is on {decay.device} but q is on {q.device}")
        decay = decay.to(q.device)
    return decay


def _check_heads_scale_decay(q, k, v, scale, decay):
    """Shape agreement of ``q, k [B, T, H, D]`` and ``v [B, T, H, Dv]``, head dims, scale and decay (shared by
    the chunked op and the decode step). Returns the checked ``(scale, decay)``."""
    if k.shape != q.shape:
        raise InputError(
            f"k: shape {V.shape_str(k)} must equal q's {V.shape_str(q)} [B, T, H, D] (lightning attention has no "
            f"GQA in the op; repeat kv heads first)"
        )
    if v.shape[:-1] != q.shape[:-1]:
        raise InputError(f"v: shape {V.shape_str(v)} must match q {V.shape_str(q)} in every dim but the last")
    V.check_head_dim("q", q.shape[-1])
    V.check_head_dim("v", v.shape[-1])
    return V.check_scale(scale, optional=False), _decay_tensor(decay, q.shape[2], q)


def validate_lightning(q, k, v, *, decay, scale, initial_state, output_final_state, cu_seqlens):
    """Checks every argument; returns ``(q, k, v, decay, scale, squeeze)`` with varlen rank-3 inputs
    unsqueezed to ``[1, N, H, D]`` (``squeeze`` tells the caller to undo it on the output)."""
    varlen = cu_seqlens is not None
    ranks = (3, 4) if varlen else (4,)
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, t, ranks=ranks)
    if len({q.dim(), k.dim(), v.dim()}) != 1:
        raise InputError(f"k, v: must have q's rank {q.dim()}, got k {V.shape_str(k)} and v {V.shape_str(v)}")
    V.check_same(("q", "k", "v"), (q, k, v))
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    B, T, H, D = q.shape
    scale, decay = _check_heads_scale_decay(q, k, v, scale, decay)
    if not isinstance(output_final_state, bool):
        raise InputError(f"output_final_state: expected a bool, got {output_final_state!r}")
    n = B
    if varlen:
        if B != 1:
            raise InputError(
                f"q: with cu_seqlens the sequences are packed as [1, N, H, D] or [N, H, D]; got batch {B} "
                f"(shape {V.shape_str(q)})"
            )
        n = V.check_cu_seqlens("cu_seqlens", cu_seqlens, T, q.device)
    if initial_state is not None:
        V.check_tensor("initial_state", initial_state, ranks=(4,), dtypes=(torch.float32, torch.float64))
        V.check_same(("q", "initial_state"), (q, initial_state), dtype=False)
        want = (n, H, D, v.shape[-1])
        if tuple(initial_state.shape) != want:
            what = "n_seqs" if varlen else "B"
            raise InputError(
                f"initial_state: expected shape ({what}, H, D, Dv) = {want}, got {V.shape_str(initial_state)}"
            )
    return q, k, v, decay, scale, squeeze


@backends.register("lightning_attention", "reference", priority=0)
def _lightning_reference_backend(*, q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
    return lightning_parallel(q, k, v, decay, scale, initial_state, cu_seqlens)


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: Union[torch.Tensor, float, None] = None,
    scale: float = 1.0,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """Causal lightning (linear) attention with per-head decay (SPEC §6), layout BTHD.

    ``o_t = scale * q_t S_t`` with ``S_t = lambda S_{t-1} + k_t^T v_t``, ``lambda_h = exp(-decay_h)``;
    equivalently ``O = scale * ((Q K^T) * M) V``, ``M_ij = lambda^(i-j)`` for ``i >= j``. No softmax.

    Args:
        q, k: ``[B, T, H, D]``. v: ``[B, T, H, Dv]`` (``Dv`` may differ from ``D``). Head dims 1..256.
        decay: per-head rates ``s_h >= 0`` as a ``[H]`` tensor (see :func:`attnzoo.ops.lightning.decay.decay_rates`
            for the ``"alibi"`` / ``"paper"`` presets), a number shared by all heads, or None (no decay).
        scale: multiplies the output; default 1.0 (the paper's form).
        initial_state: ``[B, H, D, Dv]`` (varlen: ``[n_seqs, H, D, Dv]``), fp32 (or fp64 with fp64 inputs).
        output_final_state: also return the final state, same shape, fp32 (fp64 for fp64 inputs).
        cu_seqlens: int32 ``[n_seqs + 1]`` boundaries of sequences packed as ``[1, N, H, D]`` (B == 1, as in
            flash-linear-attention) or ``[N, H, D]`` (SPEC §0); the state restarts at every boundary from
            ``initial_state[i]`` (zero when None). The output has the input's rank.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` (chunked, O(T), any device) or ``"triton"``.

    Returns ``o`` shaped like ``q`` with last dim ``Dv``, or ``(o, final_state)``.
    """
    q, k, v, decay, scale, squeeze = validate_lightning(
        q, k, v, decay=decay, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    o, final_state = backends.dispatch(
        "lightning_attention", backend, q=q, k=k, v=v, decay=decay, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens,
    )
    if squeeze:
        o = o.squeeze(0)
    return (o, final_state) if output_final_state else o


@backends.register("lightning_decode", "reference", priority=0)
def _lightning_decode_reference_backend(*, q, k, v, state, decay, scale):
    o, new_state = lightning_recurrent(q, k, v, decay, scale, state)
    with torch.no_grad():
        state.copy_(new_state)
    return o


def lightning_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: torch.Tensor,
    *,
    decay: Union[torch.Tensor, float, None] = None,
    scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Generation step: ``Tn`` new tokens (meant for 1..16) continue from ``state``, which is updated **in
    place** to the state after them. Inference only (no gradients; use :func:`lightning_attention` with
    ``initial_state``/``output_final_state`` to train through a state).

    Args:
        q, k: ``[B, Tn, H, D]``; v: ``[B, Tn, H, Dv]``.
        state: ``[B, H, D, Dv]``, fp32 (fp64 for fp64 inputs) -- exactly the dtype lightning_attention's
            final state has.
        decay, scale: as in :func:`lightning_attention`.
    Returns ``o [B, Tn, H, Dv]``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.check_tensor(name, t, ranks=(4,))
    V.check_same(("q", "k", "v"), (q, k, v))
    B, Tn, H, D = q.shape
    scale, decay = _check_heads_scale_decay(q, k, v, scale, decay)
    sd = state_dtype(q.dtype)
    V.check_tensor("state", state, ranks=(4,), dtypes=(sd,))
    V.check_same(("q", "state"), (q, state), dtype=False)
    if tuple(state.shape) != (B, H, D, v.shape[-1]):
        raise InputError(f"state: expected shape (B, H, D, Dv) = {(B, H, D, v.shape[-1])}, got {V.shape_str(state)}")
    return backends.dispatch("lightning_decode", backend, q=q, k=k, v=v, state=state, decay=decay, scale=scale)
