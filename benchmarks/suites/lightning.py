"""``lightning``: lightning (linear) attention, 1k..128k tokens per sequence, forward and
forward+backward, plus the per-token decode step (one token against a recurrent state).

32 heads of 128 (a 4096-wide model, issue 5's target shape), 128k tokens per batch (B = 131072 / T), decay = the ``"alibi"``
preset of SPEC §6 for layer 0 (``s_h = 2^(-8h/H)``, h = 1..H), scale 1.0 (the paper's form). The gold
answer is an independent fp32 chunked evaluation of SPEC §6's recurrence written here, so a provider that
uses another decay convention (e.g. ``lambda = s`` instead of ``exp(-s)``) shows up as a mismatch.
"""

from __future__ import annotations

from typing import List

from benchmarks import flops as F
from benchmarks.providers import (
    Built,
    Provider,
    attnzoo_backends,
    attnzoo_fn,
    attnzoo_providers,
    bhtd,
    first_output,
    fla_decay_kwargs,
    ordered_union,
)
from benchmarks.suites.base import Case, Suite, fmt_tokens, randn, seed_of

TOKENS = 131072


def alibi_decay(H: int):
    """``s_h = 2^(-8 h / H)``, h = 1..H (H a power of two; the benchmark only uses those)."""
    import torch

    return torch.tensor([2.0 ** (-8.0 * h / H) for h in range(1, H + 1)], dtype=torch.float32)


def lightning_gold(q, k, v, s, *, scale=1.0, initial_state=None, chunk: int = 64):
    """fp32 ``o_t = scale * q_t S_t``, ``S_t = exp(-s) S_{t-1} + k_t^T v_t`` by chunks of ``chunk`` tokens
    (intra-chunk masked quadratic form, inter-chunk state). Differentiable. Returns ``(o, final_state)``."""
    import torch

    B, T, H, D = q.shape
    Dv = v.shape[-1]
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    log_l = -s.float().to(q.device).view(1, H, 1, 1)
    state = (torch.zeros(B, H, D, Dv, device=q.device) if initial_state is None else initial_state.float())
    outs = []
    for t0 in range(0, T, chunk):
        qc, kc, vc = q[:, :, t0:t0 + chunk], k[:, :, t0:t0 + chunk], v[:, :, t0:t0 + chunk]
        C = qc.shape[2]
        i = torch.arange(C, device=q.device, dtype=torch.float32)
        diff = i.view(C, 1) - i.view(1, C)
        decay = torch.where(diff >= 0, torch.exp(log_l * diff.clamp_min(0)), torch.zeros((), device=q.device))
        intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
        inter = (qc * torch.exp(log_l * (i + 1).view(1, 1, C, 1))) @ state
        outs.append(scale * (intra + inter))
        kdec = kc * torch.exp(log_l * (C - 1 - i).view(1, 1, C, 1))
        state = torch.exp(log_l * C) * state + kdec.transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2).transpose(1, 2)
    return o, state


class LightningSuite(Suite):
    name = "lightning"
    description = "lightning attention: 1k..128k tokens fwd and fwd+bwd, plus the per-token decode step"
    # long linear recurrences accumulate more bf16 rounding than softmax rows do
    out_tol = {"bfloat16": 3e-2, "float16": 1e-2, "float32": 1e-3}
    grad_tol = {"bfloat16": 8e-2, "float16": 3e-2, "float32": 2e-3}

    def grid(self, level: str):
        if level == "tiny":
            return dict(H=2, D=16, seqs=(32, 64), tokens=128, modes=("fwd", "fwd+bwd"), step_batches=(2,))
        if level == "quick":
            return dict(H=32, D=128, seqs=(2048, 131072), tokens=TOKENS, modes=("fwd", "fwd+bwd"), step_batches=(16,))
        return dict(H=32, D=128, seqs=(1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072), tokens=TOKENS,
                    modes=("fwd", "fwd+bwd"), step_batches=(1, 8, 16, 64, 256))

    def cases(self, level: str = "full") -> List[Case]:
        g = self.grid(level)
        H, D = g["H"], g["D"]
        out = []
        for mode in g["modes"]:
            group = f"{mode} H={H} D={D}"
            for T in g["seqs"]:
                B = max(1, g["tokens"] // T)
                out.append(Case(
                    suite=self.name, name=f"{group} T={fmt_tokens(T)}", group=group, x_name="T", x=T, mode=mode,
                    shape=dict(B=B, T=T, H=H, D=D), params=dict(decay="alibi", scale=1.0), metric="tflops",
                    flops=F.linear_attention_flops(B, T, H, D, mode=mode), tokens=B * T, input_key=(B, T, H, D),
                ))
        for B in g["step_batches"]:
            group = f"decode step H={H} D={D}"
            out.append(Case(
                suite=self.name, name=f"{group} B={B}", group=group, x_name="B", x=B, mode="step",
                shape=dict(B=B, T=1, H=H, D=D), params=dict(decay="alibi", scale=1.0), metric="gbps",
                flops=F.linear_attention_flops(B, 1, H, D), bytes=F.linear_decode_bytes(B, H, D, elem=2), tokens=B,
                input_key=("step", B, H, D),
            ))
        return out

    def providers(self):
        return lightning_providers()

    def make_inputs(self, case: Case, device, dtype):
        s = case.shape
        B, T, H, D = s["B"], s["T"], s["H"], s["D"]
        seed = seed_of(self.name, case.input_key)
        # unit-norm-ish rows keep the unnormalised linear recurrence in a sane range at 128k tokens
        x = {
            "q": randn((B, T, H, D), device=device, dtype=dtype, seed=seed, scale=D ** -0.5),
            "k": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 1, scale=D ** -0.5),
            "v": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 2),
            "s": alibi_decay(H).to(device),
            "dout": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 3),
        }
        if case.mode == "step":
            import torch

            x["state"] = randn((B, H, D, D), device=device, dtype=torch.float32, seed=seed + 4)
        return x

    def gold(self, case: Case, inputs, with_grads: bool):
        import torch

        if case.mode == "step":
            with torch.no_grad():
                o, st = lightning_gold(inputs["q"], inputs["k"], inputs["v"], inputs["s"], initial_state=inputs["state"])
            return {"out": (o, st), "grads": {}}
        if not with_grads:
            with torch.no_grad():
                o, _ = lightning_gold(inputs["q"], inputs["k"], inputs["v"], inputs["s"])
            return {"out": o, "grads": {}}
        leaves = {n: inputs[n].detach().float().requires_grad_(True) for n in ("q", "k", "v")}
        with torch.enable_grad():
            o, _ = lightning_gold(leaves["q"], leaves["k"], leaves["v"], inputs["s"])
            o.backward(inputs["dout"].float())
        return {"out": o.detach(), "grads": {n: t.grad for n, t in leaves.items()}}


