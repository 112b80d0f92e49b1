"""FLOP and byte counts that the benchmark suites report. Pure Python; no torch, no GPU.

Every provider of a case is scored with the *same* count, so a TFLOP/s or GB/s figure is a speed
(``count / time``), never a claim about the work a particular kernel chose to do.

Softmax attention -- FlashAttention-3's general formula (``hopper/benchmark_attn.py`` in flash-attn):

    fwd FLOPs = 2 * B * H * (Dqk + Dv) * area

- ``H`` counts **query** heads (GQA/MQA share kv heads but do the same arithmetic per query head);
- ``area`` is the number of unmasked (query, key) pairs of one (batch, head): ``Tq * Tk`` dense, fewer
  under causal / window / block-sparse / DMA masks. Each pair costs one ``Dqk`` dot product (``QK^T``) and
  one ``Dv`` axpy (``PV``), 2 FLOPs per multiply-add;
- we count the area **exactly** (a causal square has ``T (T + 1) / 2`` pairs). FA3's closed form for the
  causal case, ``T^2 / 2``, drops the diagonal's half; the difference is ``1 / T`` (0.2 % at T = 512);
- backward = 2.5 x forward (5 matmuls instead of 2: ``dV = P^T dO``, ``dP = dO V^T``, ``dQ = dS K``,
  ``dK = dS^T Q`` plus the recomputation of ``S = Q K^T``), so forward+backward = 3.5 x forward;
- sparse work is reported twice: *dense-equivalent* (the area the same mask-free call would cover,
  i.e. what the sparse kernel saves you from) and *effective* (the area actually left unmasked).
  MoH's effective area is the dense area times the fraction of active (token, head) rows.

Decode (SPEC §2) is memory-bound, so it is scored in bytes moved per call:

    bytes = B * Tk * Hkv * (Dqk + Dv) * elem     (K and V of the cache: "2 * B * Tk * Hkv * D * elem")
          + B * Tn * H * Dqk * elem               (the new queries, read)
          + B * Tn * H * Dv * elem                (the output, written)

with ``Tk`` the valid cache length of each batch entry (summed per entry when they differ). A paged
cache's block table (a few KB) is ignored. GB/s is divided by the GPU's peak memory bandwidth.

Lightning (linear) attention is scored by its recurrent form, the algorithm's minimum: per token and
head the state update ``S += k^T v`` and the read-out ``o = q S`` each cost ``2 * D * Dv``:

    fwd FLOPs = 4 * B * T * H * D * Dv,  backward = 2 x forward (dQ, dK, dV and the reverse state sweep)

The chunked kernels do extra intra-chunk work; that is their cost, not extra credit. Its decode step
(one token against a recurrent state) is scored in bytes: the fp32 state read *and* written back,
``2 * B * H * D * Dv * 4``, plus q, k, v read and o written.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

MODES = ("fwd", "bwd", "fwd+bwd")
BWD_FACTOR = 2.5  # softmax attention: backward FLOPs / forward FLOPs (FlashAttention's convention)
LINEAR_BWD_FACTOR = 2.0  # linear attention: backward FLOPs / forward FLOPs

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float64": 8}


def elem_bytes(dtype) -> int:
    """Bytes per element of a dtype given as a torch dtype or its name (``"bfloat16"``, ``"bf16"``...)."""
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype: unknown element size for {dtype!r}")
    return DTYPE_BYTES[name]


def mode_factor(mode: str, bwd_factor: float = BWD_FACTOR) -> float:
    """How many forward passes' worth of FLOPs ``mode`` is: fwd 1, bwd ``bwd_factor``, fwd+bwd both."""
    if mode == "fwd":
        return 1.0
    if mode == "bwd":
        return bwd_factor
    if mode == "fwd+bwd":
        return 1.0 + bwd_factor
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------------------
# Areas: unmasked (query, key) pairs of one (batch, head)


def _row_counts(Tq: int, Tk: int, causal: bool, window: Tuple[int, int]) -> Iterable[int]:
    off = Tk - Tq  # bottom-right alignment (SPEC §0): query i sees key j iff j <= i + off when causal
    left, right = window
    for i in range(Tq):
        lo = 0 if left < 0 else max(0, i + off - left)
        if causal:
            hi = min(Tk - 1, i + off)  # a right window >= 0 cannot widen a causal row
        else:
            hi = Tk - 1 if right < 0 else min(Tk - 1, i + off + right)
        yield max(0, hi - lo + 1)


