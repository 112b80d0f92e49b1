"""attnzoo: drop-in efficient attention modules backed by Triton and CUDA kernels.

Public names: the functional ops (``attention``, ``attention_with_kvcache``, ``lightning_attention``,
``moh_attention``, ``dynamic_mask_attention``), the modules, ``convert`` and ``info``.
Importing attnzoo needs neither a GPU nor Triton.
"""

__version__ = "0.1.0"

from attnzoo import backends
from attnzoo.errors import BackendUnavailableError, InputError
from attnzoo.ops.attention.api import attention, attention_with_kvcache
from attnzoo.ops.dma.api import dynamic_mask_attention
from attnzoo.ops.knocking.api import kha_mlp
from attnzoo.ops.lightning.api import lightning_attention, lightning_decode
from attnzoo.ops.lightning.decay import decay_rates
from attnzoo.ops.masks import block_mask as masks
from attnzoo.ops.masks.block_mask import BlockMask
from attnzoo.ops.masks.flex import from_flex, to_flex
from attnzoo.ops.moh.api import moh_attention
from attnzoo.modules.mha import KnockingHeadsAttention, MultiHeadAttention
from attnzoo.modules.cache import KVCache
from attnzoo.modules.dma import DynamicMaskAttention
from attnzoo.modules.lightning import LightningAttention, LightningCache
from attnzoo.modules.moh import MoHAttention
from attnzoo.modules.rope import RotaryEmbedding
from attnzoo import convert
from attnzoo.environment import info

__all__ = [
    "attention", "attention_with_kvcache", "lightning_attention", "lightning_decode", "moh_attention",
    "dynamic_mask_attention", "kha_mlp", "decay_rates",
    "MultiHeadAttention", "MoHAttention", "KnockingHeadsAttention", "DynamicMaskAttention", "LightningAttention",
    "KVCache", "LightningCache", "RotaryEmbedding", "BlockMask", "masks", "from_flex", "to_flex",
    "convert", "info", "backends", "InputError", "BackendUnavailableError",
]
