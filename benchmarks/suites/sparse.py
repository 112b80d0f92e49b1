"""``sparse``: block-sparse attention over a density sweep, and Dynamic Mask Attention over a
``keep_window`` sweep.

Block masks: 8k tokens (B = 2), 16 heads of 128, 128 x 128 blocks; every query block of every head keeps
``round(density * Nk)`` key blocks chosen at random (its diagonal block always among them), all *full*
blocks, so the kernels test block skipping rather than per-element masking. Peers: FlexAttention with the
same block mask, and dense-then-mask (SDPA with the element mask materialised).

DMA (SPEC §5): 8k tokens (B = 2), 16 query / 8 kv heads of 128, causal, bias ``A_h * softplus(dt)`` with
random ``dt`` and ``A_h`` in [0.1, 1]; each row keeps the top ``keep_window`` visible keys by bias (ties
to the more recent key). Peers: flash-dmattn and FlexAttention given the same kept set and bias, and
dense-then-mask. Both sweeps report TFLOP/s dense-equivalent (the mask-free area) and effective (the
kept area).
"""

from __future__ import annotations

from typing import List

from benchmarks import flops as F
from benchmarks.providers import (
    Built,
    Provider,
    attnzoo_fn,
    attnzoo_providers,
    bhtd,
    compiled_flex,
    first_output,
    flex_block_mask_from_dense,
    is_gqa,
    sdpa_context,
)
from benchmarks.suites.base import Case, Suite, gold_attention, randn, seed_of

TOKENS = 16384
BLOCK = 128


