"""Providers: the implementations a suite measures -- attnzoo's backends and the peers people would use
instead. Each is used when importable, and its library's version goes into every results file.

A provider's ``build(case, inputs)`` returns a :class:`Built`: ``fn()`` runs the op once and returns its
output in the suite's canonical layout (BTHD; a layout change that the peer needs is a free ``transpose``
view inside ``fn``, or a copy made *outside* ``fn`` whose leaves are then exposed through ``leaves``).
Everything a provider imports, it imports inside ``build``/``supports``: importing this module needs
neither a GPU nor any peer.

Peers (each pinned so the name means one kernel):
- ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient``: ``F.scaled_dot_product_attention`` under
  ``sdpa_kernel(<backend>)`` (flash = PyTorch's vendored FlashAttention-2 kernels);
- ``flex``: ``torch.compile(flex_attention)`` with a ``BlockMask`` (causal, the sparse suite's block masks,
  DMA's kept set) -- on a short query it takes FlexAttention's decode kernel;
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (its own dispatcher picks the kernel);
- ``flash-attn`` (FA2) and ``flash-attn-3`` (``flash_attn_interface``, Hopper);
- ``fla-chunk`` / ``fla-recurrent``: fla-core's ``chunk_simple_gla`` / ``fused_recurrent_simple_gla`` with
  ``g_gamma = -s`` (the same per-head decay) and the same scale;
- ``lightning-attn``: OpenNLPLab's ``lightning_attn_func`` (layout BHTD, slopes ``[H, 1, 1]``, scale 1);
- ``flash-dmattn``: ``flash_dmattn_func`` with the kept mask and DMA bias materialised per kv head;
- ``dense-mask-*``: MoH the way the MoH paper's code does it -- dense attention for every head, then the
  output multiplied by the gates (inactive heads computed and thrown away); for the MoH layer, the same
  ``MoHAttention`` class and weights with that dense-then-mask core in place of ``moh_attention``;
- ``attnzoo-dense-core`` (role ``base``): attnzoo's own dense ``attention`` (triton) with every head, the
  denominator of the MoH core's target.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata as md
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

# library -> (distribution names to ask importlib.metadata, module to import)
LIBRARIES: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "attnzoo": (("attnzoo",), "attnzoo"),
    "torch": (("torch",), "torch"),
    "triton": (("triton",), "triton"),
    "xformers": (("xformers",), "xformers.ops"),
    "flash-attn": (("flash-attn", "flash_attn"), "flash_attn"),
    "flash-attn-3": (("flash-attn-3", "flash_attn_3", "flashattn-hopper"), "flash_attn_interface"),
    "fla-core": (("fla-core", "flash-linear-attention"), "fla.ops.simple_gla"),
    "lightning-attn": (("lightning-attn", "lightning_attn"), "lightning_attn.ops"),
    "flash-dmattn": (("flash-dmattn", "flash_dmattn"), "flash_dmattn"),
}
PEER_LIBRARIES = ("xformers", "flash-attn", "flash-attn-3", "fla-core", "lightning-attn", "flash-dmattn")


@functools.lru_cache(None)
def library_status(library: str) -> Tuple[bool, Optional[str], str]:
    """``(importable, version, note)``. The import is attempted (and any exception, not only
    ImportError, means "not importable": a CUDA extension can fail in other ways)."""
    dists, module = LIBRARIES[library]
    version = None
    for d in dists:
        try:
            version = md.version(d)
            break
        except md.PackageNotFoundError:
            continue
    top = module.split(".")[0]
    try:
        if importlib.util.find_spec(top) is None:
            return False, version, f"{top} is not installed"
    except (ImportError, ValueError) as e:
        return False, version, f"{type(e).__name__}: {e}"
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any failure means unusable here
        return False, version, f"import {module} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if version is None:
        version = getattr(mod, "__version__", None) or getattr(importlib.import_module(top), "__version__", None)
    return True, (str(version) if version is not None else None), ""


def library_versions() -> Dict[str, Optional[str]]:
    """Every known library's version (None when not installed), for the results' environment."""
    out = {}
    for lib in LIBRARIES:
        dists, _ = LIBRARIES[lib]
        v = None
        for d in dists:
            try:
                v = md.version(d)
                break
            except md.PackageNotFoundError:
                continue
        out[lib] = v
    return out


@dataclass
class Built:
    fn: Callable[[], Any]
    leaves: Dict[str, Any] = field(default_factory=dict)  # name -> tensor whose .grad is compared
    grad_to_canonical: Callable[[str, Any], Any] = lambda name, g: g
    context: Callable[[], Any] = contextlib.nullcontext  # entered around the check and the timing
    grad_to_none: List[Any] = field(default_factory=list)  # more tensors (e.g. weights) whose grads to reset

    def grads(self) -> Dict[str, Any]:
        return {n: (None if t.grad is None else self.grad_to_canonical(n, t.grad)) for n, t in self.leaves.items()}


@dataclass
class Provider:
    name: str
    role: str  # "attnzoo" | "peer" | "reference" | "base" (knocking's unmodified module)
    library: str
    build: Callable[[Any, Dict[str, Any]], Built]
    supports: Callable[[Any], Optional[str]] = lambda case: None  # why it cannot run a case it applies to
    needs_cuda: bool = True
    note: str = ""
    applies: Callable[[Any], bool] = lambda case: True  # False: the case is outside its scope (no record)

    def status(self) -> Tuple[bool, Optional[str], str]:
        return library_status(self.library)

    @property
    def version(self) -> Optional[str]:
        return self.status()[1]

    def unavailable_reason(self, device) -> Optional[str]:
        ok, _, note = self.status()
        if not ok:
            return note or f"{self.library} is not importable"
        if self.needs_cuda and getattr(device, "type", str(device)) != "cuda":
            return "needs a CUDA GPU"
        return None


# ----------------------------------------------------------------------------------------------------
# attnzoo


_ATTNZOO_OP_MODULES = ("attnzoo.ops.attention.api", "attnzoo.ops.lightning.api", "attnzoo.ops.moh.api",
                       "attnzoo.ops.dma.api")


def attnzoo_backends(*ops: str) -> List[str]:
    """Registered attnzoo backends (best first) of the first of ``ops`` that is registered."""
    try:
        from attnzoo import backends
    except Exception:  # noqa: BLE001
        return []
    for mod in _ATTNZOO_OP_MODULES:  # ops register on import; some may not be exported yet
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001
            pass
    known = backends.ops()
    for op in ops:
        if op in known:
            return [impl.backend for impl in backends.implementations(op)]
    return []


def attnzoo_fn(name: str):
    import attnzoo

    fn = getattr(attnzoo, name, None)
    if fn is None:
        raise NotImplementedError(f"attnzoo.{name} does not exist yet")
    return fn


def _reference_memory_reason(case, limit_bytes: float = 16e9) -> Optional[str]:
    """attnzoo's reference materialises the fp32 score matrix; refuse shapes where that alone is huge."""
    s = case.shape
    Tq = s.get("Tq", s.get("T", s.get("Tn", 1)))
    Tk = s.get("Tk", s.get("T", s.get("cache_len", 1)))
    need = s.get("B", 1) * s.get("H", 1) * Tq * Tk * 4 * (4 if case.needs_grad else 2)
    if need > limit_bytes:
        return f"reference would materialise {need / 1e9:.0f} GB of scores (> {limit_bytes / 1e9:.0f} GB)"
    return None