def attention_area(Tq: int, Tk: int, causal: bool = False, window: Tuple[int, int] = (-1, -1)) -> int:
    """Exact number of visible (query, key) pairs, causal aligned bottom-right, window ``(left, right)``
    measured from the same diagonal (``-1`` = unbounded)."""
    left, right = window
    if not causal and left < 0 and right < 0:
        return Tq * Tk
    if causal and left < 0 and Tq <= Tk:
        # rows see off+1 .. off+Tq keys
        off = Tk - Tq
        return Tq * off + Tq * (Tq + 1) // 2
    return sum(_row_counts(Tq, Tk, causal, window))


def decode_area(Tn: int, cache_len: int, causal: bool = True) -> int:
    """Visible pairs for ``Tn`` new queries against a cache of ``cache_len`` valid keys (the new ones
    included): query ``i`` sees ``cache_len - Tn + i + 1`` keys when causal."""
    if Tn > cache_len:
        raise ValueError(f"Tn={Tn} new tokens cannot exceed cache_len={cache_len}")
    if not causal:
        return Tn * cache_len
    return Tn * cache_len - Tn * (Tn - 1) // 2


def dma_area(T: int, keep_window: int, causal: bool = True) -> int:
    """DMA (SPEC §5) with ``Tq == Tk == T``: each row keeps ``min(visible, keep_window)`` keys."""
    if keep_window <= 0:
        raise ValueError("keep_window must be positive")
    if not causal:
        return T * min(T, keep_window)
    w = min(keep_window, T)
    # rows 0..w-1 see i+1 <= w keys; rows w..T-1 keep w
    return w * (w + 1) // 2 + (T - w) * w


def block_sparse_area(blocks, Tq: int, Tk: int, block_size: Tuple[int, int]) -> int:
    """Elements covered by the visited blocks. ``blocks`` is a nested sequence (or array) ``[..., Mq, Nk]``
    of truthy flags, summed over every leading (batch, head) entry; edge blocks are clipped to
    ``Tq``/``Tk``."""
    bq, bk = block_size
    if hasattr(blocks, "tolist"):
        blocks = blocks.tolist()
    ndim, probe = 0, blocks
    while isinstance(probe, (list, tuple)):
        ndim += 1
        probe = probe[0] if len(probe) else None
    if ndim < 2:
        raise ValueError("blocks: expected at least 2 dims [..., Mq, Nk]")
    mats = [blocks]
    for _ in range(ndim - 2):
        mats = [m for outer in mats for m in outer]
    total = 0
    for mat in mats:
        for m, row in enumerate(mat):
            hq = min(bq, Tq - m * bq)
            total += sum(hq * min(bk, Tk - n * bk) for n, flag in enumerate(row) if flag)
    return total


# ----------------------------------------------------------------------------------------------------
# FLOPs


def attention_flops(
    B: int,
    H: int,
    Tq: int,
    Tk: int,
    D: int,
    Dv: Optional[int] = None,
    *,
    causal: bool = False,
    window: Tuple[int, int] = (-1, -1),
    mode: str = "fwd",
    area: Optional[int] = None,
) -> float:
    """FA3's general count: ``2 * B * H * (D + Dv) * area`` per forward, times :func:`mode_factor`.
    ``H`` = query heads. ``area`` overrides the causal/window area (block-sparse, DMA, ...)."""
    Dv = D if Dv is None else Dv
    if area is None:
        area = attention_area(Tq, Tk, causal, window)
    return 2.0 * B * H * (D + Dv) * area * mode_factor(mode)


def moh_flops(B: int, H: int, T: int, D: int, active_fraction: float, *, causal: bool = True, mode: str = "fwd",
              Dv: Optional[int] = None) -> Tuple[float, float]:
    """(dense-equivalent, effective) FLOPs of MoH attention where every token activates
    ``active_fraction * H`` heads: only active query rows are computed (SPEC §3)."""
    if not 0.0 < active_fraction <= 1.0:
        raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction}")
    dense = attention_flops(B, H, T, T, D, Dv, causal=causal, mode=mode)
    return dense, dense * active_fraction


def linear_attention_flops(B: int, T: int, H: int, D: int, Dv: Optional[int] = None, *, mode: str = "fwd") -> float:
    """Lightning attention's recurrent-form count: ``4 * B * T * H * D * Dv`` forward; backward 2 x."""
    Dv = D if Dv is None else Dv
    return 4.0 * B * T * H * D * Dv * mode_factor(mode, LINEAR_BWD_FACTOR)


