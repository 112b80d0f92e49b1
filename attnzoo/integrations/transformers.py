"""Hugging Face transformers integration: ``register()`` and ``convert(model, variant, **options)``.

``register()`` adds ``"attnzoo"`` to transformers' ``AttentionInterface`` **and** ``AttentionMaskInterface``.
Both are needed: transformers builds a mask only for names its mask interface knows, so registering the
attention function alone makes every model call it with ``attention_mask=None`` -- a left-padded batch is
then silently wrong. After ``register()``::

    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnzoo")
    model.set_attn_implementation("attnzoo")   # or switch an existing model

and every softmax attention of the model runs through :func:`attnzoo.attention` (prefill, training,
padding, sliding windows, GQA, StaticCache steps) or :func:`attnzoo.attention_with_kvcache` (decode
steps that come without a mask: a ``DynamicCache`` and no padding). How the masks transformers hands over
are read (transformers >= 5):

- a boolean 4-D mask ``[B, 1|H, Tq, Tk]`` (True = attend; built by the same mask function as "sdpa",
  so it already holds causality, padding, the sliding window, packed sequences and -- with a
  ``StaticCache`` -- the empty cache slots) goes to ``attention(mask=...)`` with ``causal=False``;
- a float 4-D mask (a user's additive mask) goes in as ``bias``;
- no mask means "plain causal" in transformers' convention, which is **top-left** aligned (SDPA's
  ``is_causal``). It differs from attnzoo's bottom-right causal only when ``Tq > 1`` and ``Tk > Tq``,
  which happens for a prefill into an empty ``StaticCache``: the keys are the whole cache capacity and
  only the first ``Tq`` slots are filled. The keys are then cropped to those ``Tq`` valid slots. With
  ``Tq == 1`` (decode) top-left and bottom-right agree; decode steps without gradient go to
  ``attention_with_kvcache``.

``convert(model, variant, **options)`` swaps the attention modules of a Llama-family model (Llama,
Mistral, Qwen2, Qwen3) for attnzoo's variants, keeping the model's own RoPE, cache and ``generate``.
"""

from __future__ import annotations

from typing import Optional

import torch

from attnzoo.errors import InputError
from attnzoo.modules.dma import DynamicMaskAttention
from attnzoo.modules.lightning import LightningAttention
from attnzoo.modules.mha import KnockingHeadsAttention, MultiHeadAttention
from attnzoo.modules.moh import MoHAttention
from attnzoo.ops.attention.api import attention, attention_with_kvcache

try:
    import transformers  # noqa: F401
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "attnzoo.integrations.transformers needs Hugging Face transformers >= 5: pip install 'attnzoo[hf]'"
    ) from e

NAME = "attnzoo"


def attnzoo_mask(*args, **kwargs):
    """The mask function registered beside the attention function: transformers' SDPA mask (a boolean
    ``[B, 1, Tq, Tk]`` tensor, True = attend, or None for plain causal attention), which
    :func:`attnzoo_attention_forward` reads as described in the module docstring."""
    return sdpa_mask(*args, **kwargs)


def _attend(module, query, key, value, attention_mask, *, scaling, is_causal, sliding_window, backend):
    """``query [B, H, Tq, D]``, ``key, value [B, Hkv, Tk, D]`` (transformers' layout) -> ``[B, Tq, H, Dv]``."""
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # BTHD views
    Tq, Tk = q.shape[1], k.shape[1]
    if attention_mask is None:
        causal = bool(is_causal) and Tq > 1
        if causal and Tk > Tq:
            # transformers' "no mask" is top-left causal: a prefill into an empty StaticCache, whose
            # first Tq slots hold the prompt and the rest are empty -- keep only the filled slots
            k, v = k[:, :Tq], v[:, :Tq]
            Tk = Tq
        # transformers skips the mask of a sliding layer only where the window cannot matter; pass it on
        # anyway so that it is never dropped: it keeps `sliding_window` keys, the diagonal included
        window = (sliding_window - 1, 0) if (is_causal and sliding_window) else (-1, -1)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if Tq == 1 and Tk > 1 and not grad:
            # a decode step (a causal Tq > 1 with Tk > Tq was cropped above); one query sees every key
            lens = torch.full((q.shape[0],), Tk, dtype=torch.int32, device=q.device)
            return attention_with_kvcache(q, k, v, lens, causal=True, scale=scaling, window=window, backend=backend)
        return attention(q, k, v, causal=causal, scale=scaling, window=window, backend=backend)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        raise InputError(
            f"attention_mask: the attnzoo attention function takes None or a 4-D mask [B, 1|H, Tq, Tk] "
            f"(what attnzoo.integrations.transformers.register() makes transformers build), got "
            f"{type(attention_mask).__name__}{tuple(getattr(attention_mask, 'shape', ()))}; did the model "
            f"build its mask for another attn_implementation?"
        )
    if attention_mask.dtype == torch.bool:
        return attention(q, k, v, mask=attention_mask, scale=scaling, backend=backend)
    return attention(q, k, v, bias=attention_mask, scale=scaling, backend=backend)  # an additive float mask


