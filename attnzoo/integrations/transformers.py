"""Hugging Face transformers integration: ``register()`` and ``convert(model, variant, **options)``.

``register()`` adds ``"attnzoo"`` to transformers' ``AttentionInterface`` **and** ``AttentionMaskInterface``.
Both are needed: transformers builds a mask only for names its mask interface knows, so registering the
attention function alone makes every model call it with ``attention_mask=None`` -- a left-padded batch is
then silently wrong. After ``register()``::

    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnzoo")
    model.set_attn_implementation("attnzoo")   # or switch an existing model

and every softmax attention of the model runs through :func:`attnzoo.attention` (prefill, training,
padding, sliding windows, GQA) or :func:`attnzoo.attention_with_kvcache` (decode steps with a
``DynamicCache``). How the masks transformers hands over are read (transformers >= 5):

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
from attnzoo.ops.attention.api import attention, attention_with_kvcache
from attnzoo.ops.attention.triton_backend import MAX_DECODE_QUERIES

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
        if Tk > Tq and Tq <= MAX_DECODE_QUERIES and not grad:
            # decode: Tq == 1 here (Tq > 1 with Tk > Tq was cropped above), so causal is moot
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
    mask = attention_mask[..., :Tk]  # a mask made for a longer cache than these keys: its head covers them
    if mask.dtype == torch.bool:
        return attention(q, k, v, mask=mask, scale=scaling, backend=backend)
    return attention(q, k, v, bias=mask.to(q.dtype), scale=scaling, backend=backend)


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
