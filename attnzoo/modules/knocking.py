"""The knocking-heads transform as a module (SPEC §4): shared ``head_dim x head_dim`` matrices applied to
every head of Q, K, V after the projections, before QK-norm and RoPE. Math in
:mod:`attnzoo.ops.knocking.reference`."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.errors import InputError
from attnzoo.ops.knocking import reference as R
from attnzoo.ops.knocking.api import kha_mlp

KNOCKING_FORMS = ("linear", "mlp")


class KnockingHeads(nn.Module):
    """``form="linear"``: ``T^V`` (always) and, with ``knock_qk``, ``T^Q``/``T^K``, all identity at init.
    ``form="mlp"``: the gated MLP on V (``W_up = W_down = I``, ``W_gate = 0`` at init, so ``V~ = V``),
    plus linear ``T^Q``/``T^K`` with ``knock_qk``. With GQA the K/V matrices act on the kv heads (the
    matrices are shared by all heads, so only the tensors they act on differ)."""

    def __init__(self, head_dim: int, form: str = "linear", knock_qk: bool = True, device=None, dtype=None):
        super().__init__()
        if form not in KNOCKING_FORMS:
            raise InputError(f"knocking: expected one of {KNOCKING_FORMS} or None, got {form!r}")
        self.form, self.knock_qk, self.head_dim = form, knock_qk, head_dim

        def eye():
            return nn.Parameter(torch.eye(head_dim, device=device, dtype=dtype))

        self.t_q = eye() if knock_qk else None
        self.t_k = eye() if knock_qk else None
        if form == "linear":
            self.t_v = eye()
        else:
            self.w_up = eye()
            self.w_gate = nn.Parameter(torch.zeros(head_dim, head_dim, device=device, dtype=dtype))
            self.w_down = eye()

    def linear_matrices(self) -> dict:
        """The linear (foldable) matrices by tensor name: ``{"q": T^Q, "k": T^K, "v": T^V}`` where present."""
        mats = {"q": self.t_q, "k": self.t_k, "v": self.t_v if self.form == "linear" else None}
        return {name: t for name, t in mats.items() if t is not None}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, linear: bool = True, backend: str = "auto"):
        """``q [B, T, H, D]``, ``k [B, T, Hkv, D]``, ``v [B, T, Hkv, D]`` -> the knocked tensors.
        ``linear=False`` skips the linear matrices (the caller folded them into the projection weights);
        ``backend`` picks the KHA-MLP op's backend (a fused Triton kernel on CUDA)."""
        if linear:
            mats = self.linear_matrices()
            q = R.kha_linear(q, mats["q"]) if "q" in mats else q
            k = R.kha_linear(k, mats["k"]) if "k" in mats else k
            v = R.kha_linear(v, mats["v"]) if "v" in mats else v
        if self.form == "mlp":
            v = kha_mlp(v, self.w_up, self.w_gate, self.w_down, backend=backend)
        return q, k, v

    def extra_repr(self) -> str:
        return f"form={self.form!r}, knock_qk={self.knock_qk}, head_dim={self.head_dim}"
