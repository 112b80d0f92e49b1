"""timm integration: ``convert(model, variant, **options)`` swaps the ViT ``Attention`` modules of a timm model
for attnzoo modules, copying the weights.

    import timm, attnzoo.integrations.timm as azt
    vit = timm.create_model("vit_small_patch16_224")
    azt.convert(vit, "moh", num_shared_heads=2, top_k=3)      # in place; returns vit

What is carried over exactly: the fused ``qkv`` projection (split into ``q_proj``/``k_proj``/``v_proj``, with
its bias), the output projection ``proj`` (weight and bias: ``out_bias=True``), QK-norm of either kind
(timm's ``LayerNorm`` -> ``qk_norm="layer"``, ``RmsNorm``/``nn.RMSNorm`` -> ``qk_norm="rms"``, with their
weights, biases and eps), the softmax scale (``head_dim ** -0.5``) and the output dropout. Attention is
bidirectional (``causal=False``). Variants (``options`` are the target module's constructor words):

- ``"mha"``: :class:`~attnzoo.MultiHeadAttention` -- the same function as the original;
- ``"moh"``: :class:`~attnzoo.MoHAttention` (``num_shared_heads``, ``top_k``, ``router``, ``normalize``);
  with every head active (``top_k`` = the routed heads) the same function as the original;
- ``"kha"``: :class:`~attnzoo.KnockingHeadsAttention` (``knocking="linear"|"mlp"``, ``knock_qk``):
  identity at init, so the same function until trained;
- ``"dma"``: :class:`~attnzoo.DynamicMaskAttention` (``keep_window``, ``bias_form``): with ``keep_window``
  at least the number of tokens it equals the original at init (its bias starts constant).

Not convertible (an InputError names the module): a gated or output-normalised (``scale_norm``) timm
Attention, attention dropout during training, and other attention classes (``AttentionRope``, ...).
The converted modules take timm's call ``attn(x, attn_mask=None, is_causal=False)``; a mask is refused.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attnzoo.errors import InputError
from attnzoo.modules.dma import DynamicMaskAttention
from attnzoo.modules.mha import KnockingHeadsAttention, MultiHeadAttention
from attnzoo.modules.moh import MoHAttention

try:
    from timm.layers import Attention as TimmAttention
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("attnzoo.integrations.timm needs timm: pip install 'attnzoo[timm]'") from e


class _TimmCall:
    """timm's attention call on an attnzoo module: ``forward(x, attn_mask=None, is_causal=False)``, then the
    original module's output dropout."""

    proj_drop: nn.Module

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False, **kwargs):
        if attn_mask is not None:
            raise InputError("attn_mask: a converted timm attention takes no attention mask (use key_padding_mask=)")
        if bool(is_causal) != self.causal:
            raise InputError(f"is_causal: this module was converted with causal={self.causal}, got is_causal={is_causal}")
        return self.proj_drop(super().forward(x, **kwargs))


class TimmMultiHeadAttention(_TimmCall, MultiHeadAttention):
    """:class:`~attnzoo.MultiHeadAttention` with timm's call signature."""


class TimmMoHAttention(_TimmCall, MoHAttention):
    """:class:`~attnzoo.MoHAttention` with timm's call signature."""


class TimmKnockingHeadsAttention(_TimmCall, KnockingHeadsAttention):
    """:class:`~attnzoo.KnockingHeadsAttention` with timm's call signature."""


class TimmDynamicMaskAttention(_TimmCall, DynamicMaskAttention):
    """:class:`~attnzoo.DynamicMaskAttention` with timm's call signature."""


VARIANTS = {
    "mha": TimmMultiHeadAttention,
    "moh": TimmMoHAttention,
    "kha": TimmKnockingHeadsAttention,
    "dma": TimmDynamicMaskAttention,
}


def _qk_norm_kind(norm: nn.Module, where: str):
    """``(qk_norm word, eps)`` of a timm q/k norm module."""
    if isinstance(norm, nn.Identity):
        return False, None
    name = type(norm).__name__
    if isinstance(norm, nn.LayerNorm):
        return "layer", norm.eps
    if isinstance(norm, nn.RMSNorm) or name == "RmsNorm":
        return "rms", norm.eps
    raise InputError(f"{where}: qk-norm {name} is not supported; attnzoo has RMSNorm ('rms') and LayerNorm ('layer')")