def ordered_union(*lists) -> List[str]:
    out: List[str] = []
    for lst in lists:
        out += [x for x in lst if x not in out]
    return out


def attnzoo_providers(ops: Tuple[str, ...], build_for: Callable[[str], Callable], supports=None,
                      only: Optional[str] = None) -> List[Provider]:
    """One provider per registered attnzoo backend of ``ops`` (or just ``only``): ``attnzoo-<backend>``."""
    out = []
    for b in ([only] if only else attnzoo_backends(*ops)):
        def sup(case, b=b):
            if b == "reference":
                r = _reference_memory_reason(case)
                if r:
                    return r
            return supports(case) if supports else None

        out.append(Provider(
            name=f"attnzoo-{b}", role="reference" if b == "reference" else "attnzoo", library="attnzoo",
            build=build_for(b), supports=sup, needs_cuda=(b != "reference"),
            note="PyTorch reference (materialises scores)" if b == "reference" else "",
        ))
    return out


# ----------------------------------------------------------------------------------------------------
# shared peer helpers


def bhtd(t):
    return t.transpose(1, 2)


SDPA_BACKENDS = (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION"))


def sdpa_context(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel([getattr(SDPBackend, backend_name)])


@functools.lru_cache(None)
def compiled_flex():
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), 4096))
    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(mask_mod, B, H, Tq, Tk, device, block=128):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B, H, Tq, Tk, device=device, BLOCK_SIZE=block)


