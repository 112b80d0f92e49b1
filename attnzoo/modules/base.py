"""The common base of the softmax attention modules (``MultiHeadAttention`` lives in ``mha.py``).

Pipeline of every softmax module (DESIGN.md, SPEC §2-§5)::

    x [B, T, dim] -> q_proj/k_proj/v_proj -> heads [B, T, H|Hkv, D]
      -> knocking (optional, SPEC §4) -> QK-norm (optional) -> RoPE (optional)
      -> cache (append; keys/values as attended) -> variant's core (``_attend``) -> o_proj -> [B, T, dim]

Subclasses override ``_attend`` (MoH adds gates, DMA a per-key bias). Projections are named like
Llama-style checkpoints: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.errors import InputError
from attnzoo.modules.cache import KVCache
from attnzoo.modules.knocking import KnockingHeads
from attnzoo.modules.rope import RotaryEmbedding
from attnzoo.ops.attention.api import attention, attention_with_kvcache
from attnzoo.ops.knocking.reference import fold_linear_into_proj
from attnzoo.ops import validate as V
from attnzoo.ops.validate import MAX_HEAD_DIM, shape_str

def resolve_heads(dim: int, num_heads: int, num_kv_heads: Optional[int], head_dim: Optional[int]) -> Tuple[int, int]:
    """Validate the head layout; returns ``(num_kv_heads, head_dim)``."""
    if not (isinstance(dim, int) and dim > 0):
        raise InputError(f"dim: expected a positive int, got {dim!r}")
    if not (isinstance(num_heads, int) and num_heads > 0):
        raise InputError(f"num_heads: expected a positive int, got {num_heads!r}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if not (isinstance(num_kv_heads, int) and num_kv_heads > 0) or num_heads % num_kv_heads:
        raise InputError(f"num_kv_heads: {num_kv_heads!r} must be a positive divisor of num_heads={num_heads}")
    if head_dim is None:
        if dim % num_heads:
            raise InputError(f"head_dim: dim={dim} is not divisible by num_heads={num_heads}; pass head_dim")
        head_dim = dim // num_heads
    if not (isinstance(head_dim, int) and 1 <= head_dim <= MAX_HEAD_DIM):
        raise InputError(f"head_dim: {head_dim!r} is not supported; attnzoo supports head dims 1..{MAX_HEAD_DIM}")
    return num_kv_heads, head_dim


QK_NORMS = ("rms", "layer")


def make_qk_norm(qk_norm, head_dim: int, **fk) -> Optional[nn.Module]:
    """``qk_norm``: False/None (none), True or ``"rms"`` (RMSNorm), ``"layer"`` (LayerNorm with bias, timm's
    ViT default); over each head's ``head_dim`` channels, eps 1e-6, shared by all heads."""
    if qk_norm is None or qk_norm is False:
        return None
    if qk_norm is True or qk_norm == "rms":
        return nn.RMSNorm(head_dim, eps=1e-6, **fk)
    if qk_norm == "layer":
        return nn.LayerNorm(head_dim, eps=1e-6, **fk)
    raise InputError(f"qk_norm: expected False, True (= 'rms'), 'rms' or 'layer', got {qk_norm!r}")


def make_rope(rope, head_dim: int) -> Optional[RotaryEmbedding]:
    """``rope``: None/False (none), True (base 10000), a number (the base) or a RotaryEmbedding."""
    if rope is None or rope is False:
        return None
    if rope is True:
        return RotaryEmbedding(head_dim)
    if isinstance(rope, (int, float)):
        return RotaryEmbedding(head_dim, base=float(rope))
    if isinstance(rope, RotaryEmbedding):
        if rope.head_dim != head_dim:
            raise InputError(f"rope: built for head_dim {rope.head_dim}, module has {head_dim}")
        return rope
    raise InputError(f"rope: expected None, True, a base (float) or a RotaryEmbedding, got {type(rope).__name__}")


