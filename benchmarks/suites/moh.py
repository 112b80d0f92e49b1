"""``moh``: Mixture-of-Head attention's core at active-head fractions 0.5 / 0.75 / 0.9 / 1.0.

32 heads of 128, causal, T = 4096 and 16384 at 16k tokens per batch. Every token activates the top
``round(fraction * H)`` heads of a random score (per-token routing, as the router produces), with gates in
[0.5, 1.5]; inactive (token, head) outputs are 0. attnzoo computes only active query rows; the peer is what
the MoH paper's code does -- dense attention for every head, then multiply by the gates -- whose cost
does not fall with the fraction. Reported: TFLOP/s dense-equivalent and effective (fraction x dense).
"""

from __future__ import annotations

from typing import List

from benchmarks import flops as F
from benchmarks.suites.base import Case, Suite, fmt_tokens, gold_attention, randn, seed_of

TOKENS = 16384
FRACTIONS = (0.5, 0.75, 0.9, 1.0)


class MoHSuite(Suite):
    name = "moh"
    description = "MoH attention at active-head fractions 0.5/0.75/0.9/1.0 vs dense-then-mask"
    grad_inputs = ("q", "k", "v", "gates")

    def grid(self, level: str):
        if level == "tiny":
            return dict(H=4, D=32, seqs=(64,), tokens=128, modes=("fwd", "fwd+bwd"), fractions=(0.5, 1.0))
        if level == "quick":
            return dict(H=32, D=128, seqs=(4096,), tokens=TOKENS, modes=("fwd",), fractions=FRACTIONS)
        return dict(H=32, D=128, seqs=(4096, 16384), tokens=TOKENS, modes=("fwd", "fwd+bwd"), fractions=FRACTIONS)

    def cases(self, level: str = "full") -> List[Case]:
        g = self.grid(level)
        H, D = g["H"], g["D"]
        out = []
        for T in g["seqs"]:
            B = max(1, g["tokens"] // T)
            for mode in g["modes"]:
                group = f"{mode} causal T={fmt_tokens(T)} H={H} D={D}"
                for frac in g["fractions"]:
                    k = max(1, round(frac * H))
                    dense, eff = F.moh_flops(B, H, T, D, k / H, causal=True, mode=mode)
                    out.append(Case(
                        suite=self.name, name=f"{group} active={frac}", group=group, x_name="active_fraction",
                        x=frac, mode=mode, shape=dict(B=B, T=T, H=H, Hkv=H, D=D),
                        params=dict(causal=True, active_heads=k), metric="ms", flops=dense, flops_effective=eff,
                        tokens=B * T, input_key=(B, T, H, D, k),
                    ))
        return out

    def providers(self):
        from benchmarks.providers import moh_providers

        return moh_providers()

    def make_inputs(self, case: Case, device, dtype):
        import torch

        s = case.shape
        B, T, H, D = s["B"], s["T"], s["H"], s["D"]
        k = case.params["active_heads"]
        seed = seed_of(self.name, case.input_key)
        gen = torch.Generator(device="cpu").manual_seed(seed + 4)
        score = torch.rand(B, T, H, generator=gen)
        top = score.topk(k, dim=-1).indices
        active = torch.zeros(B, T, H, dtype=torch.bool).scatter_(-1, top, True)
        gates = torch.where(active, 0.5 + torch.rand(B, T, H, generator=gen), torch.zeros(()))
        return {
            "q": randn((B, T, H, D), device=device, dtype=dtype, seed=seed),
            "k": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 1),
            "v": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 2),
            "gates": gates.to(device=device, dtype=dtype),
            "dout": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 3),
        }

    def gold(self, case: Case, inputs, with_grads: bool):
        dout = inputs["dout"]
        gates = inputs["gates"].float()
        # o = g * attn  =>  d(attn) = g * dO, dgate = rowsum(dO * attn)
        attn, grads = gold_attention(inputs["q"], inputs["k"], inputs["v"], causal=True,
                                     dout=(dout.float() * gates.unsqueeze(-1)) if with_grads else None)
        out = attn * gates.unsqueeze(-1)
        if with_grads:
            grads["gates"] = self.canonical_grad("gates", (dout.float() * attn).sum(-1), inputs)
        return {"out": out, "grads": grads or {}}

    def canonical_grad(self, name, grad, inputs):
        # an inactive head's gate is a constant 0 produced by the top-k; its gradient is never used, and a
        # kernel that skips inactive rows cannot (and need not) produce it: compare active entries only
        if name == "gates" and grad is not None:
            return grad * (inputs["gates"] != 0).to(grad.dtype)
        return grad


SUITE = MoHSuite()
