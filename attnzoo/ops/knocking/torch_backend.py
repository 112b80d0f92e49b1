"""The "torch" backend of ``kha_mlp`` (SPEC §4): three ``head_dim x head_dim`` matmuls, any device. fp16 / bf16
inputs compute in fp32 like the reference and the Triton kernel (the output is cast back): in fp16 the
weights' gradients, sums over every token's vector, missed the accuracy rule (``attnzoo check``: dw_gate
1.8e-2 against a tolerance of 1.7e-2)."""

from __future__ import annotations

from typing import List

import torch

from attnzoo import backends

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _supports(v, w_up, w_gate, w_down, **_) -> List[str]:
    return [] if v.dtype in FLOAT_DTYPES else [f"v: dtype {v.dtype} is not a floating dtype"]


@backends.register("kha_mlp", "torch", priority=5, supports=_supports)
def kha_mlp_torch(v, w_up, w_gate, w_down):
    ct = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    x = v.to(ct)
    h = torch.matmul(x, w_up.to(ct)) * torch.sigmoid(torch.matmul(x, w_gate.to(ct)))
    return (2.0 * torch.matmul(h, w_down.to(ct))).to(v.dtype)
