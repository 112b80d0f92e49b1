"""``knocking``: what each KHA form (``linear``, ``mlp``) costs on top of its base module.

Whole attention layers (projections, core, output projection) of width 2048 (16 heads of 128): MHA,
GQA (16/4) and MoH (when ``attnzoo.MoHAttention`` exists), causal, 16k tokens per batch at T = 2k and 8k,
forward and forward+backward. The providers are the base module and each KHA form built on the *same*
weights; at initialisation KHA equals its base (SPEC §4), which is the check before timing. The report
gives the overhead ``t_kha / t_base - 1`` (SPEC §4's target: about 1 % of the layer). TFLOP/s here counts
the base layer's FLOPs (useful work) for every form, so a KHA form's lower figure is its overhead.
"""

from __future__ import annotations

from typing import List, Optional

from benchmarks import flops as F
from benchmarks.providers import (
    Built,
    Provider,
    first_output,
    module_class,
)
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


# ----------------------------------------------------------------------------------------------------
# knocking suite: x [B, T, dim]; the module family (base vs each KHA form) is built per provider




def build_module(case, knocking: Optional[str], device, dtype):
    """The case's module with ``knocking`` (None = the base), carrying the base's weights: built in fp32
    from a fixed seed, then cast. KHA at initialisation equals its base (SPEC §4), which is the check."""
    import torch
    import attnzoo

    s = case.shape
    kw = dict(dim=s["dim"], num_heads=s["H"], num_kv_heads=s["Hkv"], causal=True)
    cls = module_class(case.params["base"])
    torch.manual_seed(1234)
    base = cls(**kw, device=device, dtype=torch.float32)
    if knocking is None:
        return base.to(dtype)
    try:
        mod = cls(**kw, knocking=knocking, device=device, dtype=torch.float32)
    except TypeError:
        kha = getattr(attnzoo, "KnockingHeadsAttention", None)
        if kha is None:
            raise NotImplementedError(f"{cls.__name__} takes no knocking= and attnzoo.KnockingHeadsAttention is missing")
        mod = kha(**kw, knocking=knocking, device=device, dtype=torch.float32)
    missing, unexpected = mod.load_state_dict(base.state_dict(), strict=False)
    if unexpected:
        raise RuntimeError(f"base weights do not fit the KHA module: unexpected {unexpected}")
    return mod.to(dtype)


def knocking_providers() -> List[Provider]:
    provs = []
    for form in (None, "linear", "mlp"):
        def build(case, x, form=form):
            mod = build_module(case, form, x["x"].device, x["x"].dtype)
            mod.train(case.needs_grad)
            return Built(lambda: first_output(mod(x["x"])), grad_to_none=list(mod.parameters()))
        name = "base" if form is None else f"kha-{form}"
        provs.append(Provider(name, "base" if form is None else "attnzoo", "attnzoo", build,
                              needs_cuda=False,
                              note="the unmodified module" if form is None else f"knocking='{form}' at init"))

    def folded(case, x):
        mod = build_module(case, "linear", x["x"].device, x["x"].dtype).fold()
        mod.train(case.needs_grad)
        return Built(lambda: first_output(mod(x["x"])), grad_to_none=list(mod.parameters()))

    provs.append(Provider("kha-linear-folded", "attnzoo", "attnzoo", folded, needs_cuda=False,
                          note="knocking='linear' after fold(): plain projections, no overhead"))
    return provs
