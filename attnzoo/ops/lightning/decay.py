"""Per-head decay rates ``s_h`` for lightning attention (SPEC §6), ``lambda_h = exp(-s_h)``.

Three presets are in circulation and disagree; all are named here, the default is ``"alibi"``:

- ``"alibi"`` (official TransNormerLLM / Lightning Attention code, MiniMax-01): ALiBi's slopes
  ``s_h = 2^(-8h/H)``, ``h = 1..H`` (for ``H`` not a power of two, ALiBi's interleaving rule: the slopes of
  the closest lower power of two ``P``, then every other slope of ``2P``), times the layer factor
  ``1 - l/(L-1) + 1e-5`` for layer ``l`` (0-based) of ``L``. With ``L == 1`` the official formula divides by
  zero; here the single layer counts as the first (``l/(L-1) := 0``), factor ``1 + 1e-5``.
- ``"paper"`` (TransNormerLLM eq. 10, as flash-linear-attention uses it): ``s_h = (8h/H) * (1 - l/L)``,
  ``h = 0..H-1`` (head 0 has no decay).
- ``None`` (or ``0`` / ``"none"``): no decay, ``s = 0``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Union

import torch

from attnzoo.errors import InputError

PRESETS = ("alibi", "paper", None)


def alibi_slopes(n: int) -> List[float]:
    """ALiBi's head slopes (Press et al., official ``get_slopes``): ``2^(-8h/n)``, ``h = 1..n`` for a power of
    two ``n``; otherwise the closest lower power of two's slopes followed by the even-indexed slopes of
    twice that power, truncated to ``n``."""

    def power_of_2(m: int) -> List[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))  # = 2^(-8/m)
        return [start * start**i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: n - closest]


def decay_rates(
    num_heads: int,
    preset: Union[str, int, None] = "alibi",
    layer_idx: int = 0,
    num_layers: int = 1,
    *,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """The decay rates ``s`` (``[num_heads]``, fp32, all ``>= 0``) of layer ``layer_idx`` of ``num_layers``."""
    if not (isinstance(num_heads, int) and num_heads >= 1):
        raise InputError(f"num_heads: expected a positive int, got {num_heads!r}")
    if not (isinstance(num_layers, int) and num_layers >= 1):
        raise InputError(f"num_layers: expected a positive int, got {num_layers!r}")
    if not (isinstance(layer_idx, int) and 0 <= layer_idx < num_layers):
        raise InputError(f"layer_idx: expected an int in [0, num_layers) = [0, {num_layers}), got {layer_idx!r}")
    H, l, L = num_heads, layer_idx, num_layers
    if preset is None or preset == 0 or preset == "none":
        return torch.zeros(H, dtype=torch.float32, device=device)
    if preset == "alibi":
        factor = 1.0 - (l / (L - 1) if L > 1 else 0.0) + 1e-5
        return torch.tensor([s * factor for s in alibi_slopes(H)], dtype=torch.float32, device=device)
    if preset == "paper":
        return torch.tensor([(8.0 * h / H) * (1.0 - l / L) for h in range(H)], dtype=torch.float32, device=device)
    raise InputError(f"preset: expected 'alibi', 'paper' or None (no decay), got {preset!r}")
