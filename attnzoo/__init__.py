"""attnzoo: drop-in efficient attention modules backed by Triton and CUDA kernels.

Public names: the functional ops (``attention``, ``attention_with_kvcache``, ``lightning_attention``,
``moh_attention``, ``dynamic_mask_attention``), the modules, ``convert`` and ``info``.
Importing attnzoo needs neither a GPU nor Triton.
"""

__version__ = "0.1.0"

from attnzoo.errors import BackendUnavailableError, InputError
from attnzoo.ops.attention.api import attention, attention_with_kvcache
from attnzoo.ops.masks import block_mask as masks
from attnzoo.ops.masks.block_mask import BlockMask
