"""The softmax core (SPEC §1): ``attention`` and ``attention_with_kvcache``; reference, torch, Triton kernels,
and the flash-attn / xformers engines (used where installed; importing attnzoo never imports them)."""

from attnzoo.ops.attention import api  # noqa: F401  (entry points; registers "reference")
from attnzoo.ops.attention import torch_backend  # noqa: F401  (registers "torch")
from attnzoo.ops.attention import triton_backend  # noqa: F401  (registers "triton")
from attnzoo.ops.attention import flash_attn_backend  # noqa: F401  (registers "flash_attn")
from attnzoo.ops.attention import xformers_backend  # noqa: F401  (registers "xformers")
