"""One ``nn.Module`` per variant, on a small common base.

- ``base.py``: the softmax pipeline every softmax module shares (projections, knocking, QK-norm, RoPE,
  cache, output projection); ``mha.py``: ``MultiHeadAttention`` (MHA/GQA/MQA/WGQA) and
  ``KnockingHeadsAttention``; ``moh.py``: ``MoHAttention``; ``dma.py``: ``DynamicMaskAttention``;
  ``lightning.py``: ``LightningAttention`` and its cache.
- ``knocking.py``: the knocking-heads transform; ``rope.py``: rotary embeddings; ``cache.py``: ``KVCache``.
"""