def check_words(*, causal, qkv_bias, backend, scale=None, window=(-1, -1)) -> None:
    """The common constructor words every module validates at construction (one validator per word, in
    :mod:`attnzoo.ops.validate`); the head layout is :func:`resolve_heads`'s."""
    V.check_flag("causal", causal)
    V.check_flag("qkv_bias", qkv_bias)
    V.check_backend(backend)
    V.check_scale(scale)
    V.check_window(window)


def check_call(module, x, key_padding_mask, position_ids, cache, cache_type=None):
    """The common call's inputs: ``x [B, T, dim]`` in the module's dtype and on its device; ``cache`` a
    ``cache_type`` (default :class:`KVCache`) that this module's configuration made."""
    V.check_module_input("x", x, dim=module.dim, param=module.q_proj.weight)
    B, T, _ = x.shape
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, T):
            raise InputError(
                f"key_padding_mask: expected a bool tensor ({B}, {T}) with True = real token, "
                f"got {key_padding_mask.dtype} {shape_str(key_padding_mask)}"
            )
        if key_padding_mask.device != x.device:
            raise InputError(f"key_padding_mask: is on {key_padding_mask.device} but x is on {x.device}")
    if position_ids is not None and tuple(position_ids.shape) not in ((B, T), (T,)):
        raise InputError(f"position_ids: expected ({B}, {T}) or ({T},), got {shape_str(position_ids)}")
    if cache is not None:
        cache_type = cache_type or KVCache
        if not isinstance(cache, cache_type):
            raise InputError(
                f"cache: expected the {cache_type.__name__} this module's new_cache() makes, got {type(cache).__name__}"
            )
        if cache.batch_size != B:
            raise InputError(f"cache: made for batch size {cache.batch_size}, x has batch {B}")
        if cache.made_by != cache_key(module):
            raise InputError(
                f"cache: made by {cache.made_by[0]}({dict(cache.made_by[1])}), which is not this module's "
                f"configuration {type(module).__name__}({dict(cache_key(module)[1])}); use this module's new_cache()"
            )


def cache_key(module) -> tuple:
    """What a cache records of the module that made it: its class and configuration (backend aside, which
    does not change what is stored)."""
    words = tuple(sorted((k, repr(v)) for k, v in module.config.items() if k != "backend"))
    return type(module).__name__, words


def positions_for(x: torch.Tensor, position_ids, cache) -> torch.Tensor:
    """``[B, T]`` positions: ``position_ids`` if given, else continuing from the cache's length."""
    B, T, _ = x.shape
    if position_ids is None:
        start = cache.seq_len if cache is not None else 0
        return torch.arange(start, start + T, device=x.device).expand(B, T)
    return position_ids.to(x.device).expand(B, T)


