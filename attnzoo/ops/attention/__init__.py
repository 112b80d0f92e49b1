"""The softmax core (SPEC §1): ``attention`` and ``attention_with_kvcache``; reference, torch, Triton kernels."""

from attnzoo.ops.attention import api  # noqa: F401  (entry points; registers "reference")
from attnzoo.ops.attention import torch_backend  # noqa: F401  (registers "torch")
from attnzoo.ops.attention import triton_backend  # noqa: F401  (registers "triton")
