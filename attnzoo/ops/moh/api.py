"""``attnzoo.moh_attention``: attention whose output rows are scaled by per-(token, head) gates."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from attnzoo import backends
from attnzoo.errors import InputError
from attnzoo.ops import validate as V
from attnzoo.ops.attention.api import validate_attention
from attnzoo.ops.moh.reference import moh_attention_reference


@backends.register("moh_attention", "reference", priority=0)
def _moh_reference_backend(**kw):
    return moh_attention_reference(**kw)


def moh_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Tuple[int, int] = (-1, -1),
    key_padding_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Mixture-of-Head attention core (SPEC §3): ``o[b, t, h] = gates[b, t, h] * attention(q, k, v)[b, t, h]``.

    ``q [B, Tq, H, D]``, ``k, v [B, Tk, Hkv, D]``, ``gates [B, Tq, H]`` (0 = inactive head for that token,
    whose attention a kernel skips). K and V stay dense: an active query sees every key it may see.
    Gradients flow to the active gates (``dgate = rowsum(dO * O_unscaled)``); inactive pairs are never
    computed and their gates get no gradient.
    """
    window = validate_attention(
        q, k, v, causal=causal, scale=scale, window=window, bias=None, mask=None, block_mask=None,
        key_padding_mask=key_padding_mask, cu_seqlens_q=None, cu_seqlens_k=None,
    )
    V.check_tensor("gates", gates, ranks=(3,))
    if tuple(gates.shape) != tuple(q.shape[:3]):
        raise InputError(f"gates: expected [B, Tq, H] = {tuple(q.shape[:3])}, got {V.shape_str(gates)}")
    V.check_same(("q", "gates"), (q, gates), dtype=False)
    return backends.dispatch(
        "moh_attention", backend, q=q, k=k, v=v, gates=gates, causal=causal, scale=scale, window=window,
        key_padding_mask=key_padding_mask,
    )
