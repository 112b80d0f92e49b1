"""``kha_mlp``: the KHA-MLP value transform (SPEC §4) as a functional op -- validate, then dispatch."""

from __future__ import annotations

import torch

from attnzoo import backends
from attnzoo.errors import InputError
from attnzoo.ops import validate as V
from attnzoo.ops.knocking import reference as R


def validate_kha_mlp(v, w_up, w_gate, w_down) -> None:
    """``v [..., D]`` (rank >= 1, D in 1..256), each weight ``[D, D]``, one device, floating dtypes.
    Weights may have a dtype other than v's (e.g. fp32 parameters, bf16 activations)."""
    if not isinstance(v, torch.Tensor):
        raise InputError(f"v: expected a torch.Tensor, got {type(v).__name__}")
    if v.dim() < 1:
        raise InputError("v: expected a tensor [..., head_dim] of rank >= 1, got a 0-d tensor")
    V.check_tensor("v", v, ranks=(v.dim(),))
    D = v.shape[-1]
    V.check_head_dim("v", D)
    for name, w in (("w_up", w_up), ("w_gate", w_gate), ("w_down", w_down)):
        V.check_tensor(name, w, ranks=(2,))
        if tuple(w.shape) != (D, D):
            raise InputError(
                f"{name}: expected shape (head_dim, head_dim) = ({D}, {D}) to match v's last dim, got {V.shape_str(w)}"
            )
    V.check_same(("v", "w_up", "w_gate", "w_down"), (v, w_up, w_gate, w_down), dtype=False)


@backends.register("kha_mlp", "reference", priority=0)
def _kha_mlp_reference_backend(v, w_up, w_gate, w_down):
    return R.kha_mlp(v, w_up, w_gate, w_down)


def kha_mlp(
    v: torch.Tensor, w_up: torch.Tensor, w_gate: torch.Tensor, w_down: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """KHA-MLP on values: ``2 * ((v @ w_up) * sigmoid(v @ w_gate)) @ w_down``, the same ``head_dim x
    head_dim`` weights for every head (SPEC §4).

    Args:
        v: ``[..., D]`` (typically ``[B, T, Hkv, D]``), any strides; D up to 256.
        w_up, w_gate, w_down: ``[D, D]``, acting on row vectors (``x @ W``). At init ``W_up = W_down = I``,
            ``W_gate = 0`` gives ``v`` back.
        backend: ``"auto"``, ``"reference"`` (fp32 math, any device), ``"torch"`` (v's dtype, any device)
            or ``"triton"`` (fused kernel; the
            weights are cast to v's dtype, fp32 accumulation).

    Returns ``V~`` with v's shape and dtype, differentiable in v and all three weights.
    """
    validate_kha_mlp(v, w_up, w_gate, w_down)
    return backends.dispatch("kha_mlp", backend, v=v, w_up=w_up, w_gate=w_gate, w_down=w_down)
