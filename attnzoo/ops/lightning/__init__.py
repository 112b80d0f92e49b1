"""Lightning (linear) attention (SPEC §6): PyTorch reference, decay presets, torch chunked backend, Triton
chunked and decode kernels.

``api`` validates and dispatches; ``reference`` is the PyTorch parallel/recurrent math; ``decay`` holds the
per-head rate presets; ``torch_backend`` is the chunked algorithm in PyTorch (O(T)); ``triton_chunk`` /
``triton_recurrent`` are the kernels (imported only when a Triton backend runs); ``triton_backend``
registers them.
"""

from attnzoo.ops.lightning import api  # noqa: F401  (entry points; registers "reference")
from attnzoo.ops.lightning import torch_backend  # noqa: F401  (registers "torch")
from attnzoo.ops.lightning import triton_backend  # noqa: F401  (registers "triton")