class SoftmaxAttentionBase(nn.Module):
    """Projections, knocking, QK-norm, RoPE, KV cache and the output projection shared by the softmax
    variants. ``kv_weights="wgqa"`` keeps one key and one value projection per *query* head and learns one
    scalar per head and kind (init ``Hkv/H``, i.e. mean pooling); kv head ``j`` is the weighted sum of its
    group (SPEC §2). ``fold()`` turns WGQA and KHA-Linear into plain weights. ``qk_norm``: False, True or
    ``"rms"`` (RMSNorm), ``"layer"`` (LayerNorm); ``out_bias=True`` puts a bias on ``o_proj`` (as timm's ViT)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        causal: bool = True,
        qkv_bias: bool = False,
        qk_norm=False,
        rope=None,
        knocking: Optional[str] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
        *,
        out_bias: bool = False,
        kv_weights: Optional[str] = None,
        knock_qk: bool = True,
        scale: Optional[float] = None,
        window: Tuple[int, int] = (-1, -1),
    ):
        super().__init__()
        num_kv_heads, head_dim = resolve_heads(dim, num_heads, num_kv_heads, head_dim)
        check_words(causal=causal, qkv_bias=qkv_bias, backend=backend, scale=scale, window=window)
        V.check_flag("knock_qk", knock_qk)
        V.check_flag("out_bias", out_bias)
        if kv_weights not in (None, "wgqa"):
            raise InputError(f"kv_weights: expected None or 'wgqa', got {kv_weights!r}")
        fk = dict(device=device, dtype=dtype)
        # constructor words, so converters can rebuild a module of another kind with the same layout
        self.config = dict(
            dim=dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, causal=causal,
            qkv_bias=qkv_bias, qk_norm=qk_norm, rope=rope, knocking=knocking, backend=backend,
            out_bias=out_bias, kv_weights=kv_weights, knock_qk=knock_qk, scale=scale, window=tuple(window),
        )
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, num_kv_heads, head_dim
        self.causal, self.backend, self.scale, self.window = causal, backend, scale, tuple(window)
        self.kv_weights = kv_weights
        kv_out_heads = num_heads if kv_weights == "wgqa" else num_kv_heads
        self.q_proj = nn.Linear(dim, num_heads * head_dim, bias=qkv_bias, **fk)
        self.k_proj = nn.Linear(dim, kv_out_heads * head_dim, bias=qkv_bias, **fk)
        self.v_proj = nn.Linear(dim, kv_out_heads * head_dim, bias=qkv_bias, **fk)
        self.o_proj = nn.Linear(num_heads * head_dim, dim, bias=bool(out_bias), **fk)
        if kv_weights == "wgqa":
            init = torch.full((num_heads,), num_kv_heads / num_heads, **fk)
            self.k_mix = nn.Parameter(init.clone())
            self.v_mix = nn.Parameter(init.clone())
        self.q_norm = make_qk_norm(qk_norm, head_dim, **fk)
        self.k_norm = make_qk_norm(qk_norm, head_dim, **fk)
        self.rope = make_rope(rope, head_dim)
        self.knocking = KnockingHeads(head_dim, knocking, knock_qk, **fk) if knocking is not None else None

    # -- projections ------------------------------------------------------------------------------
    def _kv_weight(self, proj: nn.Linear, mix: Optional[torch.Tensor]):
        """Effective (weight, bias) of a K or V projection onto the ``Hkv`` kv heads."""
        if mix is None:
            return proj.weight, proj.bias
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        m = mix.view(Hkv, H // Hkv, 1)
        w = (proj.weight.view(Hkv, H // Hkv, D, -1) * m[..., None]).sum(1).reshape(Hkv * D, -1)
        b = None if proj.bias is None else (proj.bias.view(Hkv, H // Hkv, D) * m).sum(1).reshape(-1)
        return w, b

    def projection_weights(self, name: str, knock: bool):
        """Effective ``(weight, bias, heads)`` of projection ``name`` in ``"q"|"k"|"v"``: WGQA mixing applied
        and, with ``knock``, the KHA-Linear matrix for ``name`` folded in (``W'_i = T^T W_i``)."""
        proj = getattr(self, f"{name}_proj")
        if name == "q":
            w, b, heads = proj.weight, proj.bias, self.num_heads
        else:
            w, b = self._kv_weight(proj, getattr(self, f"{name}_mix", None))
            heads = self.num_kv_heads
        t = self.knocking.linear_matrices().get(name) if knock and self.knocking is not None else None
        if t is not None:
            w, b = fold_linear_into_proj(w, b, t, heads)
        return w, b, heads

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """``x [B, T, dim]`` -> ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]`` after knocking, QK-norm, RoPE,
        and ``q_raw``, the queries before QK-norm and RoPE (what MoH's qnorm router scores).

        KHA-Linear is applied to the projection weights when that is cheaper -- more tokens in the call
        than the model dim (``D x D x dim`` per head instead of ``D x D`` per token and head) -- and to
        the activations otherwise; both are the same linear map.
        """
        B, T, _ = x.shape
        knock_weights = self.knocking is not None and B * T > self.dim
        q, k, v = (
            F.linear(x, w, b).view(B, T, heads, self.head_dim)
            for w, b, heads in (self.projection_weights(n, knock_weights) for n in ("q", "k", "v"))
        )
        if self.knocking is not None:
            q, k, v = self.knocking(q, k, v, linear=not knock_weights, backend=self.backend)
        q_raw = q
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v, q_raw

    # -- the call -----------------------------------------------------------------------------------
    def new_cache(self, batch_size: int) -> KVCache:
        """A cache for generation: pass it as ``cache=`` to successive calls (under ``torch.no_grad()``)."""
        return KVCache(V.check_int("batch_size", batch_size), made_by=cache_key(self))

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """``x [B, T, dim]`` -> ``[B, T, dim]``.

        ``key_padding_mask [B, T]`` bool, True = real token. With ``cache`` the new tokens attend to
        every cached token too (positions continue from the cache unless ``position_ids`` is given).
        """
        check_call(self, x, key_padding_mask, position_ids, cache)
        B, T, _ = x.shape
        q, k, v, q_raw = self.project(x, positions_for(x, position_ids, cache))
        extras = self._key_extras(x, k, v)
        query_mask = key_padding_mask
        if cache is None:
            o = self._attend(x, q, k, v, key_padding_mask, extras, query_mask, q_raw)
        else:
            mark = cache.checkpoint()
            try:
                k, v, key_padding_mask, extras = cache.update(k, v, key_padding_mask, **extras)
                o = self._attend(x, q, k, v, key_padding_mask, extras, query_mask, q_raw)
            except BaseException:
                cache.restore(mark)  # a failed call leaves the cache as it was
                raise
        return self.o_proj(o.reshape(B, T, self.num_heads * o.shape[-1]))

    def _key_extras(self, x, k, v) -> dict:
        """Per-key tensors ``[B, T, ...]`` a variant keeps in the cache beside K and V (none here)."""
        return {}

    def _attend(self, x, q, k, v, key_padding_mask, extras, query_mask, q_raw) -> torch.Tensor:
        """The variant's core: ``q [B, T, H, D]`` against every key ``k, v [B, Tk, Hkv, D]`` (cached ones
        too); ``key_padding_mask [B, Tk]`` covers all keys, ``query_mask [B, T]`` the new tokens,
        ``q_raw`` the queries before QK-norm and RoPE."""
        if self._decoding(q, k, key_padding_mask):
            lens = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)
            return attention_with_kvcache(
                q, k, v, lens, causal=True, scale=self.scale, window=self.window, backend=self.backend
            )
        return attention(
            q, k, v, causal=self.causal, scale=self.scale, window=self.window,
            key_padding_mask=key_padding_mask, backend=self.backend,
        )

    def _decoding(self, q, k, key_padding_mask) -> bool:
        """Generation steps take the decode op (split-K flash-decoding, one read of each KV tile per GQA
        group): a few new causal queries after cached keys, no padding, no gradient (the decode kernel is
        inference-only)."""
        return (
            self.causal
            and key_padding_mask is None
            and k.shape[1] > q.shape[1]
            and q.shape[1] <= V.MAX_DECODE_QUERIES
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
        )

    # -- folding ------------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> "SoftmaxAttentionBase":
        """An equivalent module with WGQA mixing and KHA-Linear matrices folded into the projection
        weights (no extra parameters, no overhead). KHA-MLP is not foldable and is kept as it is."""
        new = copy.deepcopy(self)
        folded = {n: new.projection_weights(n, knock=True)[:2] for n in ("q", "k", "v")}
        for name, (w, b) in folded.items():
            plain = nn.Linear(self.dim, w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            plain.weight.copy_(w)
            if b is not None:
                plain.bias.copy_(b)
            setattr(new, f"{name}_proj", plain)
        if new.kv_weights == "wgqa":
            del new.k_mix, new.v_mix
            new.kv_weights = new.config["kv_weights"] = None
        kn = new.knocking
        if kn is not None and kn.form == "linear":
            new.knocking = new.config["knocking"] = None
        elif kn is not None:
            kn.t_q = kn.t_k = None
            kn.knock_qk = new.config["knock_qk"] = False
        return new

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}, backend={self.backend!r}"
            + (f", kv_weights={self.kv_weights!r}" if self.kv_weights else "")
        )
