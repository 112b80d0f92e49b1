"""``moh_pack_rows``: the packing of the active ``(token, head)`` rows for the head-sparse kernels (SPEC §3),
with ``backend="auto"``: ``"reference"`` (:func:`attnzoo.ops.moh.packing.pack_active_rows`, priority 0)
and ``"triton"`` (:mod:`attnzoo.ops.moh.triton_packing`, priority 10, registered by
:mod:`attnzoo.ops.moh.triton_backend`).
"""

from __future__ import annotations


import torch

from attnzoo import backends
from attnzoo.errors import InputError
from attnzoo.ops import validate as V
from attnzoo.ops.moh.packing import PackedRows, pack_active_rows


def _pack_reference(gates: torch.Tensor, block_m: int, num_shared: int = 0) -> PackedRows:
    if num_shared:
        gates = gates.clone()
        gates[..., :num_shared] = 1  # shared heads are always active
    return pack_active_rows(gates, block_m)


@backends.register("moh_pack_rows", "reference", priority=0)
def _pack_reference_backend(gates, block_m, num_shared=0):
    return _pack_reference(gates, block_m, num_shared)


def moh_pack_rows(gates: torch.Tensor, block_m: int, num_shared: int = 0, *, backend: str = "auto") -> PackedRows:
    """Per ``(b, h)`` the sorted positions of its active tokens and the flattened tile schedule
    (:class:`attnzoo.ops.moh.packing.PackedRows`, see :mod:`attnzoo.ops.moh.packing`) from ``gates [B, T, H]``
    (0 = inactive). The first ``num_shared`` heads count as active on every token (``rows = arange(T)``,
    ``counts = T``) whatever their gate. No host sync."""
    V.check_tensor("gates", gates, ranks=(3,))
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1:
        raise InputError(f"block_m: expected a positive int, got {block_m!r}")
    H = gates.shape[-1]
    if isinstance(num_shared, bool) or not isinstance(num_shared, int) or not 0 <= num_shared <= H:
        raise InputError(f"num_shared: expected an int in [0, H={H}], got {num_shared!r}")
    return backends.dispatch("moh_pack_rows", backend, gates=gates, block_m=block_m, num_shared=num_shared)
