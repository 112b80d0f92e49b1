"""Dynamic mask attention (SPEC §5): per-row top-``keep_window`` key selection over the softmax core."""

from attnzoo.ops.dma import api  # noqa: F401  (entry point; registers "reference")
from attnzoo.ops.dma import torch_backend  # noqa: F401  (registers "torch")
from attnzoo.ops.dma import triton_backend  # noqa: F401  (registers "triton")