def _copy_norm(src: nn.Module, dst: nn.Module, eps: float) -> None:
    """Copy a norm's affine parameters (absent ones are the identity: attnzoo's start at 1 and 0)."""
    for pname in ("weight", "bias"):
        p = getattr(src, pname, None)
        if p is not None:
            getattr(dst, pname).copy_(p)
    dst.eps = eps


def _check_source(attn: nn.Module, where: str) -> None:
    if getattr(attn, "gate", None) is not None:
        raise InputError(f"{where}: a gated timm Attention (gated=True) has no attnzoo equivalent")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        raise InputError(f"{where}: timm's scale_norm (a norm on the attention output) has no attnzoo equivalent")
    if attn.attn_drop.p:
        raise InputError(f"{where}: attention dropout (attn_drop={attn.attn_drop.p}) is not supported by attnzoo")
    if abs(attn.scale - attn.head_dim ** -0.5) > 1e-12:
        raise InputError(f"{where}: a softmax scale {attn.scale} other than head_dim ** -0.5 is not supported")


@torch.no_grad()
def convert_attention(attn: nn.Module, variant: str = "mha", where: str = "attention", **options) -> nn.Module:
    """One timm ``Attention`` -> the attnzoo module of ``variant`` with its weights (see the module doc)."""
    if variant not in VARIANTS:
        raise InputError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
    if not isinstance(attn, TimmAttention):
        raise InputError(f"{where}: expected a timm.layers.Attention, got {type(attn).__name__}")
    _check_source(attn, where)
    qk_norm, eps = _qk_norm_kind(attn.q_norm, where)
    w = attn.qkv.weight
    H, D, dim = attn.num_heads, attn.head_dim, attn.qkv.in_features
    words = dict(
        num_heads=H, head_dim=D, causal=False, qkv_bias=attn.qkv.bias is not None, qk_norm=qk_norm,
        out_bias=attn.proj.bias is not None,
    )
    reserved = set(words) & set(options)
    if reserved:
        raise InputError(f"{', '.join(sorted(reserved))}: set by the timm module being converted; not an option")
    if attn.proj.out_features != dim:
        raise InputError(f"{where}: dim_out={attn.proj.out_features} != dim={dim} is not supported")
    new = VARIANTS[variant](dim, **words, **options, device=w.device, dtype=w.dtype)
    if new.num_kv_heads != H:
        raise InputError(f"num_kv_heads: timm's ViT attention has {H} kv heads; convert it as is first")
    for i, name in enumerate(("q", "k", "v")):
        proj = getattr(new, f"{name}_proj")
        proj.weight.copy_(w[i * H * D : (i + 1) * H * D])
        if attn.qkv.bias is not None:
            proj.bias.copy_(attn.qkv.bias[i * H * D : (i + 1) * H * D])
    new.o_proj.weight.copy_(attn.proj.weight)
    if attn.proj.bias is not None:
        new.o_proj.bias.copy_(attn.proj.bias)
    if qk_norm:
        _copy_norm(attn.q_norm, new.q_norm, eps)
        _copy_norm(attn.k_norm, new.k_norm, eps)
    new.proj_drop = nn.Dropout(attn.proj_drop.p)
    new.train(attn.training)
    return new


def convert(model: nn.Module, variant: str = "mha", **options) -> nn.Module:
    """Replace, in place, every timm ViT ``Attention`` inside ``model`` by the attnzoo module of ``variant``
    (``"mha"``, ``"moh"``, ``"kha"``, ``"dma"``) built with ``options``, weights copied; returns ``model``."""
    if variant not in VARIANTS:
        raise InputError(f"variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, TimmAttention)]
    if not targets:
        others = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        raise InputError(
            f"model: {type(model).__name__} has no timm.layers.Attention to convert"
            + (f" (found {', '.join(others)}, which attnzoo does not convert)" if others else "")
        )
    for name, attn in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, convert_attention(attn, variant, where=name, **options))
    return model


__all__ = ["convert", "convert_attention", "VARIANTS", "TimmMultiHeadAttention", "TimmMoHAttention",
           "TimmKnockingHeadsAttention", "TimmDynamicMaskAttention"]
