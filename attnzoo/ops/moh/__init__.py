"""Mixture-of-Head attention (SPEC §3): the router, row packing, and head-sparse attention over the core."""

from attnzoo.ops.moh import api, packing_api, router_api  # noqa: F401  (entry points; register "reference")
from attnzoo.ops.moh import torch_backend  # noqa: F401  (registers "torch")
from attnzoo.ops.moh import triton_backend  # noqa: F401  (registers "triton")
