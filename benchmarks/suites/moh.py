"""``moh``: Mixture-of-Head attention (SPEC §3) -- the head-sparse core, the whole layer and decode.

Three kinds of case (``case.params["kind"]``), each its own groups:

- ``core``: the attention core at active-head fractions rho = 0.5 / 0.75 / 0.9 / 1.0, causal, 16k tokens
  per batch at T = 2k..16k, head dims 64 and 128 with 16 or 32 heads, forward and forward+backward. Every
  token activates the top ``round(rho * H)`` heads of a random score (per-token routing, as the router
  produces) with gates in [0.5, 1.5]; inactive (token, head) outputs are 0. At rho = 1 every gate is
  exactly 1 (MoH with every head active is MHA), so ``attnzoo-dense-core`` -- attnzoo's own dense
  ``attention`` (triton) on the same q, k, v, no gates -- computes the same function there and is timed
  in that row: the denominator of the target ``t_moh(rho) <= (rho + 0.1) * t_dense_core``
  (:func:`dense_core_ratios`). (The gate gradient is not compared at rho = 1: a gate-free provider has
  none, and every gate is the constant 1.) Peers do what the MoH paper's code does -- dense attention for
  every head, then multiply by the gates -- whose cost does not fall with rho. TFLOP/s dense-equivalent
  and effective (rho x dense).
- ``layer``: a whole ``MoHAttention`` layer (projections, learned router, core, output projection), dim =
  H x 128, T = 8k, no shared heads and ``top_k = rho * H`` so that exactly rho of the heads of every token
  are active. Routing is deterministic and identical in every precision: the router weight is 0.5 x a
  one-hot per head (head h reads input feature h) and the first H features of every token of ``x`` are a
  random permutation of ``(i - H/2) / 8`` (distinct, exact in bf16). attnzoo's module (backend per
  provider) against the dense-then-mask layer: the same module class and weights with ``_attend``
  computing every head densely (SDPA / flash-attn) and then multiplying by the gates. Checked against the
  fp32 reference-backend module (bounded-memory when the reference's score matrices would be too big).
- ``decode``: one new token per sequence (B = 16) against a KV cache of 4k..32k tokens, 32 query / 8 kv
  heads of 128, causal (the new token sees the whole cache). Half of each token's query heads are active;
  x = the fraction of kv groups with no active query head (0, 0.25, 0.5) -- the kv heads whose K/V a
  head-sparse kernel need not read. attnzoo's ``moh_attention`` with Tq = 1 (no gradient, so its Triton
  backend takes the split-K decode kernel with gates: one read per GQA group, idle kv groups never read)
  against dense decode (SDPA / flash-attn) then mask, whose cost does not fall with x. Bytes are the dense
  decode's (SPEC §2).
"""

from __future__ import annotations

import contextlib
import functools

from typing import Any, Callable, Dict, List, Optional, Tuple

from benchmarks import flops as F
from benchmarks.providers import (
    Built,
    Provider,
    SDPA_BACKENDS,
    attnzoo_backends,
    attnzoo_fn,
    attnzoo_providers,
    bhtd,
    first_output,
    module_class,
    reference_memory_reason,
    sdpa_context,
)
from benchmarks.suites.base import Case, Suite, fmt_tokens, gold_attention, randn, seed_of

TOKENS = 16384
FRACTIONS = (0.5, 0.75, 0.9, 1.0)
LAYER_HEAD_DIM = 128
ROUTER_SCALE = 0.5  # router weight: ROUTER_SCALE x one-hot (a power of two: exact in every dtype)
DECODE_ACTIVE = 0.5  # decode: fraction of each token's query heads that are active
IDLE_FRACTIONS = (0.0, 0.25, 0.5)  # decode: fraction of kv groups without an active query head


def active_heads(frac: float, H: int) -> int:
    return max(1, round(frac * H))