def random_block_pattern(H: int, Tq: int, Tk: int, density: float, seed: int, block: int = BLOCK):
    """``[1, H, Mq, Nk]`` bool: each query block keeps ``max(1, round(density * Nk))`` key blocks, the
    diagonal one included, the rest uniformly at random."""
    import torch

    mq, nk = -(-Tq // block), -(-Tk // block)
    n = max(1, min(nk, round(density * nk)))
    g = torch.Generator(device="cpu").manual_seed(seed)
    score = torch.rand(1, H, mq, nk, generator=g)
    diag = (torch.arange(mq).view(mq, 1) * nk // max(mq, 1)).clamp(max=nk - 1)
    score.scatter_(-1, diag.view(1, 1, mq, 1).expand(1, H, mq, 1), 2.0)
    top = score.topk(n, dim=-1).indices
    return torch.zeros(1, H, mq, nk, dtype=torch.bool).scatter_(-1, top, True)


def block_mask_of(blocks, Tq: int, Tk: int, block: int = BLOCK):
    """An attnzoo BlockMask whose listed blocks are all full (no per-element mask)."""
    import torch
    from attnzoo.ops.masks.block_mask import BlockMask

    nk = blocks.shape[-1]
    count = blocks.sum(-1).to(torch.int32)
    ar = torch.arange(nk, device=blocks.device)
    idx = torch.where(blocks, ar, nk + ar).argsort(dim=-1, stable=True).to(torch.int32)
    return BlockMask(kv_num_blocks=torch.zeros_like(count), kv_indices=idx.clone(), full_kv_num_blocks=count,
                     full_kv_indices=idx, block_size=(block, block), seq_lengths=(Tq, Tk), mask_mod=None)


def dma_kept(bias, keep_window: int):
    """``bias [B, Hkv, T]`` -> ``[B, Hkv, T, T]`` bool: row i keeps the ``keep_window`` largest biases among
    keys ``0..i`` (all of them if fewer), ties broken toward the more recent key (SPEC §5)."""
    import torch

    B, Hkv, T = bias.shape
    w = min(keep_window, T)
    out = torch.empty(B, Hkv, T, T, dtype=torch.bool, device=bias.device)
    j = torch.arange(T, device=bias.device)
    causal = j.view(1, T) <= j.view(T, 1)
    for b in range(B):
        for h in range(Hkv):
            # rank by (bias, index): a stable ascending sort puts equal biases in index order, so a larger
            # rank = a larger bias, or an equal bias and a more recent key
            order = torch.argsort(bias[b, h].float(), stable=True)
            rank = torch.empty(T, dtype=torch.int64, device=bias.device)
            rank[order] = j
            r = torch.where(causal, rank.view(1, T), torch.full((), -1, device=bias.device))
            thr = r.topk(w, dim=-1).values[:, -1:]  # the w-th largest visible rank (-1 if fewer visible)
            out[b, h] = causal & (rank.view(1, T) >= thr)
    return out


class SparseSuite(Suite):
    name = "sparse"
    description = "block-sparse density sweep and DMA keep_window sweep"

    def grid(self, level: str):
        if level == "tiny":
            return dict(T=128, tokens=256, H=2, Hkv=1, D=32, block=32, modes=("fwd", "fwd+bwd"),
                        densities=(0.25, 1.0), windows=(16, 128))
        if level == "quick":
            return dict(T=8192, tokens=TOKENS, H=16, Hkv=8, D=128, block=BLOCK, modes=("fwd",),
                        densities=(0.1, 0.5), windows=(512, 2048))
        return dict(T=8192, tokens=TOKENS, H=16, Hkv=8, D=128, block=BLOCK, modes=("fwd", "fwd+bwd"),
                    densities=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0), windows=(256, 512, 1024, 2048, 4096, 8192))

    def cases(self, level: str = "full") -> List[Case]:
        g = self.grid(level)
        T, H, Hkv, D, blk = g["T"], g["H"], g["Hkv"], g["D"], g["block"]
        B = max(1, g["tokens"] // T)
        out = []
        for mode in g["modes"]:
            group = f"block-sparse {mode} T={T} H={H} D={D}"
            for d in g["densities"]:
                key = ("block", B, T, H, D, d, blk)
                blocks = random_block_pattern(H, T, T, d, seed_of(self.name, key), blk)
                eff_area = F.block_sparse_area(blocks, T, T, (blk, blk))  # summed over heads
                out.append(Case(
                    suite=self.name, name=f"{group} density={d}", group=group, x_name="density", x=d, mode=mode,
                    shape=dict(B=B, T=T, H=H, Hkv=H, D=D), params=dict(kind="block", density=d, block=blk),
                    metric="ms", flops=F.attention_flops(B, H, T, T, D, mode=mode),
                    flops_effective=F.attention_flops(B, 1, T, T, D, mode=mode, area=eff_area), tokens=B * T,
                    input_key=key,
                ))
        for mode in g["modes"]:
            group = f"DMA {mode} causal T={T} H={H}/{Hkv} D={D}"
            for w in g["windows"]:
                key = ("dma", B, T, H, Hkv, D, w)
                out.append(Case(
                    suite=self.name, name=f"{group} keep_window={w}", group=group, x_name="keep_window", x=w,
                    mode=mode, shape=dict(B=B, T=T, H=H, Hkv=Hkv, D=D), params=dict(kind="dma", keep_window=w),
                    metric="ms", flops=F.attention_flops(B, H, T, T, D, causal=True, mode=mode),
                    flops_effective=F.attention_flops(B, H, T, T, D, mode=mode, area=F.dma_area(T, w)),
                    tokens=B * T, input_key=key,
                ))
        return out

    def providers(self):
        return sparse_providers()

    def make_inputs(self, case: Case, device, dtype):
        import torch

        s = case.shape
        B, T, H, Hkv, D = s["B"], s["T"], s["H"], s["Hkv"], s["D"]
        seed = seed_of(self.name, case.input_key)
        x = {
            "q": randn((B, T, H, D), device=device, dtype=dtype, seed=seed),
            "k": randn((B, T, Hkv, D), device=device, dtype=dtype, seed=seed + 1),
            "v": randn((B, T, Hkv, D), device=device, dtype=dtype, seed=seed + 2),
            "dout": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 3),
        }
        if case.params["kind"] == "block":
            blk = case.params["block"]
            blocks = random_block_pattern(H, T, T, case.params["density"], seed_of(self.name, case.input_key), blk)
            x["block_bool"] = blocks.to(device)
            x["block_mask"] = block_mask_of(x["block_bool"], T, T, blk)
        else:
            g = torch.Generator(device="cpu").manual_seed(seed + 5)
            A = 0.1 + 0.9 * torch.rand(Hkv, generator=g)
            dt = torch.randn(B, T, Hkv, generator=g)
            bias = (A * torch.nn.functional.softplus(dt)).permute(0, 2, 1).contiguous()  # [B, Hkv, T]
            # the bias is rounded to the input dtype first, so every provider ranks the same values
            x["dma_bias"] = bias.to(device=device, dtype=dtype)
            x["kept"] = dma_kept(x["dma_bias"], case.params["keep_window"])
        return x

    def gold(self, case: Case, inputs, with_grads: bool):
        dout = inputs["dout"] if with_grads else None
        if case.params["kind"] == "block":
            out, grads = gold_attention(inputs["q"], inputs["k"], inputs["v"], block_mask=inputs["block_mask"], dout=dout)
        else:
            out, grads = gold_attention(inputs["q"], inputs["k"], inputs["v"], causal=True,
                                        bias=inputs["dma_bias"].unsqueeze(2), mask=inputs["kept"], dout=dout)
        return {"out": out, "grads": grads or {}}


SUITE = SparseSuite()


# ----------------------------------------------------------------------------------------------------
# sparse suite. kind "block": q, k, v + block_mask (attnzoo BlockMask) + block_bool [1, H, Mq, Nk];
# kind "dma": q, k, v + dma_bias [B, Hkv, Tk] + kept [B, Hkv, T, T] bool (causal top-keep_window set)


def sparse_providers() -> List[Provider]:
    def kind(k):
        return lambda case: case.params["kind"] == k

    def az_block(b):
        def build(case, x):
            import attnzoo

            return Built(lambda: attnzoo.attention(x["q"], x["k"], x["v"], block_mask=x["block_mask"], backend=b))
        return build

    def az_dma(b):
        def build(case, x):
            f = attnzoo_fn("dynamic_mask_attention")
            w = case.params["keep_window"]
            return Built(lambda: first_output(f(x["q"], x["k"], x["v"], x["dma_bias"], keep_window=w, causal=True, backend=b)))
        return build

    provs = attnzoo_providers(("attention",), az_block)
    for p in provs:
        p.applies = kind("block")
    for p in attnzoo_providers(("dynamic_mask_attention",), az_dma):
        p.name = p.name.replace("attnzoo-", "attnzoo-dma-")
        p.applies = kind("dma")
        provs.append(p)

    def flex_block(case, x):
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

        q, k, v = bhtd(x["q"]), bhtd(x["k"]), bhtd(x["v"])
        bm = x["block_mask"]
        blocks, (bq, bk) = x["block_bool"], bm.block_size
        zero = bm.kv_num_blocks.new_zeros(bm.kv_num_blocks.shape)
        # every listed block is full, so compiled flex never calls mask_mod; eager flex ignores the block
        # lists and applies only mask_mod, hence one that reads the same block pattern
        # (distinct index tensors: torch.compile mis-generates code when one buffer is passed twice)
        fbm = FlexBlockMask.from_kv_blocks(zero, bm.full_kv_indices.clone(), bm.full_kv_num_blocks, bm.full_kv_indices,
                                           BLOCK_SIZE=bm.block_size, seq_lengths=tuple(bm.seq_lengths),
                                           mask_mod=lambda b, h, qi, ki: blocks[0, h, qi // bq, ki // bk])
        fa = compiled_flex()
        return Built(lambda: bhtd(fa(q, k, v, block_mask=fbm)))
    provs.append(Provider("flex", "peer", "torch", flex_block, applies=kind("block"),
                          note="compiled flex_attention with the same block mask"))

    def sdpa_dense(case, x):
        import torch.nn.functional as F

        q, k, v = bhtd(x["q"]), bhtd(x["k"]), bhtd(x["v"])
        if case.params["kind"] == "block":
            bq, bk = x["block_mask"].block_size
            Tq, Tk = q.shape[2], k.shape[2]
            mask = x["block_bool"].repeat_interleave(bq, 2)[:, :, :Tq].repeat_interleave(bk, 3)[:, :, :, :Tk]
        else:
            rep = q.shape[1] // k.shape[1]
            add = x["dma_bias"].unsqueeze(2).to(q.dtype).masked_fill(~x["kept"], float("-inf"))
            mask = add.repeat_interleave(rep, 1)
        kw = {"enable_gqa": True} if is_gqa(case) else {}
        return Built(lambda: bhtd(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)),
                     context=sdpa_context("EFFICIENT_ATTENTION"))
    provs.append(Provider("sdpa-efficient-densemask", "peer", "torch", sdpa_dense,
                          note="dense-then-mask: SDPA (efficient) with the element mask / bias materialised"))

    def flex_dma(case, x):
        q, k, v = bhtd(x["q"]), bhtd(x["k"]), bhtd(x["v"])
        kept, bias = x["kept"], x["dma_bias"].float()
        rep = q.shape[1] // k.shape[1]
        bm = flex_block_mask_from_dense(kept, rep)
        fa = compiled_flex()

        def score_mod(score, b, h, qi, ki):
            return score + bias[b, h // rep, ki]

        kw = {"enable_gqa": True} if is_gqa(case) else {}
        return Built(lambda: bhtd(fa(q, k, v, score_mod=score_mod, block_mask=bm, **kw)))
    provs.append(Provider("flex-dma", "peer", "torch", flex_dma, applies=kind("dma"),
                          note="compiled flex_attention: bias as score_mod, kept set as block mask"))

    def dmattn(case, x):
        from flash_dmattn import flash_dmattn_func

        B, T = x["q"].shape[:2]
        mask = x["kept"].to(x["q"].dtype)
        bias = x["dma_bias"].unsqueeze(2).expand(-1, -1, T, -1).to(x["q"].dtype).contiguous()
        return Built(lambda: first_output(flash_dmattn_func(x["q"], x["k"], x["v"], attn_mask=mask, attn_bias=bias,
                                                       is_causal=True)))
    provs.append(Provider("flash-dmattn", "peer", "flash-dmattn", dmattn, applies=kind("dma"),
                          note="flash_dmattn_func with the kept mask and bias materialised [B, Hkv, T, T]"))
    return provs
