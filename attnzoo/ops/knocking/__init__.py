"""Knocking heads (SPEC §4): the KHA-MLP op, its reference and its fused Triton kernel."""

from attnzoo.ops.knocking import api  # noqa: F401  (entry point; registers "reference")
from attnzoo.ops.knocking import torch_backend  # noqa: F401  (registers "torch")
from attnzoo.ops.knocking import triton_backend  # noqa: F401  (registers "triton")