class MoHSuite(Suite):
    name = "moh"
    description = ("MoH: head-sparse core at rho 0.5-1.0 vs dense-then-mask and attnzoo's dense core; the whole "
                   "layer vs a dense-then-mask layer; decode vs idle kv groups")
    grad_inputs = ("q", "k", "v", "gates", "x")

    def grid(self, level: str) -> Dict[str, Any]:
        if level == "tiny":
            return dict(
                core=dict(heads=((4, 32),), seqs=(64,), tokens=128, modes=("fwd", "fwd+bwd"), fractions=(0.5, 1.0)),
                layer=dict(heads=(4,), D=16, seqs=(64,), B=1, modes=("fwd", "fwd+bwd"), fractions=(0.5, 1.0)),
                decode=dict(B=2, H=8, Hkv=2, D=16, caches=(64,), active=DECODE_ACTIVE, idle=(0.0, 0.5)),
            )
        if level == "quick":
            return dict(
                core=dict(heads=((32, 128),), seqs=(4096,), tokens=TOKENS, modes=("fwd", "fwd+bwd"),
                          fractions=FRACTIONS),
                layer=dict(heads=(16,), D=LAYER_HEAD_DIM, seqs=(8192,), B=1, modes=("fwd+bwd",), fractions=(0.5, 1.0)),
                decode=dict(B=16, H=32, Hkv=8, D=128, caches=(8192,), active=DECODE_ACTIVE, idle=IDLE_FRACTIONS),
            )
        return dict(
            core=dict(heads=((32, 128), (16, 128), (32, 64)), seqs=(2048, 4096, 8192, 16384), tokens=TOKENS,
                      modes=("fwd", "fwd+bwd"), fractions=FRACTIONS),
            layer=dict(heads=(16, 32), D=LAYER_HEAD_DIM, seqs=(8192,), B=1, modes=("fwd", "fwd+bwd"),
                       fractions=FRACTIONS),
            decode=dict(B=16, H=32, Hkv=8, D=128, caches=(4096, 8192, 16384, 32768), active=DECODE_ACTIVE,
                        idle=IDLE_FRACTIONS),
        )

    # -- cases ----------------------------------------------------------------------------------------
    def cases(self, level: str = "full") -> List[Case]:
        g = self.grid(level)
        return self.core_cases(g["core"]) + self.layer_cases(g["layer"]) + self.decode_cases(g["decode"])

    def core_cases(self, g) -> List[Case]:
        out = []
        for H, D in g["heads"]:
            for T in g["seqs"]:
                B = max(1, g["tokens"] // T)
                for mode in g["modes"]:
                    group = f"{mode} causal T={fmt_tokens(T)} H={H} D={D}"
                    for frac in g["fractions"]:
                        k = active_heads(frac, H)
                        unit = k == H  # every head active: unit gates, the dense core's row
                        dense, eff = F.moh_flops(B, H, T, D, k / H, causal=True, mode=mode)
                        out.append(Case(
                            suite=self.name, name=f"{group} active={frac}", group=group, x_name="active_fraction",
                            x=frac, mode=mode, shape=dict(B=B, T=T, H=H, Hkv=H, D=D),
                            params=dict(kind="core", causal=True, active_heads=k, unit_gates=unit), metric="ms",
                            flops=dense, flops_effective=eff, tokens=B * T, input_key=("core", B, T, H, D, k),
                        ))
        return out

    def layer_cases(self, g) -> List[Case]:
        out = []
        D = g["D"]
        for H in g["heads"]:
            dim = H * D
            for T in g["seqs"]:
                B = g["B"]
                for mode in g["modes"]:
                    group = f"layer {mode} causal T={fmt_tokens(T)} dim={dim} H={H} D={D}"
                    for frac in g["fractions"]:
                        k = active_heads(frac, H)
                        dense, eff = F.moh_module_flops(B, T, dim, H, H, D, k / H, routed_heads=H, causal=True,
                                                        mode=mode)
                        out.append(Case(
                            suite=self.name, name=f"{group} active={frac}", group=group, x_name="active_fraction",
                            x=frac, mode=mode, shape=dict(B=B, T=T, dim=dim, H=H, Hkv=H, D=D),
                            params=dict(kind="layer", causal=True, active_heads=k, top_k=k, num_shared_heads=0),
                            metric="ms", flops=dense, flops_effective=eff, tokens=B * T,
                            input_key=("layer", B, T, dim, H, D, k),
                        ))
        return out

    def decode_cases(self, g) -> List[Case]:
        out = []
        B, H, Hkv, D = g["B"], g["H"], g["Hkv"], g["D"]
        rep = H // Hkv
        k = active_heads(g["active"], H)
        for Tk in g["caches"]:
            group = f"decode B={B} cache={fmt_tokens(Tk)} H={H}/{Hkv} D={D} active={g['active']}"
            for idle in g["idle"]:
                n_idle = round(idle * Hkv)
                busy = Hkv - n_idle
                if not busy <= k <= busy * rep:
                    raise ValueError(f"decode: {k} active heads cannot fill exactly {busy} of {Hkv} kv groups of {rep}")
                out.append(Case(
                    suite=self.name, name=f"{group} idle_kv={idle}", group=group, x_name="idle_kv_fraction",
                    x=idle, mode="decode", shape=dict(B=B, Tn=1, Tk=Tk, H=H, Hkv=Hkv, D=D),
                    params=dict(kind="decode", causal=True, active_heads=k, idle_kv_groups=n_idle), metric="ms",
                    bytes=F.decode_bytes(B, 1, H, Hkv, D, cache_lens=Tk, elem=2), tokens=B,
                    input_key=("decode", B, Tk, H, Hkv, D, k, n_idle),
                ))
        return out

    def providers(self):
        return moh_providers()

    # -- inputs ---------------------------------------------------------------------------------------
    def make_inputs(self, case: Case, device, dtype):
        kind = case.params["kind"]
        seed = seed_of(self.name, case.input_key)
        if kind == "layer":
            return layer_inputs(case, device, dtype, seed)
        s = case.shape
        if kind == "decode":
            B, Tk, H, Hkv, D = s["B"], s["Tk"], s["H"], s["Hkv"], s["D"]
            active = decode_active(B, H, Hkv, case.params["active_heads"], case.params["idle_kv_groups"], seed + 4)
            return {
                "q": randn((B, 1, H, D), device=device, dtype=dtype, seed=seed),
                "k": randn((B, Tk, Hkv, D), device=device, dtype=dtype, seed=seed + 1),
                "v": randn((B, Tk, Hkv, D), device=device, dtype=dtype, seed=seed + 2),
                "gates": gates_for(active, unit=False, seed=seed + 5).to(device=device, dtype=dtype),
            }
        B, T, H, D = s["B"], s["T"], s["H"], s["D"]
        active = core_active(B, T, H, case.params["active_heads"], seed + 4)
        return {
            "q": randn((B, T, H, D), device=device, dtype=dtype, seed=seed),
            "k": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 1),
            "v": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 2),
            "gates": gates_for(active, unit=case.params["unit_gates"], seed=seed + 5).to(device=device, dtype=dtype),
            "dout": randn((B, T, H, D), device=device, dtype=dtype, seed=seed + 3),
        }

    # -- gold -----------------------------------------------------------------------------------------
    def gold(self, case: Case, inputs, with_grads: bool):
        kind = case.params["kind"]
        if kind == "layer":
            return layer_gold(case, inputs, with_grads)
        gates = inputs["gates"].float()
        if kind == "decode":
            attn, _ = gold_attention(inputs["q"], inputs["k"], inputs["v"], causal=True)
            return {"out": attn * gates.unsqueeze(-1), "grads": {}}
        dout = inputs["dout"]
        # o = g * attn  =>  d(attn) = g * dO, dgate = rowsum(dO * attn)
        attn, grads = gold_attention(inputs["q"], inputs["k"], inputs["v"], causal=True,
                                     dout=(dout.float() * gates.unsqueeze(-1)) if with_grads else None)
        out = attn * gates.unsqueeze(-1)
        if with_grads and not case.params["unit_gates"]:
            grads["gates"] = self.canonical_grad("gates", (dout.float() * attn).sum(-1), inputs)
        return {"out": out, "grads": grads or {}}

    def canonical_grad(self, name, grad, inputs):
        # an inactive head's gate is a constant 0 produced by the top-k; its gradient is never used, and a
        # kernel that skips inactive rows cannot (and need not) produce it: compare active entries only
        if name == "gates" and grad is not None:
            return grad * (inputs["gates"] != 0).to(grad.dtype)
        return grad