def make_attention_forward(backend: str = "auto"):
    """An ``AttentionInterface`` function running on attnzoo engine ``backend`` (default: attnzoo's
    automatic choice)."""

    def attnzoo_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        dropout: float = 0.0,
        scaling: Optional[float] = None,
        is_causal: Optional[bool] = None,
        sliding_window: Optional[int] = None,
        softcap: Optional[float] = None,
        **kwargs,
    ):
        if dropout:
            raise InputError(
                f"dropout: attention dropout is not supported by attnzoo (got {dropout}); set the config's "
                f"attention_dropout to 0"
            )
        if softcap is not None:
            raise InputError(f"softcap: logit soft-capping is not supported by attnzoo (got {softcap})")
        if kwargs.get("output_attentions"):
            raise InputError("output_attentions: attnzoo never materialises attention weights; use 'eager'")
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = _attend(
            module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal,
            sliding_window=sliding_window, backend=backend,
        )
        return out, None

    return attnzoo_attention_forward


attnzoo_attention_forward = make_attention_forward()


def register(name: str = NAME, backend: str = "auto") -> str:
    """Register attnzoo under ``name`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface``
    (idempotent); returns ``name``, the value for ``attn_implementation=``."""
    fn = attnzoo_attention_forward if backend == "auto" else make_attention_forward(backend)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, attnzoo_mask)
    return name


# -- convert: Llama-family attention modules -> attnzoo modules ------------------------------------------

#: transformers attention classes ``convert`` swaps (the Llama family: q/k/v/o projections, RoPE from the
#: model's rotary embedding, optional per-head RMS qk-norm, optional sliding window)
SUPPORTED = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


def _keys_and_padding(q, k, v, attention_mask):
    """From transformers' mask (None or boolean ``[B, 1, Tq, Tk]``, the "attnzoo" mask function's) to what
    attnzoo's modules take: keys cropped to the filled cache slots (the queries are then the last ``Tq``
    keys, as bottom-right causal masking assumes) and a ``[B, Tk]`` key-padding mask (True = a key some
    query may see; None when every key is). Causality and the sliding window are the module's own."""
    Tq, Tk = q.shape[1], k.shape[1]
    if attention_mask is None:
        if Tq > 1 and Tk > Tq:  # prefill into an empty StaticCache: only the first Tq slots are filled
            return k[:, :Tq], v[:, :Tq], None
        return k, v, None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        raise InputError(
            f"attention_mask: converted attnzoo layers need the boolean [B, 1, Tq, Tk] mask of "
            f"attn_implementation='attnzoo' (convert() sets it), got {attention_mask.dtype} "
            f"{tuple(attention_mask.shape)}"
        )
    seen = attention_mask[:, 0, :, :Tk].any(1)  # [B, Tk]
    filled = seen.any(0)
    if bool(filled.any()):
        last = int(filled.nonzero().max()) + 1  # keys after it are empty StaticCache slots
        if last < Tk:
            k, v, seen = k[:, :last], v[:, :last], seen[:, :last]
    return k, v, (None if bool(seen.all()) else seen)


def _query_padding(attention_mask, T):
    """``[B, T]`` True for the new tokens that are real (a left-padded token's row sees no key)."""
    if attention_mask is None:
        return None
    real = attention_mask[:, 0].any(-1)
    return None if bool(real.all()) else real


