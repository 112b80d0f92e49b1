"""``LightningAttention``: a TransNormer / MiniMax-style lightning (linear) attention layer (SPEC §6).

Pipeline::

    x [B, T, dim] -> q_proj, k_proj, v_proj -> SiLU(q), SiLU(k) (and SiLU(v) with silu_v=True)
      -> heads [B, T, H|Hkv, D] (kv heads repeated to H) -> lightning_attention (per-head decay)
      -> RMSNorm over the concatenated heads (``norm``) * sigmoid(g_proj(x)) -> o_proj -> [B, T, dim]

Generation keeps one ``[B, H, D, D]`` fp32 state per layer in a :class:`LightningCache`: O(1) memory in the
context length. Linear attention here is always causal.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.errors import InputError
from attnzoo.modules.base import cache_key, check_call, check_words, resolve_heads
from attnzoo.ops.lightning.api import lightning_attention, lightning_decode
from attnzoo.ops.lightning.decay import decay_rates
from attnzoo.ops import validate as V
from attnzoo.ops.lightning.reference import state_dtype

class LightningCache:
    """Generation state of one :class:`LightningAttention` layer: the recurrent state ``[B, H, D, Dv]``
    (fp32; fp64 for an fp64 module) and the number of tokens seen, ``seq_len``. Its size does not grow
    with the context. Made by ``module.new_cache(batch_size)``; pass it as ``cache=`` to successive calls."""

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, value_dim: int, *, device=None,
                 dtype: torch.dtype = torch.float32, made_by: tuple = ("", ())):
        self.batch_size = batch_size
        self.made_by = made_by  # the configuration of the module that made it (see modules.base.cache_key)
        self.seq_len = 0
        self.state = torch.zeros(batch_size, num_heads, head_dim, value_dim, device=device, dtype=dtype)

    def reset(self) -> None:
        self.state = torch.zeros_like(self.state)
        self.seq_len = 0


def _decay_rates_arg(decay, num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """The module's ``decay`` word as fp32 rates on the host: a preset name (``decay_rates``), or rates checked
    by the one decay validator (:func:`attnzoo.ops.validate.check_decay`)."""
    if not isinstance(decay, torch.Tensor) and decay in ("alibi", "paper", "none", None):
        return decay_rates(num_heads, decay, layer_idx, num_layers)
    if isinstance(decay, str):
        raise InputError(f"decay: expected 'alibi', 'paper', None, a rate >= 0 or a [H] tensor of rates, got {decay!r}")
    rates = V.check_decay(decay, num_heads)
    if isinstance(rates, torch.Tensor):
        return rates.detach().to(torch.float32).cpu()
    return torch.full((num_heads,), float(rates))


class LightningAttention(nn.Module):
    """Lightning (linear) attention layer with per-head exponential decay (SPEC §6).

    Args (the common constructor words, DESIGN.md):
        dim, num_heads, num_kv_heads (kv heads are repeated to ``num_heads``, contiguous groups), head_dim
            (default ``dim // num_heads``; also the value head dim).
        causal: must be True (this linear attention is causal by construction).
        qkv_bias: biases on q/k/v projections. qk_norm, rope, knocking: not supported by LightningAttention
            (only the defaults are accepted; an InputError says so).
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
        decay: ``"alibi"`` (default), ``"paper"``, None (no decay), a rate ``>= 0`` for every head, or a
            ``[num_heads]`` tensor of rates; presets use ``layer_idx`` of ``num_layers``
            (:func:`attnzoo.ops.lightning.decay.decay_rates`). Kept as an fp32 buffer ``decay`` whatever the
            module's dtype.
        silu_v: SiLU on v too (MiniMax-01). scale: multiplies the attention output (default 1.0).
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
        decay: Union[str, float, torch.Tensor, None] = "alibi",
        layer_idx: int = 0,
        num_layers: int = 1,
        silu_v: bool = False,
        scale: float = 1.0,
    ):
        super().__init__()
        num_kv_heads, head_dim = resolve_heads(dim, num_heads, num_kv_heads, head_dim)
        if causal is not True:
            raise InputError(f"causal: LightningAttention is causal by construction; got causal={causal!r}")
        unsupported = (("qk_norm", qk_norm, bool(qk_norm), "False"), ("rope", rope, rope is not None and rope is not False,
                       "None"), ("knocking", knocking, knocking is not None, "None"))
        for name, val, bad, default in unsupported:
            if bad:
                raise InputError(f"{name}: {val!r} is not supported by LightningAttention (only {default})")
        check_words(causal=causal, qkv_bias=qkv_bias, backend=backend)
        V.check_scale(scale, optional=False)
        V.check_flag("silu_v", silu_v)
        fk = dict(device=device, dtype=dtype)
        self.config = dict(
            dim=dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=True,
            qkv_bias=qkv_bias, backend=backend, decay=decay if not isinstance(decay, torch.Tensor) else "tensor",
            layer_idx=layer_idx, num_layers=num_layers, silu_v=silu_v, scale=scale,
        )
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.causal, self.backend, self.scale, self.silu_v = True, backend, float(scale), silu_v
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias, **fk)
        self.k_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias, **fk)
        self.v_proj = nn.Linear(dim, num_kv_heads * head_dim, bias=qkv_bias, **fk)
        self.g_proj = nn.Linear(dim, num_heads * head_dim, bias=False, **fk)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=False, **fk)
        self.norm = nn.RMSNorm(num_heads * head_dim, eps=1e-6, **fk)
        self._decay_cpu = _decay_rates_arg(decay, num_heads, layer_idx, num_layers).to(torch.float32)
        self.register_buffer("decay", self._decay_cpu.to(device=device), persistent=False)

    def _apply(self, fn, recurse=True):
        # the decay buffer follows the module's device, never its dtype (fp16/bf16 would round the rates)
        out = super()._apply(fn, recurse)
        self.decay = self._decay_cpu.to(device=self.decay.device)
        return out

    def new_cache(self, batch_size: int) -> LightningCache:
        """A generation cache holding this layer's state (zeros) for ``batch_size`` sequences."""
        w = self.q_proj.weight
        return LightningCache(V.check_int("batch_size", batch_size), self.num_heads, self.head_dim, self.head_dim,
                              device=w.device, dtype=state_dtype(w.dtype), made_by=cache_key(self))

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[LightningCache] = None,
    ) -> torch.Tensor:
        """``x [B, T, dim]`` -> ``[B, T, dim]``.

        ``key_padding_mask [B, T]`` bool, True = real token: padded tokens get zero k and v, so they add
        nothing to the state, and their outputs are exactly 0. They still count as time steps for the decay:
        right padding leaves the real tokens' outputs exact but decays the final state by ``lambda^n_pad``;
        left padding into a fresh cache is exact (the state is zero while it is padding) -- pad on the left
        for generation.
        ``position_ids`` is accepted for interface compatibility and has no effect (positions enter only
        through the decay). With ``cache`` the tokens continue from the cache's state, which is updated.
        """
        check_call(self, x, key_padding_mask, position_ids, cache, LightningCache)
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = F.silu(self.q_proj(x)).view(B, T, H, D)
        k = F.silu(self.k_proj(x)).view(B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, Hkv, D)
        if self.silu_v:
            v = F.silu(v)
        if key_padding_mask is not None:
            keep = key_padding_mask[:, :, None, None].to(k.dtype)
            k, v = k * keep, v * keep
        if Hkv != H:  # query head h reads kv head h // (H // Hkv) (SPEC §0)
            k = k.repeat_interleave(H // Hkv, dim=2)
            v = v.repeat_interleave(H // Hkv, dim=2)
        if cache is None:
            o = lightning_attention(q, k, v, decay=self.decay, scale=self.scale, backend=self.backend)
        else:
            needs_grad = torch.is_grad_enabled() and (q.requires_grad or cache.state.requires_grad)
            if T <= V.MAX_DECODE_QUERIES and not needs_grad:  # the fused recurrent decode op
                o = lightning_decode(q, k, v, cache.state, decay=self.decay, scale=self.scale, backend=self.backend)
            else:
                o, cache.state = lightning_attention(
                    q, k, v, decay=self.decay, scale=self.scale, initial_state=cache.state,
                    output_final_state=True, backend=self.backend,
                )
            cache.seq_len += T
        o = o.reshape(B, T, H * D)
        sd = state_dtype(o.dtype)  # normalise in fp32 (fp64 stays fp64)
        o = F.rms_norm(o.to(sd), (H * D,), self.norm.weight.to(sd), self.norm.eps).to(x.dtype)
        out = self.o_proj(o * torch.sigmoid(self.g_proj(x)))
        if key_padding_mask is not None:
            out = out * key_padding_mask[:, :, None].to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, decay={self.config['decay']!r}, backend={self.backend!r}"
        )
