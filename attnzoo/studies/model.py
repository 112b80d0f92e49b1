"""A tiny decoder-only language model built from attnzoo's attention modules (the way a user would).

``TinyLM``: token embedding -> ``n_layers`` x [RMSNorm -> attention -> residual, RMSNorm -> SwiGLU-free
GELU MLP -> residual] -> RMSNorm -> tied output head. Softmax variants use RoPE; lightning attention
gets its positions from its decay (it does not take RoPE). Every module runs with ``backend="auto"``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import attnzoo

# variant name -> (constructor, extra words). ``{w}`` stands for the study's window / keep_window budget.
VARIANTS = {
    "mha": "dense multi-head attention (MultiHeadAttention)",
    "gqa": "GQA, 2 kv heads (MultiHeadAttention num_kv_heads=2)",
    "swa": "sliding window of w keys (MultiHeadAttention window=(w-1, 0))",
    "dma": "dynamic mask attention, keep_window=w (DynamicMaskAttention)",
    "lightning": "lightning linear attention, alibi decay (LightningAttention)",
    "moh75": "MoH, 75% of heads active per token (1 shared + top-2 of 3 routed, learned router)",
    "moh50": "MoH, 50% of heads active per token (1 shared + top-1 of 3 routed, learned router)",
    "kha": "knocking heads, linear (KnockingHeadsAttention knocking='linear')",
    "kha_mlp": "knocking heads, MLP on V (KnockingHeadsAttention knocking='mlp')",
}


def make_attention(variant: str, dim: int, num_heads: int, *, window: int, layer_idx: int, num_layers: int) -> nn.Module:
    """One attention layer of ``variant`` (see ``VARIANTS``); all with ``backend="auto"`` (the default)."""
    common = dict(rope=True)
    if variant == "mha":
        return attnzoo.MultiHeadAttention(dim, num_heads, **common)
    if variant == "gqa":
        return attnzoo.MultiHeadAttention(dim, num_heads, num_kv_heads=2, **common)
    if variant == "swa":
        return attnzoo.MultiHeadAttention(dim, num_heads, window=(window - 1, 0), **common)
    if variant == "dma":
        return attnzoo.DynamicMaskAttention(dim, num_heads, keep_window=window, **common)
    if variant == "lightning":
        return attnzoo.LightningAttention(dim, num_heads, decay="alibi", layer_idx=layer_idx, num_layers=num_layers)
    if variant in ("moh75", "moh50"):
        assert num_heads == 4, "the MoH fractions below are written for 4 heads"
        top_k = 2 if variant == "moh75" else 1
        return attnzoo.MoHAttention(dim, num_heads, num_shared_heads=1, top_k=top_k, router="learned", **common)
    if variant == "kha":
        return attnzoo.KnockingHeadsAttention(dim, num_heads, knocking="linear", **common)
    if variant == "kha_mlp":
        return attnzoo.KnockingHeadsAttention(dim, num_heads, knocking="mlp", **common)
    raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")


class Block(nn.Module):
    def __init__(self, attn: nn.Module, dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache=cache)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, variant: str, vocab: int, dim: int = 64, num_heads: int = 4, num_layers: int = 2,
                 window: int = 16):
        super().__init__()
        self.variant = variant
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            Block(make_attention(variant, dim, num_heads, window=window, layer_idx=i, num_layers=num_layers), dim)
            for i in range(num_layers)
        )
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, idx: torch.Tensor, caches: Optional[list] = None) -> torch.Tensor:
        x = self.embed(idx)
        for i, b in enumerate(self.blocks):
            x = b(x, None if caches is None else caches[i])
        return self.head(self.norm(x))

    def new_caches(self, batch_size: int) -> list:
        """One generation cache per layer, each made by its attention module (``new_cache``)."""
        return [b.attn.new_cache(batch_size) for b in self.blocks]

    def aux_loss(self) -> torch.Tensor:
        """Mean MoH load-balance loss over layers (0 for other variants), read off the modules."""
        losses = [b.attn.aux_loss for b in self.blocks if getattr(b.attn, "aux_loss", None) is not None]
        return torch.stack(losses).mean() if losses else torch.zeros(())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def attention_params(model: TinyLM) -> int:
    return sum(p.numel() for b in model.blocks for p in b.attn.parameters())


@torch.no_grad()
def generate(model: TinyLM, prompt: torch.Tensor, steps: int, *, cached: bool) -> tuple:
    """Greedy generation of ``steps`` tokens after ``prompt [B, T0]``. ``cached``: prefill the per-layer
    caches, then one token per call (what a user does); otherwise re-run the whole sequence each step.
    Returns (tokens [B, T0 + steps], the logits of each generated step [B, steps, vocab])."""
    model.eval()
    seq, logits_out = prompt, []
    if cached:
        caches = model.new_caches(prompt.shape[0])
        logits = model(prompt, caches)[:, -1]
        for _ in range(steps):
            logits_out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            logits = model(nxt, caches)[:, -1]
    else:
        for _ in range(steps):
            logits = model(seq)[:, -1]
            logits_out.append(logits)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq, torch.stack(logits_out, 1)
