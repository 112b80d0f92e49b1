"""Registers the Triton backend of ``lightning_attention`` (chunked kernels) and ``lightning_decode`` (fused
recurrent kernel), priority 10.

Importing this module imports no Triton code: the kernel modules (which define the ``attnzoo::lightning_*``
custom ops) are imported inside the backend functions, on first use. ``supports`` says why not, never
runs a silently-wrong path.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from attnzoo import backends

#: chunk length of the chunked kernels; None = the kernels' default (triton_chunk.default_chunk_size)
CHUNK_SIZE: Optional[int] = None
#: segments per sequence of a dense batch (triton_chunk.segment_plan); None = automatic, 1 = never cut
SEGMENTS: Optional[int] = None


def _common_reasons(q: torch.Tensor, v: torch.Tensor, decay) -> List[str]:
    reasons = backends.triton_tensor_reasons(q, "q")
    if isinstance(decay, torch.Tensor) and decay.requires_grad and torch.is_grad_enabled():
        reasons.append("gradients w.r.t. decay are not implemented in the Triton kernels (the reference has them)")
    return reasons


def _supports_chunk(*, q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens) -> List[str]:
    return _common_reasons(q, v, decay)


@backends.register("lightning_attention", "triton", priority=10, supports=_supports_chunk)
def _lightning_triton(*, q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
    from attnzoo.ops.lightning.triton_chunk import lightning_chunk

    # final state: fp32, like the reference's for fp16/bf16/fp32 inputs
    return lightning_chunk(q, k, v, decay, scale, initial_state, cu_seqlens, chunk_size=CHUNK_SIZE, segments=SEGMENTS)


def _supports_decode(*, q, k, v, state, decay, scale) -> List[str]:
    reasons = _common_reasons(q, v, decay)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, state)):
        reasons.append("the decode kernel has no autograd (it updates the state in place); use "
                       "lightning_attention with initial_state to train, or run decode under torch.no_grad()")
    return reasons


@backends.register("lightning_decode", "triton", priority=10, supports=_supports_decode)
def _lightning_decode_triton(*, q, k, v, state, decay, scale):
    from attnzoo.ops.lightning.triton_recurrent import lightning_decode

    return lightning_decode(q, k, v, state, decay, scale)