class _HFCall:
    """transformers' attention-module call on an attnzoo softmax module: the model's RoPE (``cos, sin``
    from its rotary embedding), its ``Cache`` (keys and values stored after knocking, QK-norm and RoPE),
    its mask; returns ``(output, None)``."""

    layer_idx: int

    def _hf_init(self, layer_idx: int, apply_rope) -> None:
        self.layer_idx = layer_idx
        self.is_causal = True
        self._apply_rope = apply_rope

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        x = hidden_states
        B, T, _ = x.shape
        q, k, v, q_raw = self.project(x, None)  # no attnzoo RoPE: the model's is applied below
        if position_embeddings is not None:
            cos, sin = position_embeddings
            q, k = self._apply_rope(q, k, cos, sin, unsqueeze_dim=2)  # BTHD: heads at dim 2
        if cache is not None:
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        k, v, key_padding_mask = _keys_and_padding(q, k, v, attention_mask)
        extras = self._key_extras(x, k, v)  # DMA: the per-key bias, from the (cached) values
        query_mask = None if key_padding_mask is None else key_padding_mask[:, -T:]
        o = self._attend(x, q, k, v, key_padding_mask, extras, query_mask, q_raw)
        return self.o_proj(o.reshape(B, T, -1)), None


class HFMultiHeadAttention(_HFCall, MultiHeadAttention):
    """:class:`~attnzoo.MultiHeadAttention` (GQA, WGQA) inside a transformers model."""

class HFKnockingHeadsAttention(_HFCall, KnockingHeadsAttention):
    """:class:`~attnzoo.KnockingHeadsAttention` inside a transformers model."""

class HFMoHAttention(_HFCall, MoHAttention):
    """:class:`~attnzoo.MoHAttention` inside a transformers model."""

class HFDynamicMaskAttention(_HFCall, DynamicMaskAttention):
    """:class:`~attnzoo.DynamicMaskAttention` inside a transformers model."""

class HFLightningAttention(LightningAttention):
    """:class:`~attnzoo.LightningAttention` inside a transformers model. Its recurrent state lives on the
    model's ``Cache`` object (one per layer); the cache layer itself receives one zero channel per token
    (``[B, 1, T, 1]``) so that transformers' sequence-length bookkeeping goes on. Greedy and sampled generation only (a beam
    search reorders caches)."""

    def _hf_init(self, layer_idx: int, apply_rope=None) -> None:
        self.layer_idx = layer_idx
        self.is_causal = True

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        x = hidden_states
        B, T, _ = x.shape
        state = None
        if cache is not None:
            states = cache.__dict__.setdefault("_attnzoo_lightning", {})
            if cache.get_seq_length(self.layer_idx) == 0 or self.layer_idx not in states:
                states[self.layer_idx] = self.new_cache(B)
            state = states[self.layer_idx]
            # one zero channel per token: what transformers counts the sequence length from
            stub = x.new_zeros(B, 1, T, 1)
            cache.update(stub, stub, self.layer_idx)
        return super().forward(x, key_padding_mask=_query_padding(attention_mask, T), cache=state), None



#: the attnzoo module classes ``convert`` puts into a transformers model, by variant
HF_CLASSES = dict(mha=HFMultiHeadAttention, gqa=HFMultiHeadAttention, kha=HFKnockingHeadsAttention,
                  moh=HFMoHAttention, dma=HFDynamicMaskAttention, lightning=HFLightningAttention)


def hf_classes() -> dict:
    return HF_CLASSES


VARIANTS = ("mha", "gqa", "moh", "kha", "dma", "lightning")


def _sliding_window(attn, config):
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(config, "sliding_window", None) if type(attn).__name__ == "MistralAttention" else None


