"""``attention``: the softmax core, forward / backward / forward+backward, causal and not, head dims 64,
128, 256, sequence 512..16k at a fixed 16k tokens per batch (B = 16384 / T), MHA and GQA.

MHA uses ``H = Hkv = 2048 / D`` (a 2048-wide model, as FlashAttention's own benchmarks do); GQA uses 32
query / 8 kv heads (Llama-3-8B). FLOPs: FA3's formula over query heads and the exact causal area.
"""

from __future__ import annotations

from typing import List

from benchmarks import flops as F
from benchmarks.providers import (
    Built,
    Provider,
    SDPA_BACKENDS,
    attnzoo_providers,
    bhtd,
    compiled_flex,
    first_output,
    flex_block_mask,
    is_gqa,
    sdpa_context,
    xformers_layout,
)
from benchmarks.suites.base import Case, Suite, fmt_tokens, gold_attention, randn, seed_of

TOKENS = 16384


class AttentionSuite(Suite):
    name = "attention"
    description = "softmax attention core: fwd, bwd, fwd+bwd; causal and not; D 64/128/256; MHA and GQA"

    def grid(self, level: str):
        if level == "tiny":
            return dict(modes=("fwd", "bwd", "fwd+bwd"), causal=(True, False), dims=(32,), heads=("mha", "gqa"),
                        seqs=(64,), tokens=128)
        if level == "quick":
            return dict(modes=("fwd", "fwd+bwd"), causal=(True,), dims=(128,), heads=("mha", "gqa"),
                        seqs=(4096,), tokens=TOKENS)
        return dict(modes=("fwd", "bwd", "fwd+bwd"), causal=(True, False), dims=(64, 128, 256), heads=("mha", "gqa"),
                    seqs=(512, 1024, 2048, 4096, 8192, 16384), tokens=TOKENS)

    @staticmethod
    def heads(kind: str, D: int, level: str):
        if level == "tiny":
            return (4, 4) if kind == "mha" else (4, 2)
        if kind == "mha":
            h = max(1, 2048 // D)
            return h, h
        return 32, 8

    def cases(self, level: str = "full") -> List[Case]:
        g = self.grid(level)
        out = []
        for D in g["dims"]:
            for kind in g["heads"]:
                H, Hkv = self.heads(kind, D, level)
                for causal in g["causal"]:
                    for T in g["seqs"]:
                        B = max(1, g["tokens"] // T)
                        for mode in g["modes"]:
                            group = f"{mode} {'causal' if causal else 'full'} D={D} {kind.upper()} {H}/{Hkv}"
                            out.append(Case(
                                suite=self.name, name=f"{group} T={fmt_tokens(T)}", group=group, x_name="T", x=T,
                                mode=mode, shape=dict(B=B, T=T, H=H, Hkv=Hkv, D=D), params=dict(causal=causal),
                                metric="tflops", flops=F.attention_flops(B, H, T, T, D, causal=causal, mode=mode),
                                tokens=B * T, input_key=(B, T, H, Hkv, D, causal),
                            ))
        return out

    def providers(self):
        return attention_providers()

    def make_inputs(self, case: Case, device, dtype):
        s = case.shape
        B, T, H, Hkv, D = s["B"], s["T"], s["H"], s["Hkv"], s["D"]
        seed = seed_of(self.name, case.input_key)
        return {
            "q": randn((B, T, H, D), device=device, dtype=dtype, seed=seed),
            "k": randn((B, T, Hkv, D), device=device, dtype=dtype, seed=seed + 1),
            "v": randn((B, T, Hkv, D), device=device, dtype=dtype, seed=seed + 2),
            "dout": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 3),
        }

    def gold(self, case: Case, inputs, with_grads: bool):
        out, grads = gold_attention(inputs["q"], inputs["k"], inputs["v"], causal=case.params["causal"],
                                    dout=inputs["dout"] if with_grads else None)
        return {"out": out, "grads": grads or {}}


SUITE = AttentionSuite()


# ----------------------------------------------------------------------------------------------------
# attention suite (also the sparse suite's block masks): q, k, v [B, T, H|Hkv, D]


def attention_providers() -> List[Provider]:
    def az(b):
        def build(case, x):
            import attnzoo

            causal = case.params["causal"]
            return Built(lambda: attnzoo.attention(x["q"], x["k"], x["v"], causal=causal, backend=b))
        return build

    provs = attnzoo_providers(("attention",), az)

    for name, backend in SDPA_BACKENDS:
        def build(case, x, backend=backend):
            import torch.nn.functional as F

            q, k, v = bhtd(x["q"]), bhtd(x["k"]), bhtd(x["v"])
            causal, gqa = case.params["causal"], is_gqa(case)
            kw = {"enable_gqa": True} if gqa else {}
            return Built(lambda: bhtd(F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)),
                         context=sdpa_context(backend))
        provs.append(Provider(name, "peer", "torch", build))

    def flex(case, x):
        q, k, v = bhtd(x["q"]), bhtd(x["k"]), bhtd(x["v"])
        fa = compiled_flex()
        bm = None
        if case.params["causal"]:
            off = k.shape[2] - q.shape[2]
            bm = flex_block_mask(lambda b, h, qi, ki: ki <= qi + off, None, None, q.shape[2], k.shape[2], q.device)
        kw = {"enable_gqa": True} if is_gqa(case) else {}
        return Built(lambda: bhtd(fa(q, k, v, block_mask=bm, **kw)))
    provs.append(Provider("flex", "peer", "torch", flex, note="torch.compile(flex_attention)"))

    def xf(case, x):
        import xformers.ops as xops

        q, k, v = xformers_layout(x["q"], x["k"], x["v"])
        bias = xops.LowerTriangularFromBottomRightMask() if case.params["causal"] else None
        shape = x["q"].shape
        return Built(lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias).reshape(*shape[:3], -1))
    provs.append(Provider("xformers", "peer", "xformers", xf))

    def fa2(case, x):
        from flash_attn import flash_attn_func

        return Built(lambda: flash_attn_func(x["q"], x["k"], x["v"], causal=case.params["causal"]))
    provs.append(Provider("flash-attn", "peer", "flash-attn", fa2))

    def fa3(case, x):
        from flash_attn_interface import flash_attn_func

        return Built(lambda: first_output(flash_attn_func(x["q"], x["k"], x["v"], causal=case.params["causal"])))
    provs.append(Provider("flash-attn-3", "peer", "flash-attn-3", fa3))
    return provs