def mha_module_flops(B: int, T: int, dim: int, H: int, Hkv: int, D: int, *, causal: bool = True,
                     mode: str = "fwd") -> float:
    """An attention layer: Q/K/V projections ``dim -> (H + 2 Hkv) D``, the attention core, the output
    projection ``H D -> dim``. Projections' backward is 2 x forward (dX and dW); the core's 2.5 x."""
    proj = 2.0 * B * T * dim * (H + 2 * Hkv) * D + 2.0 * B * T * H * D * dim
    core = attention_flops(B, H, T, T, D, causal=causal)
    if mode == "fwd":
        return proj + core
    if mode == "bwd":
        return 2 * proj + BWD_FACTOR * core
    if mode == "fwd+bwd":
        return 3 * proj + (1 + BWD_FACTOR) * core
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def moh_module_flops(B: int, T: int, dim: int, H: int, Hkv: int, D: int, active_fraction: float, *,
                     routed_heads: Optional[int] = None, causal: bool = True, mode: str = "fwd") -> Tuple[float, float]:
    """(dense-equivalent, effective) FLOPs of a MoH layer (SPEC §3): :func:`mha_module_flops`' projections
    and core plus the learned router's logits ``dim -> routed_heads`` (``2 * B * T * dim * h_r``; the
    softmax and top-k are not counted). *Dense-equivalent* computes every head; *effective* only the
    ``active_fraction`` of the core's query rows (projections and router are dense either way). Backward:
    2 x forward for the matmuls of projections and router, 2.5 x for the core."""
    if not 0.0 < active_fraction <= 1.0:
        raise ValueError(f"active_fraction must be in (0, 1], got {active_fraction}")
    h_r = H if routed_heads is None else routed_heads
    router = 2.0 * B * T * dim * h_r
    mat = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}.get(mode)
    if mat is None:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    dense = mha_module_flops(B, T, dim, H, Hkv, D, causal=causal, mode=mode) + mat * router
    core = attention_flops(B, H, T, T, D, causal=causal, mode=mode)
    return dense, dense - core * (1.0 - active_fraction)


def kha_extra_flops(B: int, T: int, H: int, Hkv: int, D: int, form: str) -> float:
    """Forward FLOPs KHA adds to its base (SPEC §4): ``linear`` = one ``D x D`` matmul per head vector of
    Q (H heads), K and V (Hkv heads each) -- an upper bound, T^Q and T^K being optional; ``mlp`` = three
    ``D x D`` matmuls on each V head vector (up, gate, down)."""
    if form == "linear":
        return 2.0 * B * T * (H + 2 * Hkv) * D * D
    if form == "mlp":
        return 3 * 2.0 * B * T * Hkv * D * D
    raise ValueError(f"form: expected 'linear' or 'mlp', got {form!r}")


# ----------------------------------------------------------------------------------------------------
# Bytes


def decode_bytes(
    B: int, Tn: int, H: int, Hkv: int, D: int, Dv: Optional[int] = None, *, cache_lens: Sequence[int] | int,
    elem: int = 2,
) -> int:
    """Bytes a decode call must move (module docstring): the K and V of every valid cache position, the
    queries read and the output written. ``cache_lens``: one length for all, or one per batch entry."""
    Dv = D if Dv is None else Dv
    lens = [cache_lens] * B if isinstance(cache_lens, int) else list(cache_lens)
    if len(lens) != B:
        raise ValueError(f"cache_lens: expected {B} lengths, got {len(lens)}")
    kv = sum(lens) * Hkv * (D + Dv) * elem
    return kv + B * Tn * H * D * elem + B * Tn * H * Dv * elem


def linear_decode_bytes(B: int, H: int, D: int, Dv: Optional[int] = None, *, elem: int = 2, state_elem: int = 4) -> int:
    """One lightning decode step: the ``[B, H, D, Dv]`` state read and written, q/k/v read, o written."""
    Dv = D if Dv is None else Dv
    return 2 * B * H * D * Dv * state_elem + B * H * (2 * D + 2 * Dv) * elem


# ----------------------------------------------------------------------------------------------------
# Rates


def tflops(flops: Optional[float], ms: Optional[float]) -> Optional[float]:
    if flops is None or not ms or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: Optional[float], ms: Optional[float]) -> Optional[float]:
    if nbytes is None or not ms or ms <= 0:
        return None
    return nbytes / (ms * 1e-3) / 1e9


# Peak DRAM bandwidth (bytes/s) by device-name substring, used when the driver does not report the
# memory clock and bus width. Vendor datasheet figures.
KNOWN_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # SXM5 80GB HBM3
    ("H800", 3.35e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10", 0.6e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
)


def peak_bandwidth(name: str, memory_clock_khz: Optional[float] = None, bus_width_bits: Optional[int] = None) -> Optional[float]:
    """Peak memory bandwidth in bytes/s: from the memory clock and bus width when given
    (``2 * clock * width / 8``, double data rate), else from :data:`KNOWN_BANDWIDTH`, else None."""
    if memory_clock_khz and bus_width_bits:
        return 2.0 * memory_clock_khz * 1e3 * bus_width_bits / 8
    for key, bw in KNOWN_BANDWIDTH:
        if key.lower() in name.lower():
            return bw
    return None