def _compress_blocks(blocks):
    import torch

    nk = blocks.shape[-1]
    ar = torch.arange(nk, device=blocks.device)
    idx = torch.where(blocks, ar, nk + ar).argsort(dim=-1, stable=True).to(torch.int32)
    return blocks.sum(-1).to(torch.int32), idx


def flex_block_mask_from_dense(keep, rep: int = 1, block: int = 128):
    """A FlexAttention BlockMask from a dense bool ``keep [B, Hk, Tq, Tk]`` (query head h reads ``keep[:, h //
    rep]``), built by block reductions instead of evaluating a mask_mod over every (b, h, q, k)."""
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    B, Hk, Tq, Tk = keep.shape
    if Tq % block or Tk % block:
        raise NotImplementedError(f"sequence lengths ({Tq}, {Tk}) must be multiples of the {block} block")
    tiles = keep.view(B, Hk, Tq // block, block, Tk // block, block)
    anyv, allv = tiles.any(dim=5).any(dim=3), tiles.all(dim=5).all(dim=3)
    partial, full = anyv & ~allv, allv
    if rep > 1:
        partial, full = partial.repeat_interleave(rep, 1), full.repeat_interleave(rep, 1)
    pc, pi = _compress_blocks(partial)
    fc, fi = _compress_blocks(full)
    return FlexBlockMask.from_kv_blocks(pc, pi, fc, fi, BLOCK_SIZE=block, seq_lengths=(Tq, Tk),
                                        mask_mod=lambda b, h, qi, ki: keep[b, h // rep, qi, ki])


def _decay_kwargs(fn, s, shape):
    """fla's decay argument: ``g_gamma = -s`` per head where the op has it, else ``g = -s`` per token."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "g_gamma" in params or not params:
        return {"g_gamma": -s}
    B, T, H = shape[:3]
    return {"g": (-s).view(1, 1, H).expand(B, T, H).contiguous()}


def xformers_layout(q, k, v):
    """BTHD -> xformers' BMHK (MHA) or BMGHK (GQA: kv heads broadcast over each group)."""
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    if Hkv == H:
        return q, k, v
    rep = H // Hkv
    q5 = q.view(B, Tq, Hkv, rep, D)
    k5 = k.unsqueeze(3).expand(B, k.shape[1], Hkv, rep, k.shape[-1])
    v5 = v.unsqueeze(3).expand(B, v.shape[1], Hkv, rep, v.shape[-1])
    return q5, k5, v5


def _unwrap(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _gqa(case) -> bool:
    return case.shape.get("Hkv", case.shape.get("H")) != case.shape.get("H")


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
            causal, gqa = case.params["causal"], _gqa(case)
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
        kw = {"enable_gqa": True} if _gqa(case) else {}
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

        return Built(lambda: _unwrap(flash_attn_func(x["q"], x["k"], x["v"], causal=case.params["causal"])))
    provs.append(Provider("flash-attn-3", "peer", "flash-attn-3", fa3))
    return provs


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

        return Built(lambda: _unwrap(flash_attn_with_kvcache(
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
            kw = {"enable_gqa": True} if _gqa(case) else {}
            return Built(lambda: bhtd(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)),
                         context=sdpa_context(backend))
        provs.append(Provider(name, "peer", "torch", build, supports=contiguous_only))

    def flex(case, x):
        q, k, v = bhtd(x["q"]), bhtd(x["k_cache"]), bhtd(x["v_cache"])
        fa = compiled_flex()
        Tn, Tk = q.shape[2], k.shape[2]
        off = Tk - Tn
        bm = flex_block_mask(lambda b, h, qi, ki: ki <= qi + off, None, None, Tn, Tk, q.device) if Tn > 1 else None
        kw = {"enable_gqa": True} if _gqa(case) else {}
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
            return Built(lambda: _unwrap(f(x["q"], x["k"], x["v"], decay=x["s"], scale=1.0, backend=b)))
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
                return _unwrap(f(x["q"], x["k"], x["v"], decay=x["s"], scale=1.0, backend="triton"))
            finally:
                tb.SEGMENTS = None
        return Built(run)
    if "triton" in chunk_backends:
        provs.append(Provider("attnzoo-triton-unsegmented", "attnzoo", "attnzoo", az_unsegmented,
                              applies=lambda c: c.mode != "step", note="segments=1"))

    def fla_chunk(case, x):
        from fla.ops.simple_gla import chunk_simple_gla

        kw = _decay_kwargs(chunk_simple_gla, x["s"], x["q"].shape)
        return Built(lambda: _unwrap(chunk_simple_gla(x["q"], x["k"], x["v"], scale=1.0, **kw)))
    provs.append(Provider("fla-chunk", "peer", "fla-core", fla_chunk,
                          applies=lambda c: c.mode != "step",
                          note="chunk_simple_gla(g_gamma=-s)"))

    def fla_rec(case, x):
        from fla.ops.simple_gla import fused_recurrent_simple_gla

        kw = _decay_kwargs(fused_recurrent_simple_gla, x["s"], x["q"].shape)
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
    base = _module_class("moh")

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

    from benchmarks.suites.moh import ROUTER_SCALE

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
            return Built(lambda: _unwrap(f(x["q"], x["k"], x["v"], x["gates"], causal=causal, backend=b)))
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
            return Built(lambda: _unwrap(f(x["q"], x["k"], x["v"], x["dma_bias"], keep_window=w, causal=True, backend=b)))
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
        kw = {"enable_gqa": True} if _gqa(case) else {}
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

        kw = {"enable_gqa": True} if _gqa(case) else {}
        return Built(lambda: bhtd(fa(q, k, v, score_mod=score_mod, block_mask=bm, **kw)))
    provs.append(Provider("flex-dma", "peer", "torch", flex_dma, applies=kind("dma"),
                          note="compiled flex_attention: bias as score_mod, kept set as block mask"))

    def dmattn(case, x):
        from flash_dmattn import flash_dmattn_func

        B, T = x["q"].shape[:2]
        mask = x["kept"].to(x["q"].dtype)
        bias = x["dma_bias"].unsqueeze(2).expand(-1, -1, T, -1).to(x["q"].dtype).contiguous()
        return Built(lambda: _unwrap(flash_dmattn_func(x["q"], x["k"], x["v"], attn_mask=mask, attn_bias=bias,
                                                       is_causal=True)))
    provs.append(Provider("flash-dmattn", "peer", "flash-dmattn", dmattn, applies=kind("dma"),
                          note="flash_dmattn_func with the kept mask and bias materialised [B, Hkv, T, T]"))
    return provs


# ----------------------------------------------------------------------------------------------------
# knocking suite: x [B, T, dim]; the module family (base vs each KHA form) is built per provider


def _module_class(base: str):
    import attnzoo

    names = {"mha": ("MultiHeadAttention",), "gqa": ("MultiHeadAttention",), "moh": ("MoHAttention",)}[base]
    for n in names:
        cls = getattr(attnzoo, n, None)
        if cls is not None:
            return cls
    raise NotImplementedError(f"attnzoo.{names[0]} does not exist yet")


def build_module(case, knocking: Optional[str], device, dtype):
    """The case's module with ``knocking`` (None = the base), carrying the base's weights: built in fp32
    from a fixed seed, then cast. KHA at initialisation equals its base (SPEC §4), which is the check."""
    import torch
    import attnzoo

    s = case.shape
    kw = dict(dim=s["dim"], num_heads=s["H"], num_kv_heads=s["Hkv"], causal=True)
    cls = _module_class(case.params["base"])
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
            return Built(lambda: _unwrap(mod(x["x"])), grad_to_none=list(mod.parameters()))
        name = "base" if form is None else f"kha-{form}"
        provs.append(Provider(name, "base" if form is None else "attnzoo", "attnzoo", build,
                              needs_cuda=False,
                              note="the unmodified module" if form is None else f"knocking='{form}' at init"))

    def folded(case, x):
        mod = build_module(case, "linear", x["x"].device, x["x"].dtype).fold()
        mod.train(case.needs_grad)
        return Built(lambda: _unwrap(mod(x["x"])), grad_to_none=list(mod.parameters()))

    provs.append(Provider("kha-linear-folded", "attnzoo", "attnzoo", folded, needs_cuda=False,
                          note="knocking='linear' after fold(): plain projections, no overhead"))
    return provs
