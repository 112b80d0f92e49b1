"""``decode``: 1..16 new tokens against KV caches of 1k..128k, batch 1..64, GQA (32/8) and MQA (32/1),
contiguous and paged (256-token pages, a shuffled block table), head dim 128.

Batch x cache length is capped at 1M cached tokens (B = 64 up to 16k, B = 8 up to 128k) so one case's
cache stays at a few GB. Every cache is full (``cache_seqlens = Tk`` for each entry, the new tokens
included) so providers without per-entry lengths see the same work. Scored in GB/s of KV + q + o.
"""

from __future__ import annotations

from typing import List

import math

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
from benchmarks.suites.base import Case, Suite, fmt_tokens, randn, seed_of

PAGE = 256  # flash-attn's paged KV needs a multiple of 256
MAX_CACHED_TOKENS = 1 << 20


class DecodeSuite(Suite):
    name = "decode"
    description = "KV-cache decode: Tn 1..16 new tokens, caches 1k..128k, B 1..64, GQA and MQA, contiguous and paged"
    grad_inputs = ()

    def grid(self, level: str):
        if level == "tiny":
            return dict(tn=(1, 4), heads=((4, 2), (4, 1)), batch=(2,), caches=(256, 512), paged=(False, True),
                        D=32, page=64)
        if level == "quick":
            return dict(tn=(1,), heads=((32, 8),), batch=(1, 8), caches=(16384, 131072), paged=(False, True),
                        D=128, page=PAGE, pairs=((8, 16384), (1, 131072)))
        return dict(tn=(1, 4, 16), heads=((32, 8), (32, 1)), batch=(1, 8, 64),
                    caches=(1024, 4096, 16384, 65536, 131072), paged=(False, True), D=128, page=PAGE)

    def cases(self, level: str = "full") -> List[Case]:
        g = self.grid(level)
        D, page = g["D"], g["page"]
        pairs = g.get("pairs") or [(B, Tk) for B in g["batch"] for Tk in g["caches"] if B * Tk <= MAX_CACHED_TOKENS]
        out = []
        for H, Hkv in g["heads"]:
            kind = "MQA" if Hkv == 1 else "GQA"
            for paged in g["paged"]:
                for Tn in g["tn"]:
                    for B, Tk in pairs:
                        group = f"Tn={Tn} B={B} {kind} {H}/{Hkv} {'paged' if paged else 'contiguous'}"
                        nbytes = F.decode_bytes(B, Tn, H, Hkv, D, cache_lens=Tk, elem=2)
                        out.append(Case(
                            suite=self.name, name=f"{group} Tk={fmt_tokens(Tk)}", group=group, x_name="cache_len",
                            x=Tk, mode="decode", shape=dict(B=B, Tn=Tn, H=H, Hkv=Hkv, D=D, Tk=Tk),
                            params=dict(paged=paged, page=page if paged else None), metric="gbps",
                            flops=2.0 * B * H * 2 * D * F.decode_area(Tn, Tk), bytes=nbytes, tokens=B * Tn,
                            input_key=(B, Tn, H, Hkv, D, Tk, paged),
                        ))
        return out

    def providers(self):
        return decode_providers()

    def make_inputs(self, case: Case, device, dtype):
        import torch

        s = case.shape
        B, Tn, H, Hkv, D, Tk = s["B"], s["Tn"], s["H"], s["Hkv"], s["D"], s["Tk"]
        seed = seed_of(self.name, case.input_key)
        k = randn((B, Tk, Hkv, D), device=device, dtype=dtype, seed=seed)
        v = randn((B, Tk, Hkv, D), device=device, dtype=dtype, seed=seed + 1)
        x = {
            "q": randn((B, Tn, H, D), device=device, dtype=dtype, seed=seed + 2),
            "cache_seqlens": torch.full((B,), Tk, dtype=torch.int32, device=device),
            "k_full": k, "v_full": v,  # contiguous copy for the gold answer
        }
        if case.params["paged"]:
            page = case.params["page"]
            npp = math.ceil(Tk / page)
            g = torch.Generator(device="cpu").manual_seed(seed + 3)
            perm = torch.randperm(B * npp, generator=g).to(device)
            pad = npp * page - Tk

            def pages(t):
                t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
                t = t.reshape(B * npp, page, Hkv, D)
                out = torch.empty_like(t)
                out[perm] = t
                return out

            x["k_cache"], x["v_cache"] = pages(k), pages(v)
            x["block_table"] = perm.view(B, npp).to(torch.int32)
        else:
            x["k_cache"], x["v_cache"] = k, v
        return x

    def gold(self, case: Case, inputs, with_grads: bool):
        import torch
        from attnzoo.ops.attention.reference import attention_reference

        q, k, v = inputs["q"], inputs["k_full"], inputs["v_full"]
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        with torch.no_grad():
            for b in range(q.shape[0]):  # one batch entry at a time bounds the fp32 copies
                out[b:b + 1] = attention_reference(q[b:b + 1].float(), k[b:b + 1].float(), v[b:b + 1].float(), causal=True)
        return {"out": out, "grads": {}}


