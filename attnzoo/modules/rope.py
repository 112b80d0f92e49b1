"""Rotary position embedding (RoFormer; the "rotate half" layout of Llama / GPT-NeoX checkpoints)."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.errors import InputError


class RotaryEmbedding(nn.Module):
    """Rotates pairs ``(x[..., i], x[..., i + rot/2])`` of the first ``rotary_dim`` channels by
    ``position * base^(-2i/rotary_dim)``. Applied to ``x [B, T, H, D]`` with ``positions [B, T]``."""

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        if self.rotary_dim % 2 or self.rotary_dim > head_dim:
            raise InputError(f"rotary_dim: must be even and <= head_dim={head_dim}, got {self.rotary_dim}")
        self.base = float(base)

    def inv_freq(self, device) -> torch.Tensor:
        """``base^(-2i/rotary_dim)`` in fp32, made on each call: no buffer that ``module.to(bfloat16)``
        could round (bf16 frequencies put rotations at long positions off by O(1))."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return 1.0 / (self.base ** exponents)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rot = self.rotary_dim
        angles = positions.to(torch.float32)[..., None] * self.inv_freq(x.device)  # [B, T, rot/2]
        cos = torch.cos(angles)[:, :, None, :]
        sin = torch.sin(angles)[:, :, None, :]
        xf = x[..., :rot].float()
        x1, x2 = xf[..., : rot // 2], xf[..., rot // 2 :]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([out, x[..., rot:]], dim=-1) if rot < self.head_dim else out

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}"
