"""What every suite's providers share: the :class:`Provider` / :class:`Built` protocol, library status and
versions, attnzoo's backends as providers, and the peers' calling helpers (SDPA pinned to one backend,
compiled FlexAttention, xformers' layout). Each suite owns its providers (``<suite>_providers()`` in
``benchmarks/suites/<suite>.py``). A provider is used when importable, and its library's version goes into
every results file.

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


def reference_memory_reason(case, limit_bytes: float = 16e9) -> Optional[str]:
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
                r = reference_memory_reason(case)
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


def fla_decay_kwargs(fn, s, shape):
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


def first_output(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def is_gqa(case) -> bool:
    return case.shape.get("Hkv", case.shape.get("H")) != case.shape.get("H")

def module_class(base: str):
    import attnzoo

    names = {"mha": ("MultiHeadAttention",), "gqa": ("MultiHeadAttention",), "moh": ("MoHAttention",)}[base]
    for n in names:
        cls = getattr(attnzoo, n, None)
        if cls is not None:
            return cls
    raise NotImplementedError(f"attnzoo.{names[0]} does not exist yet")