@torch.no_grad()
def _copy_common(src, dst, kv_repeat: int = 1) -> None:
    """q/k/v/o projections (K/V heads repeated ``kv_repeat`` times each) and the QK-norm weights."""
    D = dst.head_dim
    for name in ("q", "k", "v", "o"):
        s, d = getattr(src, f"{name}_proj"), getattr(dst, f"{name}_proj")
        w, b = s.weight, s.bias
        if name in ("k", "v") and kv_repeat > 1:
            w = w.view(-1, D, w.shape[-1]).repeat_interleave(kv_repeat, 0).reshape(-1, w.shape[-1])
            b = None if b is None else b.view(-1, D).repeat_interleave(kv_repeat, 0).reshape(-1)
        d.weight.copy_(w)
        if b is not None:
            d.bias.copy_(b)
    for name in ("q_norm", "k_norm"):
        s, d = getattr(src, name, None), getattr(dst, name, None)
        if s is not None and d is not None:
            d.weight.copy_(s.weight)
            d.eps = getattr(s, "variance_epsilon", getattr(s, "eps", d.eps))


def convert_attention(attn, config, variant: str, **options):
    """One transformers Llama-family attention module -> the attnzoo module of ``variant`` (see
    :func:`convert`)."""
    import sys

    from attnzoo import convert as surgery

    cls_name = type(attn).__name__
    if cls_name not in SUPPORTED:
        raise InputError(f"model: {cls_name} is not a supported attention class; convert takes {', '.join(SUPPORTED)}")
    classes = hf_classes()
    apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    D, dim = attn.head_dim, attn.q_proj.in_features
    has_norm = getattr(attn, "q_norm", None) is not None
    p = attn.q_proj.weight
    fk = dict(device=p.device, dtype=p.dtype)
    if variant == "lightning":
        if attn.o_proj.bias is not None:
            raise InputError(f"variant: 'lightning' has no output-projection bias; {cls_name} has one")
        words = dict(num_kv_heads=Hkv, head_dim=D, qkv_bias=attn.q_proj.bias is not None,
                     layer_idx=attn.layer_idx, num_layers=config.num_hidden_layers)
        new = classes["lightning"](dim, H, **{**words, **options}, **fk)
        with torch.no_grad():
            for name in ("q", "k", "v", "o"):
                s, d = getattr(attn, f"{name}_proj"), getattr(new, f"{name}_proj")
                d.weight.copy_(s.weight)
                if s.bias is not None:
                    d.bias.copy_(s.bias)
        new._hf_init(attn.layer_idx)
        return new.train(attn.training)
    sw = _sliding_window(attn, config)
    words = dict(
        num_heads=H, num_kv_heads=Hkv, head_dim=D, causal=True, qkv_bias=attn.q_proj.bias is not None,
        qk_norm="rms" if has_norm else False, out_bias=attn.o_proj.bias is not None, scale=attn.scaling,
        window=(sw - 1, 0) if sw else (-1, -1),
    )
    reserved = sorted(set(words) & set(options) - {"num_kv_heads"})
    if reserved:
        raise InputError(f"{', '.join(reserved)}: set by the {cls_name} being converted; not an option")
    if variant == "dma":
        words.pop("window")  # DMA's top-keep_window selection replaces the layer's sliding window
    if variant == "moh":
        options.setdefault("router", "qnorm")  # MoH-LLaMA3: parameter-free router for converted LLMs
    if variant == "gqa":
        target = options.pop("num_kv_heads", None)
        wgqa = options.pop("kv_weights", None) == "wgqa"
        if target is None:
            raise InputError("num_kv_heads: 'gqa' needs the number of kv heads to pool into")
        new = classes["gqa"](dim, **{**words, "num_kv_heads": H}, **options, **fk)
        _copy_common(attn, new, kv_repeat=H // Hkv)  # exact MHA form first (kv heads repeated)
        if not (isinstance(target, int) and target >= 1 and Hkv % target == 0):
            raise InputError(f"num_kv_heads: {target!r} must divide the model's {Hkv} kv heads (mean pooling)")
        if target != H:  # mean-pool contiguous groups (SPEC §2), or WGQA starting at the mean
            new = (surgery.mha_to_wgqa if wgqa else surgery.mha_to_gqa)(new, target)
    else:
        if "num_kv_heads" in options:
            raise InputError(f"num_kv_heads: only the 'gqa' variant changes the kv heads, not {variant!r}")
        if variant not in classes:
            raise InputError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        new = classes[variant](dim, **words, **options, **fk)
        _copy_common(attn, new)
    new._hf_init(attn.layer_idx, apply_rope)
    return new.train(attn.training)


def convert(model, variant: str, *, layers=None, **options):
    """Swap, in place, the attention modules of a Llama-family transformers model (Llama, Mistral, Qwen2,
    Qwen3) for attnzoo's ``variant``; returns ``model``, set to ``attn_implementation="attnzoo"``.

    The model keeps its embeddings, MLPs, RoPE (``position_embeddings`` from its rotary embedding), cache
    classes (``DynamicCache``, ``StaticCache``) and ``generate``. Carried weights are copied; new parts start
    where the converted layer is closest to the original. ``options`` are the target module's constructor
    words; ``layers`` (layer indices) limits the swap.

    - ``"mha"``: :class:`~attnzoo.MultiHeadAttention` with the model's kv heads (exact).
    - ``"gqa"``: ``num_kv_heads=`` (a divisor of the model's kv heads; equal to ``num_heads`` it repeats
      them, exact); K/V projections of each contiguous group are mean-pooled (SPEC §2);
      ``kv_weights="wgqa"`` learns the pooling weights (start: the mean; ``fold()`` later).
    - ``"moh"``: :class:`~attnzoo.MoHAttention`; ``router="qnorm"`` by default (MoH-LLaMA3: query-norm
      scores, binary gates, straight-through), or ``"learned"`` (zero-initialised: active gates start at 1);
      ``num_shared_heads``, ``top_k``. With every head active it equals the original.
    - ``"kha"``: :class:`~attnzoo.KnockingHeadsAttention` (``knocking="linear"|"mlp"``), identity at start.
    - ``"dma"``: :class:`~attnzoo.DynamicMaskAttention` (``keep_window``, ``bias_form``): its bias starts at
      0, so it is a sliding window of ``keep_window`` keys (the original when ``keep_window`` >= length).
      Its selection replaces a sliding layer's fixed window.
    - ``"lightning"``: :class:`~attnzoo.LightningAttention` (``decay``, ``silu_v``) on ``layers`` (default:
      all but every 8th layer -- a 7:1 hybrid with softmax layers), q/k/v/o copied, a new output gate. A
      different function (no softmax, no RoPE): it needs training.

    Anything else raises an InputError naming the class. The converted model runs on attnzoo's default
    engine; an attention mask must be the boolean one of ``attn_implementation="attnzoo"`` (set here).
    A padded batch or a StaticCache makes each converted layer read its mask on the host (to crop empty
    cache slots and derive the key-padding mask): a graph break under ``torch.compile``.
    """
    if variant not in VARIANTS:
        raise InputError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    config = model.config
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ in SUPPORTED]
    if not targets:
        found = sorted({type(m).__name__ for m in model.modules()
                        if type(m).__name__.endswith("Attention") and type(m) not in hf_classes().values()})
        raise InputError(
            f"model: {type(model).__name__} has no attention module convert() supports "
            f"({', '.join(SUPPORTED)})" + (f"; found {', '.join(found)}" if found else "")
        )
    if layers is None and variant == "lightning":
        layers = [m.layer_idx for _, m in targets if m.layer_idx % 8 != 7]
    chosen = [(n, m) for n, m in targets if layers is None or m.layer_idx in layers]
    unslide = [m.layer_idx for _, m in chosen if variant == "dma" and _sliding_window(m, config)]
    layer_types = getattr(config, "layer_types", None)
    if unslide and layer_types is None and len(chosen) != len(targets):
        raise InputError(
            f"layers: 'dma' replaces the sliding window, which {type(config).__name__} sets for every layer at "
            f"once: convert all layers (layers=None) or none"
        )
    for name, attn in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, convert_attention(attn, config, variant, **dict(options)))
    # a DMA layer selects its keys among all earlier ones: transformers must keep them all in its cache and
    # build that layer a full causal mask, so the layer stops being a sliding one
    for i in unslide:
        if layer_types is not None:
            layer_types[i] = "full_attention"
    if unslide and layer_types is None:
        config.sliding_window = None
    register()
    model.set_attn_implementation(NAME)
    return model


__all__ = ["register", "convert", "convert_attention", "attnzoo_attention_forward", "attnzoo_mask",
           "make_attention_forward", "hf_classes", "SUPPORTED", "VARIANTS", "NAME"]
