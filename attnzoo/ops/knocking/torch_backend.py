"""The "torch" backend of ``kha_mlp`` (SPEC §4): three ``head_dim x head_dim`` matmuls in v's own dtype (the
weights cast to it, differentiably), fp32 for fp32; any device. The reference computes in fp32."""

from __future__ import annotations

from typing import List

import torch

from attnzoo import backends

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _supports(v, w_up, w_gate, w_down, **_) -> List[str]:
    return [] if v.dtype in FLOAT_DTYPES else [f"v: dtype {v.dtype} is not a floating dtype"]


@backends.register("kha_mlp", "torch", priority=5, supports=_supports)
def kha_mlp_torch(v, w_up, w_gate, w_down):
    dt = v.dtype
    h = torch.matmul(v, w_up.to(dt)) * torch.sigmoid(torch.matmul(v, w_gate.to(dt)))
    return 2.0 * torch.matmul(h, w_down.to(dt))
