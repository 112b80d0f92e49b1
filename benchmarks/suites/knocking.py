"""``knocking``: what each KHA form (``linear``, ``mlp``) costs on top of its base module.

Whole attention layers (projections, core, output projection) of width 2048 (16 heads of 128): MHA,
GQA (16/4) and MoH (when ``attnzoo.MoHAttention`` exists), causal, 16k tokens per batch at T = 2k and 8k,
forward and forward+backward. The providers are the base module and each KHA form built on the *same*
weights; at initialisation KHA equals its base (SPEC §4), which is the check before timing. The report
gives the overhead ``t_kha / t_base - 1`` (SPEC §4's target: about 1 % of the layer). TFLOP/s here counts
the base layer's FLOPs (useful work) for every form, so a KHA form's lower figure is its overhead.
"""

from __future__ import annotations

from typing import List

from benchmarks import flops as F
from benchmarks.suites.base import Case, Suite, fmt_tokens, randn, seed_of

TOKENS = 16384


class KnockingSuite(Suite):
    name = "knocking"
    description = "overhead of each KHA form (linear, mlp) against its base module (MHA, GQA, MoH)"
    grad_inputs = ("x",)

    def grid(self, level: str):
        if level == "tiny":
            return dict(dim=64, H=4, D=16, bases=(("mha", 4), ("gqa", 2)), seqs=(32,), tokens=64,
                        modes=("fwd", "fwd+bwd"))
        if level == "quick":
            return dict(dim=2048, H=16, D=128, bases=(("mha", 16),), seqs=(4096,), tokens=TOKENS, modes=("fwd+bwd",))
        return dict(dim=2048, H=16, D=128, bases=(("mha", 16), ("gqa", 4), ("moh", 16)), seqs=(2048, 8192),
                    tokens=TOKENS, modes=("fwd", "fwd+bwd"))

    def cases(self, level: str = "full") -> List[Case]:
        g = self.grid(level)
        dim, H, D = g["dim"], g["H"], g["D"]
        out = []
        for base, Hkv in g["bases"]:
            for mode in g["modes"]:
                group = f"{base.upper()} {mode} dim={dim} H={H}/{Hkv}"
                for T in g["seqs"]:
                    B = max(1, g["tokens"] // T)
                    out.append(Case(
                        suite=self.name, name=f"{group} T={fmt_tokens(T)}", group=group, x_name="T", x=T, mode=mode,
                        shape=dict(B=B, T=T, dim=dim, H=H, Hkv=Hkv, D=D), params=dict(base=base), metric="ms",
                        flops=F.mha_module_flops(B, T, dim, H, Hkv, D, causal=True, mode=mode), tokens=B * T,
                        input_key=(base, B, T, dim, H, Hkv),
                    ))
        return out

    def providers(self):
        from benchmarks.providers import knocking_providers

        return knocking_providers()

    def make_inputs(self, case: Case, device, dtype):
        s = case.shape
        seed = seed_of(self.name, case.input_key)
        return {
            "x": randn((s["B"], s["T"], s["dim"]), device=device, dtype=dtype, seed=seed),
            "dout": randn((s["B"], s["T"], s["dim"]), device=device, dtype=dtype, seed=seed + 1),
        }

    def gold(self, case: Case, inputs, with_grads: bool):
        import torch
        from benchmarks.providers import build_module

        mod = build_module(case, None, inputs["x"].device, torch.float32)
        mod.train(with_grads)
        x = inputs["x"].detach().float().requires_grad_(with_grads)
        with torch.enable_grad() if with_grads else torch.no_grad():
            out = mod(x)
            out = out[0] if isinstance(out, tuple) else out
            if with_grads:
                out.backward(inputs["dout"].float())
        return {"out": out.detach(), "grads": {"x": x.grad} if with_grads else {}}


SUITE = KnockingSuite()