SUITE = DecodeSuite()


# ----------------------------------------------------------------------------------------------------
# decode suite: q [B, Tn, H, D]; k_cache/v_cache contiguous [B, Tk, Hkv, D] or paged
# [num_pages, page, Hkv, D] with block_table [B, pages]; cache_seqlens [B] (all full: Tk)


def decode_providers() -> List[Provider]:
    def contiguous_only(case):
        return "paged KV cache not supported by this provider" if case.params["paged"] else None

    def az(b):
        def build(case, x):
            import attnzoo

            return Built(lambda: attnzoo.attention_with_kvcache(
                x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"], block_table=x.get("block_table"),
                causal=True, backend=b))
        return build

    provs = attnzoo_providers(("attention_with_kvcache",), az)

    def fa2(case, x):
        from flash_attn import flash_attn_with_kvcache

        return Built(lambda: flash_attn_with_kvcache(
            x["q"], x["k_cache"], x["v_cache"], cache_seqlens=x["cache_seqlens"], block_table=x.get("block_table"),
            causal=True))
    provs.append(Provider("flash-attn", "peer", "flash-attn", fa2))

    def fa3(case, x):
        from flash_attn_interface import flash_attn_with_kvcache

        return Built(lambda: first_output(flash_attn_with_kvcache(
            x["q"], x["k_cache"], x["v_cache"], cache_seqlens=x["cache_seqlens"], page_table=x.get("block_table"),
            causal=True)))
    provs.append(Provider("flash-attn-3", "peer", "flash-attn-3", fa3))

    for name, backend in SDPA_BACKENDS:
        def build(case, x, backend=backend):
            import torch.nn.functional as F
            from torch.nn.attention.bias import causal_lower_right

            q, k, v = bhtd(x["q"]), bhtd(x["k_cache"]), bhtd(x["v_cache"])
            Tn, Tk = q.shape[2], k.shape[2]
            mask = causal_lower_right(Tn, Tk) if Tn > 1 else None
            kw = {"enable_gqa": True} if is_gqa(case) else {}
            return Built(lambda: bhtd(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)),
                         context=sdpa_context(backend))
        provs.append(Provider(name, "peer", "torch", build, supports=contiguous_only))

    def flex(case, x):
        q, k, v = bhtd(x["q"]), bhtd(x["k_cache"]), bhtd(x["v_cache"])
        fa = compiled_flex()
        Tn, Tk = q.shape[2], k.shape[2]
        off = Tk - Tn
        bm = flex_block_mask(lambda b, h, qi, ki: ki <= qi + off, None, None, Tn, Tk, q.device) if Tn > 1 else None
        kw = {"enable_gqa": True} if is_gqa(case) else {}
        return Built(lambda: bhtd(fa(q, k, v, block_mask=bm, **kw)))
    provs.append(Provider("flex", "peer", "torch", flex, supports=contiguous_only,
                          note="compiled flex_attention; short queries take its decode kernel"))

    def xf(case, x):
        import xformers.ops as xops

        q, k, v = xformers_layout(x["q"], x["k_cache"], x["v_cache"])
        bias = xops.LowerTriangularFromBottomRightMask() if x["q"].shape[1] > 1 else None
        shape = x["q"].shape
        return Built(lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias).reshape(*shape[:3], -1))
    provs.append(Provider("xformers", "peer", "xformers", xf, supports=contiguous_only))
    return provs
