"""``MoHAttention``: Mixture-of-Head attention (SPEC §3, arXiv 2410.11842)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attnzoo.errors import InputError
from attnzoo.modules.base import SoftmaxAttentionBase
from attnzoo.ops.moh.api import moh_attention
from attnzoo.ops.moh.router import NORMALIZE, load_balance_loss, qnorm_router, router_logits
from attnzoo.ops.moh.router_api import moh_router

ROUTERS = ("learned", "qnorm")


class MoHAttention(SoftmaxAttentionBase):
    """Multi-head attention whose heads are ``[shared | routed]``: every token uses the ``num_shared_heads``
    shared heads and its ``top_k`` best routed heads; each head's output row is scaled by its gate before
    the unchanged ``o_proj``. Only active ``(token, head)`` pairs need attention.

    Extra args: ``num_shared_heads`` (default ``num_heads // 4``), ``top_k`` (default half the routed
    heads, at least 1), ``router`` ``"learned"`` (``router_routed [h_r, dim]``, ``router_shared
    [h_s, dim]``, ``router_mix [2, dim]``, zero-initialised: with ``normalize="code"`` every active gate
    starts at exactly 1; with ``"paper"`` at ``a * softmax``, e.g. ``1/2 * 1/h_s`` for shared heads)
    or ``"qnorm"`` (parameter-free, binary gates, straight-through), ``normalize`` ``"code"`` (default) or
    ``"paper"``, ``aux_loss_form`` ``"code"`` (default, ``h_r sum P f``) or ``"paper"``.

    After each forward, ``self.aux_loss`` holds this layer's load-balance loss (a scalar tensor; add
    ``0.01 * mean over layers`` to the task loss) and ``self.last_gates`` the gates ``[B, T, H]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        causal: bool = True,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        rope=None,
        knocking: Optional[str] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
        *,
        num_shared_heads: Optional[int] = None,
        top_k: Optional[int] = None,
        router: str = "learned",
        normalize: str = "code",
        aux_loss_form: str = "code",
        **kwargs,
    ):
        super().__init__(
            dim, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal, qkv_bias=qkv_bias,
            qk_norm=qk_norm, rope=rope, knocking=knocking, backend=backend, device=device, dtype=dtype, **kwargs,
        )
        hs = num_heads // 4 if num_shared_heads is None else num_shared_heads
        if isinstance(hs, bool) or not (isinstance(hs, int) and 0 <= hs <= num_heads):
            raise InputError(f"num_shared_heads: expected an int in [0, num_heads={num_heads}], got {hs!r}")
        hr = num_heads - hs
        if hr == 0:  # every head shared: nothing to route
            if top_k not in (None, 0) or isinstance(top_k, bool):
                raise InputError(
                    f"top_k: num_shared_heads={hs} = num_heads leaves no routed heads, so top_k must be None or 0; "
                    f"got {top_k!r}"
                )
            k = 0
        else:
            k = max(1, hr // 2) if top_k is None else top_k
            if isinstance(k, bool) or not (isinstance(k, int) and 1 <= k <= hr):
                raise InputError(f"top_k: expected an int in [1, routed heads={hr}], got {k!r}")
        if router not in ROUTERS:
            raise InputError(f"router: expected one of {ROUTERS}, got {router!r}")
        if normalize not in NORMALIZE:
            raise InputError(f"normalize: expected one of {NORMALIZE}, got {normalize!r}")
        if aux_loss_form not in NORMALIZE:
            raise InputError(f"aux_loss_form: expected one of {NORMALIZE}, got {aux_loss_form!r}")
        self.num_shared_heads, self.num_routed_heads, self.top_k = hs, hr, k
        self.router, self.normalize, self.aux_loss_form = router, normalize, aux_loss_form
        self.config.update(num_shared_heads=hs, top_k=k, router=router, normalize=normalize, aux_loss_form=aux_loss_form)
        fk = dict(device=device, dtype=dtype)
        if router == "learned":
            self.router_routed = nn.Parameter(torch.zeros(hr, dim, **fk)) if hr else None
            self.router_shared = nn.Parameter(torch.zeros(hs, dim, **fk)) if hs else None
            self.router_mix = nn.Parameter(torch.zeros(2, dim, **fk)) if hs and hr else None
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_gates: Optional[torch.Tensor] = None

    def route(self, x: torch.Tensor, q: torch.Tensor, key_padding_mask=None):
        """Gates ``[B, T, H]`` for the block input ``x`` (learned) or the queries ``q`` before QK-norm and
        RoPE (qnorm)."""
        if self.router == "learned":
            logits = router_logits(x, self.router_routed, self.router_shared, self.router_mix)
            backend = "auto" if self.backend == "cuda" else self.backend  # no CUDA C++ router: auto picks
            out = moh_router(*logits, self.top_k, self.normalize, gates_dtype=x.dtype, backend=backend)
        else:
            out = qnorm_router(q, self.num_shared_heads, self.top_k)
        self.aux_loss = (
            load_balance_loss(out.probs, out.selected, self.aux_loss_form, key_padding_mask)
            if out.probs is not None
            else x.new_zeros(())
        )
        return out.gates

    def _attend(self, x, q, k, v, key_padding_mask, extras, query_mask, q_raw):
        # the qnorm router scores the queries before QK-norm (which would equalise their norms) and RoPE
        gates = self.route(x, q_raw, query_mask)
        self.last_gates = gates.detach()
        return moh_attention(
            q, k, v, gates, causal=self.causal, scale=self.scale, window=self.window,
            key_padding_mask=key_padding_mask, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", num_shared_heads={self.num_shared_heads}, top_k={self.top_k}, router={self.router!r}, "
            f"normalize={self.normalize!r}"
        )
