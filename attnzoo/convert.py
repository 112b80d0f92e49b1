"""Checkpoint surgery: MHA -> GQA/MQA (mean pooling, SPEC §2), MHA -> WGQA, WGQA and KHA folding,
MHA -> MoH (SPEC §3), and swapping modules inside a model.

Every converter returns a new module (the input is left untouched) on the same device and dtype.
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, Optional

import torch
from torch import nn

from attnzoo.errors import InputError
from attnzoo.modules.base import SoftmaxAttentionBase
from attnzoo.modules.mha import MultiHeadAttention
from attnzoo.modules.dma import DynamicMaskAttention
from attnzoo.modules.moh import MoHAttention


def _check_source(module, what: str) -> None:
    if not isinstance(module, SoftmaxAttentionBase):
        raise InputError(f"module: expected an attnzoo softmax attention module for {what}, got {type(module).__name__}")
    if isinstance(module, DynamicMaskAttention) and what != "fold":
        # dt_proj reads the concatenated value heads and A has one entry per kv head: pooling the value
        # heads changes what both mean, so there is no output-preserving conversion to offer
        raise InputError(f"module: {what} does not convert DynamicMaskAttention (its dt_proj and A depend on the kv heads)")


def _rebuild(module: SoftmaxAttentionBase, cls, **overrides) -> SoftmaxAttentionBase:
    """A ``cls`` with ``module``'s constructor words (``overrides`` win; words ``cls`` does not take are
    dropped), on its device and dtype, holding copies of every parameter the two share by name and shape."""
    cfg = {**module.config, **overrides}
    # subclasses pass their extra keywords on to SoftmaxAttentionBase, so either signature may take a word
    accepted = set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(SoftmaxAttentionBase.__init__).parameters)
    cfg = {k: v for k, v in cfg.items() if k in accepted}
    if isinstance(cfg.get("rope"), nn.Module):
        cfg["rope"] = copy.deepcopy(cfg["rope"])
    p = next(module.parameters())
    new = cls(**cfg, device=p.device, dtype=p.dtype)
    mine = new.state_dict()
    shared = {k: v for k, v in module.state_dict().items() if k in mine and mine[k].shape == v.shape}
    new.load_state_dict(shared, strict=False)
    return new


def _check_mha(module: SoftmaxAttentionBase, num_kv_heads: int, what: str) -> None:
    _check_source(module, what)
    H = module.num_heads
    if module.num_kv_heads != H or module.kv_weights is not None:
        raise InputError(f"module: {what} needs an MHA module (num_kv_heads == num_heads), got {module.num_kv_heads} kv heads of {H}")
    if not (isinstance(num_kv_heads, int) and num_kv_heads >= 1 and H % num_kv_heads == 0):
        raise InputError(f"num_kv_heads: {num_kv_heads!r} must be a positive divisor of num_heads={H}")


@torch.no_grad()
def mha_to_wgqa(module: SoftmaxAttentionBase, num_kv_heads: int) -> SoftmaxAttentionBase:
    """MHA -> WGQA (arXiv 2407.10855): keep every head's K/V projection and learn one scalar per head and
    kind, initialised to ``Hkv/H`` (exactly mean pooling). ``fold()`` afterwards gives plain GQA."""
    _check_mha(module, num_kv_heads, "mha_to_wgqa")
    return _rebuild(module, type(module), num_kv_heads=num_kv_heads, kv_weights="wgqa")


@torch.no_grad()
def mha_to_gqa(module: SoftmaxAttentionBase, num_kv_heads: int) -> SoftmaxAttentionBase:
    """MHA -> GQA (MQA with ``num_kv_heads=1``): mean-pool the key and value projections (weights and
    biases) of each contiguous group of ``H / num_kv_heads`` heads (arXiv 2305.13245). Uptrain after.
    Knocking (if any) is kept as it is: only the projections change."""
    _check_mha(module, num_kv_heads, "mha_to_gqa")
    new = _rebuild(module, type(module), num_kv_heads=num_kv_heads)
    # the mean is WGQA's mixing at its initialisation: let the module compute it
    wgqa = _rebuild(module, type(module), num_kv_heads=num_kv_heads, kv_weights="wgqa")
    for name in ("k", "v"):
        w, b = wgqa._kv_weight(getattr(wgqa, f"{name}_proj"), getattr(wgqa, f"{name}_mix"))
        dst = getattr(new, f"{name}_proj")
        dst.weight.copy_(w)
        if b is not None:
            dst.bias.copy_(b)
    return new


def fold(module: SoftmaxAttentionBase) -> SoftmaxAttentionBase:
    """Fold WGQA weights and KHA-Linear matrices into the projections (see ``SoftmaxAttentionBase.fold``)."""
    _check_source(module, "fold")
    return module.fold()


@torch.no_grad()
def mha_to_moh(
    module: SoftmaxAttentionBase,
    num_shared_heads: int,
    top_k: int,
    router: str = "learned",
    normalize: str = "code",
) -> MoHAttention:
    """MHA -> MoH: the first ``num_shared_heads`` heads become shared, the rest routed (``top_k`` per token).
    The learned router starts at zero, so every active gate is exactly 1 and the output equals MHA on the
    active heads (with all heads active, MHA exactly); the ``"qnorm"`` router needs no new parameters."""
    _check_source(module, "mha_to_moh")
    return _rebuild(module, MoHAttention, num_shared_heads=num_shared_heads, top_k=top_k, router=router, normalize=normalize)


def swap_modules(model: nn.Module, convert: Callable[[nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Replace, in place, every submodule for which ``convert(sub)`` returns a module (None = keep).
    Returns ``model``. E.g. ``swap_modules(model, lambda m: mha_to_gqa(m, 8) if isinstance(m,
    MultiHeadAttention) else None)``."""
    for name, child in list(model.named_children()):
        new = convert(child)
        if new is not None:
            setattr(model, name, new)
        else:
            swap_modules(child, convert)
    return model


__all__ = ["mha_to_gqa", "mha_to_wgqa", "fold", "mha_to_moh", "swap_modules", "MultiHeadAttention"]
