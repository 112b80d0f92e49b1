"""Generation caches the modules create (``module.new_cache(batch_size)``).

:class:`KVCache` keeps the keys and values a softmax module has seen, *after* knocking, QK-norm and RoPE
(so a cached KHA-MLP module stores the transformed V), in buffers whose capacity doubles as they fill
(amortised O(1) per appended token), plus the key-padding mask and any per-key extras a variant needs
(DMA keeps its per-key bias there).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from attnzoo.errors import InputError


class KVCache:
    """``made_by``: the configuration of the module that made it (``(class name, words)``); the module
    refuses a cache another configuration made, whose buffers would not fit or would mean something else."""

    def __init__(self, batch_size: int, *, made_by: tuple = ("", ())):
        self.batch_size = batch_size
        self.made_by = made_by
        self.seq_len = 0
        self._bufs: Dict[str, torch.Tensor] = {}  # name -> [B, capacity, ...]
        self._has_padding = False

    def _append(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Append ``t [B, T, ...]`` to buffer ``name`` after the first ``seq_len`` entries; return the
        filled prefix ``[B, seq_len + T, ...]`` (a view)."""
        n, T = self.seq_len, t.shape[1]
        buf = self._bufs.get(name)
        if buf is None or buf.shape[1] < n + T:
            cap = max(16, 2 * (n + T))
            new = torch.empty(t.shape[0], cap, *t.shape[2:], device=t.device, dtype=t.dtype)
            if buf is not None:
                new[:, :n] = buf[:, :n]
            buf = self._bufs[name] = new
        buf[:, n : n + T] = t
        return buf[:, : n + T]

    def update(
        self, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, **extras: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """Add the new tokens' ``k [B, T, Hkv, D]``, ``v``, padding mask ``[B, T]`` (True = real token) and
        per-key extras ``[B, T, ...]``; return everything cached so far."""
        B, T = k.shape[:2]
        if B != self.batch_size:
            raise InputError(f"cache: made for batch size {self.batch_size}, got a batch of {B}")
        k_all = self._append("k", k)
        v_all = self._append("v", v)
        if key_padding_mask is None:
            key_padding_mask = torch.ones(B, T, dtype=torch.bool, device=k.device)
        else:
            self._has_padding = True
        kpm_all = self._append("key_padding_mask", key_padding_mask)
        extras_all = {name: self._append(name, t) for name, t in extras.items()}
        self.seq_len += T
        return k_all, v_all, (kpm_all if self._has_padding else None), extras_all

    def checkpoint(self):
        """A mark to :meth:`restore` if a call fails after it appended (the buffers past ``seq_len`` are
        simply overwritten later)."""
        return self.seq_len, self._has_padding

    def restore(self, mark) -> None:
        self.seq_len, self._has_padding = mark

    def reset(self) -> None:
        self.seq_len = 0
        self._bufs.clear()
        self._has_padding = False