# ----------------------------------------------------------------------------------------------------
# routing patterns (CPU generators: identical on every device)


def core_active(B: int, T: int, H: int, k: int, seed: int):
    """``[B, T, H]`` bool: each token's top ``k`` heads of a random score."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    top = torch.rand(B, T, H, generator=gen).topk(k, dim=-1).indices
    return torch.zeros(B, T, H, dtype=torch.bool).scatter_(-1, top, True)


def decode_active(B: int, H: int, Hkv: int, k: int, n_idle: int, seed: int):
    """``[B, 1, H]`` bool with exactly ``k`` active query heads per sequence, spread so that exactly
    ``n_idle`` of the ``Hkv`` kv groups (contiguous groups of ``H / Hkv`` query heads, SPEC §0) have none
    and every other group has at least one."""
    import torch

    rep = H // Hkv
    busy = Hkv - n_idle
    if not busy <= k <= busy * rep:
        raise ValueError(f"{k} active heads cannot fill exactly {busy} of {Hkv} groups of {rep}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    active = torch.zeros(B, 1, H, dtype=torch.bool)
    for b in range(B):
        groups = torch.randperm(Hkv, generator=gen)[:busy]
        # one head in each busy group, then the rest at random among the busy groups' other heads
        first = groups * rep + torch.randint(rep, (busy,), generator=gen)
        active[b, 0, first] = True
        pool = (groups.view(-1, 1) * rep + torch.arange(rep)).reshape(-1)
        pool = pool[~active[b, 0, pool]]
        extra = pool[torch.randperm(pool.numel(), generator=gen)[:k - busy]]
        active[b, 0, extra] = True
    return active


def gates_for(active, *, unit: bool, seed: int):
    """fp32 gates: 0 where inactive; 1 (``unit``) or uniform in [0.5, 1.5] where active."""
    import torch

    if unit:
        return active.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.where(active, 0.5 + torch.rand(active.shape, generator=gen), torch.zeros(()))


def router_features(B: int, T: int, H: int, seed: int):
    """``[B, T, H]`` fp32: per token a random permutation of ``(i - H/2) / 8``: distinct router logits that
    every dtype represents exactly, so top-k routing cannot differ between precisions or kernels."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.rand(B, T, H, generator=gen).argsort(dim=-1)
    return (perm.float() - H // 2) / 8.0


def layer_inputs(case: Case, device, dtype, seed: int):
    s = case.shape
    B, T, dim, H = s["B"], s["T"], s["dim"], s["H"]
    x = randn((B, T, dim), device="cpu", dtype=dtype, seed=seed)
    x[..., :H] = router_features(B, T, H, seed + 2).to(dtype)
    return {
        "x": x.to(device),
        "dout": randn((B, T, dim), device=device, dtype=dtype, seed=seed + 1),
    }


def layer_gold(case: Case, inputs, with_grads: bool):
    """fp32: the reference-backend module, or (when its score matrices would not fit) the same module with a
    bounded-memory reference core; same weights as every provider."""
    from dataclasses import replace

    import torch

    x0 = inputs["x"]
    # the gold of an input key is made with gradients when any case of that key needs them
    if reference_memory_reason(replace(case, mode="fwd+bwd" if with_grads else "fwd")) is None:
        mod = build_moh_layer(case, x0.device, torch.float32, backend="reference")
    else:
        mod = build_moh_layer(case, x0.device, torch.float32, core=gold_core)
    mod.train(with_grads)
    x = x0.detach().float().requires_grad_(with_grads)
    with torch.enable_grad() if with_grads else torch.no_grad():
        out = mod(x)
        if with_grads:
            out.backward(inputs["dout"].float())
    return {"out": out.detach(), "grads": {"x": x.grad} if with_grads else {}}


# ----------------------------------------------------------------------------------------------------
# the target, read from a results file


def dense_core_ratios(records, provider: str = "attnzoo-triton",
                      denominator: str = "attnzoo-dense-core") -> Dict[Tuple[str, float], float]:
    """``{(group, rho): t(provider at rho) / t(denominator at rho = 1)}`` over the core groups of one results
    file's records: attnzoo's MoH core against its own dense core with every head (target: <= rho + 0.1)."""
    dense: Dict[str, float] = {}
    mine: Dict[Tuple[str, float], float] = {}
    for r in records:
        if r.get("params", {}).get("kind") != "core" or r.get("status") != "ok" or not r.get("ms"):
            continue
        if r["provider"] == denominator and r["x"] == 1.0:
            dense[r["group"]] = r["ms"]
        elif r["provider"] == provider:
            mine[(r["group"], r["x"])] = r["ms"]
    return {key: ms / dense[key[0]] for key, ms in mine.items() if key[0] in dense}


SUITE = MoHSuite()


# ----------------------------------------------------------------------------------------------------
# moh suite (benchmarks/suites/moh.py), by ``case.params["kind"]``:
# - "core": q, k, v [B, T, H, D], gates [B, T, H] (0 = inactive head for that token);
# - "decode": q [B, 1, H, D] against the cache k, v [B, Tk, Hkv, D], gates [B, 1, H] (causal: the new token
#   sees the whole cache);
# - "layer": x [B, T, dim] into a MoHAttention built per provider (build_moh_layer): attnzoo's module with a
#   backend, or the same module and weights with a dense-then-mask core.

DENSE_CORE = "attnzoo-dense-core"


def _moh_kind(*kinds):
    return lambda case: case.params.get("kind", "core") in kinds


def sdpa_dense_then_mask(q, k, v, gates, *, causal: bool, scale=None, backend: Optional[str] = None):
    """MoH the way the MoH paper's code does it: SDPA over every head (BTHD <-> BHTD views; ``enable_gqa``
    when kv heads are shared), then the output times the gates. ``backend`` pins an SDPA backend for this
    call; the providers instead pin it once around check and timing (``Built.context``), keeping
    ``sdpa_kernel``'s host cost out of short (decode) timings."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    Tq, Tk = q.shape[1], k.shape[1]
    if causal and Tq not in (1, Tk):
        raise NotImplementedError(f"dense-then-mask SDPA: bottom-right causal with Tq={Tq} != Tk={Tk}")
    # one query against the cache sees every key (bottom-right causal); SDPA's is_causal is top-left
    is_causal = causal and Tq == Tk
    kw = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
    with sdpa_kernel([getattr(SDPBackend, backend)]) if backend else contextlib.nullcontext():
        o = F.scaled_dot_product_attention(bhtd(q), bhtd(k), bhtd(v), is_causal=is_causal, scale=scale, **kw)
    return bhtd(o) * gates.unsqueeze(-1).to(o.dtype)


def flash_attn_dense_then_mask(q, k, v, gates, *, causal: bool, scale=None):
    """Dense-then-mask with flash-attn 2 (bottom-right causal, GQA native)."""
    from flash_attn import flash_attn_func

    o = flash_attn_func(q, k, v, causal=causal, softmax_scale=scale)
    return o * gates.unsqueeze(-1).to(o.dtype)


def gold_core(q, k, v, gates, *, causal: bool, scale=None):
    """fp32 MoH core with bounded memory, differentiable: :func:`gold_attention` one kv head at a time (the
    backward recomputes it), times the gates with the reference's gradient contract (inactive gates get
    none). For the layer group's gold where the reference backend would materialise too much."""
    import torch

    from benchmarks.suites.base import gold_attention

    class _Gold(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return gold_attention(q, k, v, causal=causal, scale=scale)[0]

        @staticmethod
        def backward(ctx, dout):
            g = gold_attention(*ctx.saved_tensors, causal=causal, scale=scale, dout=dout)[1]
            return g["q"], g["k"], g["v"]

    o = _Gold.apply(q.float(), k.float(), v.float())
    gates = torch.where(gates != 0, gates, gates.detach())
    return o * gates.unsqueeze(-1).to(o.dtype)


@functools.lru_cache(None)
def _bench_moh_class():
    base = module_class("moh")

    class BenchMoHAttention(base):
        """``MoHAttention`` whose attention core can be replaced (benchmarks only): with ``self.core`` set,
        ``_attend`` routes as the library does and then calls ``core(q, k, v, gates, causal=, scale=)``."""

        core = None

        def _attend(self, x, q, k, v, key_padding_mask, extras, query_mask, q_raw):
            if self.core is None:
                return super()._attend(x, q, k, v, key_padding_mask, extras, query_mask, q_raw)
            if key_padding_mask is not None or query_mask is not None or tuple(self.window) != (-1, -1):
                raise NotImplementedError("a replaced MoH core takes no padding mask and no window")
            gates = self.route(x, q_raw, query_mask)
            self.last_gates = gates.detach()
            return self.core(q, k, v, gates, causal=self.causal, scale=self.scale)

    return BenchMoHAttention


def build_moh_layer(case, device, dtype, *, backend: str = "auto", core: Optional[Callable] = None):
    """The layer group's ``MoHAttention``: built in fp32 from a fixed seed (so every provider and the gold
    share the weights), then cast. No biases, causal, ``num_shared_heads`` / ``top_k`` from the case. The
    routed router weight is ``ROUTER_SCALE`` x a one-hot (routed head ``i`` reads input feature
    ``num_shared + i``): with the suite's inputs, routing is deterministic and exact in every dtype.
    ``core``: None (the library's ``moh_attention`` with ``backend``) or a replacement core
    (:func:`sdpa_dense_then_mask`, :func:`flash_attn_dense_then_mask`, :func:`gold_core`)."""
    import torch

    s, p = case.shape, case.params
    cls = _bench_moh_class()
    torch.manual_seed(1234)
    mod = cls(dim=s["dim"], num_heads=s["H"], num_kv_heads=s["Hkv"], head_dim=s["D"], causal=True, backend=backend,
              num_shared_heads=p["num_shared_heads"], top_k=p["top_k"], router="learned", device=device,
              dtype=torch.float32)
    hs = mod.num_shared_heads
    with torch.no_grad():
        w = mod.router_routed
        if w is not None:
            w.zero_()
            idx = torch.arange(w.shape[0], device=w.device)
            w[idx, hs + idx] = ROUTER_SCALE
    mod = mod.to(dtype)
    mod.core = core
    return mod


def moh_providers() -> List[Provider]:
    def run_layer(case, x, mod):
        mod.train(case.needs_grad)
        return Built(lambda: mod(x["x"]), grad_to_none=list(mod.parameters()))

    def az(b):
        def build(case, x):
            if case.params.get("kind") == "layer":
                return run_layer(case, x, build_moh_layer(case, x["x"].device, x["x"].dtype, backend=b))
            f = attnzoo_fn("moh_attention")
            causal = case.params["causal"]
            return Built(lambda: first_output(f(x["q"], x["k"], x["v"], x["gates"], causal=causal, backend=b)))
        return build

    provs = attnzoo_providers(("moh_attention", "moh"), az)

    def dense_core(case, x):
        import attnzoo

        causal = case.params["causal"]
        return Built(lambda: attnzoo.attention(x["q"], x["k"], x["v"], causal=causal, backend="triton"))
    provs.append(Provider(
        DENSE_CORE, "base", "attnzoo", dense_core,
        supports=lambda c: None if "triton" in attnzoo_backends("attention") else "attnzoo has no triton attention",
        applies=lambda c: c.params.get("kind", "core") == "core" and bool(c.params.get("unit_gates")),
        note="attnzoo.attention(backend='triton'), every head, no gates: the rho=1 denominator (rho=1 rows only)",
    ))

    def dense_then_mask(core, context=contextlib.nullcontext):
        def build(case, x):
            if case.params.get("kind") == "layer":
                built = run_layer(case, x, build_moh_layer(case, x["x"].device, x["x"].dtype, core=core))
            else:
                causal = case.params["causal"]
                built = Built(lambda: core(x["q"], x["k"], x["v"], x["gates"], causal=causal))
            built.context = context
            return built
        return build

    for name, backend in SDPA_BACKENDS[:2]:  # flash, cudnn: pinned around the check and the timing
        provs.append(Provider(name.replace("sdpa-", "dense-mask-sdpa-"), "peer", "torch",
                              dense_then_mask(sdpa_dense_then_mask, sdpa_context(backend)),
                              note="MoH paper's code: every head computed (SDPA), then multiplied by its gate; "
                                   "layer: the same module with that core"))
    provs.append(Provider("dense-mask-flash-attn", "peer", "flash-attn", dense_then_mask(flash_attn_dense_then_mask),
                          note="every head computed (flash_attn_func), then multiplied by its gate"))
    return provs
