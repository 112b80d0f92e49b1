"""The "torch" backend of ``lightning_attention`` and ``lightning_decode``: the chunked algorithm (SPEC §6) in
PyTorch, O(T) time and memory forward and backward (autograd through the chunks), any device.

Per chunk of ``C`` tokens (all chunks at once, batched): the intra-chunk part is the masked quadratic form
``((Q K^T) * M) V`` with ``M_ij = lambda^(i-j)`` (``C x C``); each chunk's own state contribution is
``sum_j lambda^(C-1-j) k_j^T v_j``. A sequential scan over the chunks carries the state,
``S_n = lambda^C S_{n-1} + kv_n`` (``T / C`` small steps on ``[B, H, D, Dv]``), and each chunk adds the
inter-chunk term ``lambda^(i+1) q_i S_{n-1}``. Every decay factor is ``exp(-s * d)`` with ``d >= 0``, so
nothing overflows. A tail shorter than ``C`` is one more chunk of its own length; varlen runs each
sequence on its own. Long sequences go through in segments of ``SEGMENT`` tokens carrying the state, so each
segment's ``[N, D, Dv]`` intermediates stay cache-sized (per-token time at 16k was twice that at 4k when
all chunks went at once). Computes in fp32 (fp64 for fp64 inputs), like the reference; gradients reach the
decay rates too.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from attnzoo import backends
from attnzoo.ops.lightning.reference import state_dtype

CHUNK = 64
SEGMENT = 4096  # tokens per call of _chunks (a multiple of CHUNK): its [N, D, Dv] intermediates stay in cache
SCAN_BLOCK = 32  # chunks per block of the two-level state scan
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _supports(*, q, **_) -> List[str]:
    return [] if q.dtype in FLOAT_DTYPES else [f"q: dtype {q.dtype} is not a floating dtype"]


def _chunks(q, k, v, s, scale: float, S0: torch.Tensor, C: int):
    """``q, k [B, T, H, D]``, ``v [B, T, H, Dv]`` in the state dtype, ``T % C == 0``; ``s [H]`` rates;
    ``S0 [B, H, D, Dv]``. Returns ``(o [B, T, H, Dv], S_T)``."""
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    N = T // C
    qc = q.reshape(B, N, C, H, D).permute(0, 3, 1, 2, 4)  # [B, H, N, C, D]
    kc = k.reshape(B, N, C, H, D).permute(0, 3, 1, 2, 4)
    vc = v.reshape(B, N, C, H, Dv).permute(0, 3, 1, 2, 4)
    idx = torch.arange(C, device=q.device, dtype=q.dtype)
    diff = idx[:, None] - idx[None, :]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    M = torch.where(diff >= 0, torch.exp(-s[:, None, None] * diff.clamp(min=0)), zero)  # [H, C, C]
    o = torch.matmul(torch.matmul(qc, kc.transpose(-1, -2)) * M[None, :, None], vc)  # intra-chunk
    w_end = torch.exp(-s[:, None] * (C - 1 - idx))  # lambda^(C-1-j), [H, C]
    kv = torch.matmul((kc * w_end[None, :, None, :, None]).transpose(-1, -2), vc)  # [B, H, N, D, Dv]
    before = _scan(kv, s * C, S0)  # [B, H, N, D, Dv]: the state entering each chunk
    S = torch.exp(-s * C)[None, :, None, None] * before[:, :, -1] + kv[:, :, -1]  # after the last chunk
    w_in = torch.exp(-s[:, None] * (idx + 1))  # lambda^(i+1), [H, C]
    o = o + torch.matmul(qc * w_in[None, :, None, :, None], before)
    o = (o * scale).permute(0, 2, 3, 1, 4).reshape(B, T, H, Dv)
    return o, S


def _scan(kv: torch.Tensor, rate: torch.Tensor, S0: torch.Tensor) -> torch.Tensor:
    """``before[n] = sum_{m < n} exp(-rate (n-1-m)) kv[m] + exp(-rate n) S0`` for ``kv [B, H, N, D, Dv]``,
    ``rate [H]`` (the decay over one chunk). Two levels, so there are few sequential steps: within blocks
    of ``SCAN_BLOCK`` chunks one matmul with the lower-triangular decay matrix; across blocks a
    sequential carry (``N / SCAN_BLOCK`` steps). Every factor is ``exp(-rate * d)``, ``d >= 0``."""
    B, H, N, D, Dv = kv.shape
    nb = -(-N // SCAN_BLOCK)
    L = min(SCAN_BLOCK, N)
    if nb * L != N:
        kv = torch.cat([kv, kv.new_zeros(B, H, nb * L - N, D, Dv)], dim=2)
    kvb = kv.reshape(B, H, nb, L, D * Dv)
    i = torch.arange(L, device=kv.device, dtype=kv.dtype)
    d = i[:, None] - 1 - i[None, :]  # chunks between m and n-1
    zero = torch.zeros((), dtype=kv.dtype, device=kv.device)
    W = torch.where(d >= 0, torch.exp(-rate[:, None, None] * d.clamp(min=0)), zero)  # [H, L, L]
    local = torch.matmul(W[None, :, None], kvb)  # within-block part, [B, H, nb, L, D*Dv]
    tot = torch.matmul(torch.exp(-rate[:, None] * (L - 1 - i))[None, :, None, None, :], kvb)  # block sums
    decay_block = torch.exp(-rate * L)[None, :, None]
    carry, carries = S0.reshape(B, H, D * Dv), []
    for b in range(nb):  # the state entering block b
        carries.append(carry)
        carry = decay_block * carry + tot[:, :, b, 0]
    enter = torch.stack(carries, dim=2)  # [B, H, nb, D*Dv]
    before = local + torch.exp(-rate[:, None] * i)[None, :, None, :, None] * enter[:, :, :, None, :]
    return before.reshape(B, H, nb * L, D, Dv)[:, :, :N]


def lightning_chunked(q, k, v, decay: Optional[torch.Tensor], scale: float, initial_state: Optional[torch.Tensor],
                      chunk: Optional[int] = None):
    """Dense batch ``[B, T, H, D]``: ``(o, final_state)``; ``o`` in q's dtype, the state fp32 (fp64).
    ``chunk`` defaults to :data:`CHUNK` (read at call time)."""
    chunk = CHUNK if chunk is None else chunk
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    sd = state_dtype(q.dtype)
    s = torch.zeros(H, device=q.device, dtype=sd) if decay is None else decay.to(device=q.device, dtype=sd)
    S = torch.zeros(B, H, D, Dv, device=q.device, dtype=sd) if initial_state is None else initial_state.to(sd)
    qs, ks, vs = q.to(sd), k.to(sd), v.to(sd)
    main = (T // chunk) * chunk
    seg = max(chunk, SEGMENT // chunk * chunk)
    # segments carry the state like chunks; one pass each over cache-sized data. ``split``, not slicing: the
    # backward of a slice writes into a zeroed copy of the whole input (segments x T work), split's is one cat
    sizes = [min(seg, main - a) for a in range(0, main, seg)] + ([T - main] if T > main else [])
    outs = []
    for qp, kp, vp in zip(*(t.split(sizes, dim=1) for t in (qs, ks, vs))):
        o, S = _chunks(qp, kp, vp, s, scale, S, min(chunk, qp.shape[1]))
        outs.append(o)
    o = torch.cat(outs, dim=1) if outs else q.new_zeros(B, 0, H, Dv, dtype=sd)
    return o.to(q.dtype), S


@backends.register("lightning_attention", "torch", priority=5, supports=_supports)
def _lightning_torch(*, q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
    if cu_seqlens is None:
        return lightning_chunked(q, k, v, decay, scale, initial_state)
    cu = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    outs, states = [], []
    for i, (q_i, k_i, v_i) in enumerate(zip(*(t.split(lengths, dim=1) for t in (q, k, v)))):  # split: see above
        s0 = None if initial_state is None else initial_state[i : i + 1]
        o_i, s_i = lightning_chunked(q_i, k_i, v_i, decay, scale, s0)
        outs.append(o_i)
        states.append(s_i)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


@backends.register("lightning_decode", "torch", priority=5, supports=_supports)
def _lightning_decode_torch(*, q, k, v, state, decay, scale):
    with torch.no_grad():
        o, new_state = lightning_chunked(q, k, v, decay, scale, state, chunk=max(1, q.shape[1]))
        state.copy_(new_state)
    return o
