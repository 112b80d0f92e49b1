"""``moh_router``: the MoH learned router on precomputed logits (SPEC §3), with ``backend="auto"``. The
packing of the active rows is ``packing_api.moh_pack_rows``.

The router's matmuls stay in torch (cuBLAS): :func:`router_logits` computes them exactly as
:func:`attnzoo.ops.moh.router.learned_router` does; :func:`moh_router` does the rest (softmaxes, top-k,
renormalisation, mix) -- the "triton" backend in one kernel per direction
(:mod:`attnzoo.ops.moh.triton_router`, imported only when it runs).

Backends: ``"reference"`` (PyTorch, any device, priority 0), registered here, and ``"triton"`` (priority 10),
registered by :mod:`attnzoo.ops.moh.triton_backend`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnzoo import backends
from attnzoo.errors import InputError
from attnzoo.ops import validate as V
from attnzoo.ops.moh.router import NORMALIZE, RouterOutput, router_gates, router_logits  # noqa: F401



# the reference is the library's router math itself
moh_router_reference = router_gates


@backends.register("moh_router", "reference", priority=0)
def _router_reference_backend(**kw):
    return moh_router_reference(**kw)


def _check_logits(name: str, t: Optional[torch.Tensor], BT: Optional[Tuple[int, int]]):
    if t is None:
        return BT
    V.check_tensor(name, t, ranks=(3,))
    if BT is not None and tuple(t.shape[:2]) != BT:
        raise InputError(f"{name}: expected leading dims [B, T] = {BT}, got {V.shape_str(t)}")
    return tuple(t.shape[:2])


def moh_router(
    logits_routed: Optional[torch.Tensor],
    logits_shared: Optional[torch.Tensor] = None,
    logits_mix: Optional[torch.Tensor] = None,
    top_k: int = 1,
    normalize: str = "code",
    *,
    gates_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> RouterOutput:
    """MoH learned router (SPEC §3) from its logits: gates, router probabilities and the top-k selection.

    Inputs (any strides; float16/bfloat16/float32, float64 on the reference backend):

    - ``logits_routed [B, T, h_r]`` = ``x W_r^T`` or None (no routed heads);
    - ``logits_shared [B, T, h_s]`` = ``x W_s^T`` or None (no shared heads); at least one of the two;
    - ``logits_mix [B, T, 2]`` = ``x W_h^T`` or None (no mix; the module has one iff both kinds exist);
    - ``top_k`` in ``[1, h_r]``; ``normalize`` ``"code"`` (default) or ``"paper"``.

    Returns :class:`attnzoo.ops.moh.router.RouterOutput`: ``gates [B, T, h_s + h_r]`` (shared then routed,
    0 for unselected routed heads; dtype ``gates_dtype``, default the logits'), ``probs [B, T, h_r]``
    (routed softmax, fp32 or wider; None without routed heads) and ``selected [B, T, h_r]`` (bool), the
    inputs of :func:`attnzoo.ops.moh.router.load_balance_loss`. ``gates`` and ``probs`` are
    differentiable w.r.t. the logits. Top-k ties go to the lower head index; equal logits give gates of
    exactly 1 (``"code"``). :func:`router_logits` computes the logits.
    """
    if normalize not in NORMALIZE:
        raise InputError(f"normalize: expected one of {NORMALIZE}, got {normalize!r}")
    if logits_routed is None and logits_shared is None:
        raise InputError("logits_routed, logits_shared: at least one must be given (a router needs heads)")
    BT = _check_logits("logits_routed", logits_routed, None)
    BT = _check_logits("logits_shared", logits_shared, BT)
    _check_logits("logits_mix", logits_mix, BT)
    if logits_mix is not None and logits_mix.shape[-1] != 2:
        raise InputError(f"logits_mix: expected [B, T, 2] (a1, a2), got {V.shape_str(logits_mix)}")
    for name, t in (("logits_routed", logits_routed), ("logits_shared", logits_shared)):
        if t is not None and t.shape[-1] == 0:
            raise InputError(f"{name}: has 0 heads; pass None instead")
    present = [(n, t) for n, t in (("logits_routed", logits_routed), ("logits_shared", logits_shared),
                                   ("logits_mix", logits_mix)) if t is not None]
    V.check_same([n for n, _ in present], [t for _, t in present], dtype=False)
    if logits_routed is not None:
        hr = logits_routed.shape[-1]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= hr:
            raise InputError(f"top_k: expected an int in [1, routed heads={hr}], got {top_k!r}")
    if gates_dtype is not None and not (isinstance(gates_dtype, torch.dtype) and gates_dtype.is_floating_point):
        raise InputError(f"gates_dtype: expected a floating-point torch.dtype, got {gates_dtype!r}")
    return backends.dispatch(
        "moh_router", backend, logits_routed=logits_routed, logits_shared=logits_shared, logits_mix=logits_mix,
        top_k=top_k, normalize=normalize, gates_dtype=gates_dtype,
    )
