"""Lightning (linear) attention (SPEC §6): PyTorch reference, decay presets, Triton chunked and decode kernels.

``api`` validates and dispatches; ``reference`` is the PyTorch parallel/recurrent math; ``decay`` holds the
per-head rate presets; ``triton_chunk`` / ``triton_recurrent`` are the kernels (imported only when a Triton
backend runs); ``triton_backend`` registers them.
"""

from attnzoo.ops.lightning.api import lightning_attention, lightning_decode
from attnzoo.ops.lightning.decay import decay_rates

__all__ = ["lightning_attention", "lightning_decode", "decay_rates"]