SUITE = LightningSuite()


# ----------------------------------------------------------------------------------------------------
# lightning suite: q, k, v [B, T, H, D]; decay s [H] fp32 (lambda = exp(-s)); scale 1.0.
# mode "step": T = 1 with initial_state [B, H, D, Dv] fp32; outputs (o, new_state)


def _lightning_fn(name: str):
    try:
        return attnzoo_fn(name)
    except NotImplementedError:
        try:
            from attnzoo.ops.lightning import api
        except Exception:  # noqa: BLE001
            raise NotImplementedError(f"attnzoo.{name} does not exist yet") from None
        if not hasattr(api, name):
            raise NotImplementedError(f"attnzoo.{name} does not exist yet") from None
        return getattr(api, name)


def lightning_providers() -> List[Provider]:
    chunk_backends = attnzoo_backends("lightning_attention")
    step_backends = attnzoo_backends("lightning_decode")

    def az(b):
        def build(case, x):
            if case.mode == "step":
                # lightning_decode updates the state in place: give it its own copy; outputs (o, new state)
                f = _lightning_fn("lightning_decode")
                state = x["state"].clone()
                return Built(lambda: (f(x["q"], x["k"], x["v"], state, decay=x["s"], scale=1.0, backend=b), state))
            f = _lightning_fn("lightning_attention")
            return Built(lambda: first_output(f(x["q"], x["k"], x["v"], decay=x["s"], scale=1.0, backend=b)))
        return build

    def supports(b):
        def sup(case):
            have = step_backends if case.mode == "step" else chunk_backends
            if b not in have:
                return f"attnzoo has no {b} backend for {'lightning_decode' if case.mode == 'step' else 'lightning_attention'}"
            return None
        return sup

    provs = []
    for b in ordered_union(chunk_backends, step_backends):
        p = attnzoo_providers(("lightning_attention", "lightning_decode"), az, only=b, supports=supports(b))
        provs += p

    def az_unsegmented(case, x):
        # the Triton kernels with every sequence walked by one program per state slice (no segments):
        # against attnzoo-triton it shows what cutting long sequences into parallel segments buys
        from attnzoo.ops.lightning import triton_backend as tb

        f = _lightning_fn("lightning_attention")

        def run():
            tb.SEGMENTS = 1
            try:
                return first_output(f(x["q"], x["k"], x["v"], decay=x["s"], scale=1.0, backend="triton"))
            finally:
                tb.SEGMENTS = None
        return Built(run)
    if "triton" in chunk_backends:
        provs.append(Provider("attnzoo-triton-unsegmented", "attnzoo", "attnzoo", az_unsegmented,
                              applies=lambda c: c.mode != "step", note="segments=1"))

    def fla_chunk(case, x):
        from fla.ops.simple_gla import chunk_simple_gla

        kw = fla_decay_kwargs(chunk_simple_gla, x["s"], x["q"].shape)
        return Built(lambda: first_output(chunk_simple_gla(x["q"], x["k"], x["v"], scale=1.0, **kw)))
    provs.append(Provider("fla-chunk", "peer", "fla-core", fla_chunk,
                          applies=lambda c: c.mode != "step",
                          note="chunk_simple_gla(g_gamma=-s)"))

    def fla_rec(case, x):
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        kw = fla_decay_kwargs(fused_recurrent_simple_gla, x["s"], x["q"].shape)
        return Built(lambda: fused_recurrent_simple_gla(x["q"], x["k"], x["v"], scale=1.0, initial_state=x["state"],
                                                        output_final_state=True, **kw))
    provs.append(Provider("fla-recurrent", "peer", "fla-core", fla_rec,
                          applies=lambda c: c.mode == "step",
                          note="fused_recurrent_simple_gla(g_gamma=-s)"))

    def la(case, x):
        from lightning_attn.ops import lightning_attn_func

        leaves = {n: bhtd(x[n]).detach().contiguous().requires_grad_(x[n].requires_grad) for n in ("q", "k", "v")}
        s = x["s"].view(-1, 1, 1).float().contiguous()
        return Built(lambda: bhtd(lightning_attn_func(leaves["q"], leaves["k"], leaves["v"], s)),
                     leaves=leaves if case.needs_grad else {}, grad_to_canonical=lambda n, g: bhtd(g))
    provs.append(Provider("lightning-attn", "peer", "lightning-attn", la,
                          supports=lambda c: "lightning-attn has no decode-step op" if c.mode == "step" else None,
                          note="lightning_attn_func (BHTD copies made outside the timing)"))
    return provs
