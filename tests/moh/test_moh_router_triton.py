"""The Triton MoH router and packing kernels (SPEC §3) against the PyTorch reference.

Router: gates, probabilities and the gradients of the three logit tensors, held to SPEC §0's rule against
``learned_router``'s math in float64 (the reference itself is held bit-equal to ``learned_router`` first);
the top-k selection must match exactly (ties included: logits on a coarse grid make many). Packing: the
kernel's ``rows``/``counts``/``tile_offsets`` must equal ``pack_active_rows``' exactly, padding included.
Fresh output buffers are NaN-filled, so unwritten elements fail. Top-k ties: the lower head index wins
(``router.topk_mask``).
"""

import torch

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attnzoo import backends  # noqa: E402
from attnzoo.errors import BackendUnavailableError, InputError  # noqa: E402
from attnzoo.ops.moh.packing import pack_active_rows  # noqa: E402
from attnzoo.ops.moh.router import learned_router, load_balance_loss  # noqa: E402
from attnzoo.ops.moh.packing_api import moh_pack_rows  # noqa: E402
from attnzoo.ops.moh.router_api import moh_router, moh_router_reference, router_logits  # noqa: E402

from accuracy import assert_close_by_rule  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(bool(backends.triton_device_reasons(torch.device(DEV))), reason="Triton cannot run here")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def make_logits(B, T, n, kind, scale, gen):
    if kind == "normal":
        x = torch.randn(B, T, n, generator=gen) * scale
    elif kind == "grid":  # small integers times a power of two: many exact ties, distinct values far apart
        x = torch.randint(-3, 4, (B, T, n), generator=gen).float() * scale
    else:  # "equal": every logit of a token the same (a fresh router: all gates exactly 1 under "code")
        x = torch.randn(B, T, 1, generator=gen).expand(B, T, n) * scale
    return x


def split(z, hr, hs, mix):
    """Strided views ``[B, T, h_r]``, ``[B, T, h_s]``, ``[B, T, 2]`` of one ``[B, T, h_r + h_s + 2]`` tensor."""
    lr = z[..., :hr] if hr else None
    ls = z[..., hr:hr + hs] if hs else None
    lm = z[..., hr + hs:] if mix else None
    return lr, ls, lm


def run_router(z, hr, hs, mix, top_k, normalize, dtype, backend, dg, dp, contiguous):
    z = z.detach().to(DEV, dtype).requires_grad_()
    lr, ls, lm = split(z, hr, hs, mix)
    if contiguous:
        lr, ls, lm = (t.contiguous() if t is not None else None for t in (lr, ls, lm))
    if backend == "reference":
        out = moh_router_reference(lr, ls, lm, top_k, normalize, gates_dtype=dtype)
    else:
        out = moh_router(lr, ls, lm, top_k, normalize, gates_dtype=dtype, backend=backend)
    loss = (out.gates.double() * dg.to(DEV)).sum()
    if out.probs is not None:
        loss = loss + (out.probs.double() * dp.to(DEV)).sum()
    (dz,) = torch.autograd.grad(loss, [z])
    return out, dz


def check_router(B, T, hr, hs, mix, top_k, normalize, kind, scale, dtype, seed, contiguous=False):
    gen = torch.Generator().manual_seed(seed)
    z = make_logits(B, T, hr + hs + 2, kind, scale, gen)
    if kind == "equal":
        z = z.contiguous()
    z = z.to(dtype)  # the logits every path sees are representable in dtype
    dg = torch.randn(B, T, hr + hs, generator=gen, dtype=torch.float64)
    dp = torch.randn(B, T, hr, generator=gen, dtype=torch.float64)
    args = (hr, hs, mix, top_k, normalize)
    got, dz = run_router(z, *args, dtype, "triton", dg, dp, contiguous)
    hi, dz_hi = run_router(z.double(), *args, torch.float64, "reference", dg, dp, contiguous)
    lo, dz_lo = run_router(z, *args, dtype, "reference", dg, dp, contiguous)
    assert got.gates.dtype == dtype and got.gates.shape == (B, T, hs + hr)
    assert torch.equal(got.selected.cpu(), hi.selected.cpu()), "top-k selection differs from the reference"
    assert_close_by_rule(got.gates, hi.gates, lo.gates, f"gates ({dtype})", dtype=dtype)
    if hr:
        assert got.probs.dtype == torch.float32
        assert_close_by_rule(got.probs, hi.probs, lo.probs, "probs", dtype=torch.float32)
        # the load-balance loss the module computes from them
        lb = [load_balance_loss(o.probs, o.selected) for o in (got, hi, lo)]
        assert_close_by_rule(*lb, "load_balance_loss", dtype=torch.float32)
    else:
        assert got.probs is None and got.selected.shape == (B, T, 0)
    assert_close_by_rule(dz, dz_hi, dz_lo, f"d logits ({dtype})", dtype=dtype)
    if kind == "equal" and normalize == "code":  # a fresh router: every active gate exactly 1
        g = got.gates.float()
        assert bool(((g == 0) | (g == 1)).all()), "equal logits must give gates of exactly 0 or 1"
        assert int((g == 1).sum()) == B * T * (hs + top_k)
    if kind == "equal" and hr:  # ties: the lowest head indices win (router.topk_mask)
        assert bool(got.selected[..., :top_k].all()) and not bool(got.selected[..., top_k:].any())
    return got


def test_reference_is_learned_router():
    """``moh_router_reference(router_logits(...))`` is ``learned_router`` bit for bit (fp32 and fp16 x)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        for hs, hr, k in ((2, 6, 2), (0, 5, 3), (3, 0, 0), (1, 1, 1)):
            for normalize in ("code", "paper"):
                x = torch.randn(2, 9, 16, generator=gen).to(dtype)
                for init in (False, True):  # random weights; zero weights (module init: every logit ties)
                    w = [(torch.zeros(n, 16) if init else torch.randn(n, 16, generator=gen) * 0.5).to(dtype)
                         if n else None for n in (hr, hs, 2 if hs and hr else 0)]
                    want = learned_router(x, *w, k, normalize)
                    got = moh_router_reference(*router_logits(x, *w), k, normalize, gates_dtype=dtype)
                    assert torch.equal(got.gates, want.gates) and torch.equal(got.selected, want.selected)
                    assert (got.probs is None and want.probs is None) or torch.equal(got.probs, want.probs)


@settings(max_examples=max(60, settings.default.max_examples))
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 40),
    hs=st.sampled_from([0, 1, 2]),
    hr=st.integers(1, 8),
    k_frac=st.floats(0.0, 1.0),
    normalize=st.sampled_from(["code", "paper"]),
    kind=st.sampled_from(["normal", "grid", "equal"]),
    big=st.booleans(),
    mix=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    contiguous=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_router_matches_reference(B, T, hs, hr, k_frac, normalize, kind, big, mix, dtype, contiguous, seed):
    top_k = 1 + int(k_frac * (hr - 1) + 0.5)
    scale = {"normal": 12.0 if big else 1.0, "grid": 4.0 if big else 0.25, "equal": 3.0}[kind]
    check_router(B, T, hr, hs, mix and hs > 0, top_k, normalize, kind, scale, dtype, seed, contiguous)


@pytest.mark.parametrize("hs,mix", [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("normalize", ["code", "paper"])
def test_router_shared_only(hs, mix, normalize):
    check_router(2, 19, 0, hs, mix, 0, normalize, "normal", 2.0, torch.float32, seed=hs)


@pytest.mark.parametrize("hs,hr,k", [(2, 6, 3), (41, 47, 41), (1, 61, 55)])  # n * fl(1/n) != 1 for 41, 47, 55, 61
def test_router_zero_logits_and_module_init(hs, hr, k):
    """The module's zero-initialised router: gates exactly 1 on active heads; the lowest k routed heads."""
    z = torch.zeros(2, 5, 16, device=DEV)
    w = [torch.zeros(n, 16, device=DEV) for n in (hr, hs, 2)]
    out = moh_router(*router_logits(z, *w), k, backend="triton")
    want = torch.tensor([1.0] * (hs + k) + [0.0] * (hr - k), device=DEV).expand(2, 5, -1)
    assert torch.equal(out.gates, want)


@pytest.mark.parametrize("T", [0, 1])
def test_router_tiny(T):
    check_router(1, max(T, 1), 4, 1, True, 2, "code", "normal", 1.0, torch.float32, seed=T)
    lr = torch.zeros(2, T, 4, device=DEV)
    out = moh_router(lr, torch.zeros(2, T, 1, device=DEV), None, 2, backend="triton")
    assert out.gates.shape == (2, T, 5) and out.probs.shape == (2, T, 4)


@settings(max_examples=max(40, settings.default.max_examples))
@given(
    B=st.integers(1, 2),
    T=st.integers(1, 70),
    H=st.integers(1, 6),
    frac=st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]),
    block_m=st.sampled_from([1, 7, 16, 64]),
    shared=st.integers(0, 2),
    dtype=st.sampled_from(DTYPES),
    transposed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packing_matches_reference(B, T, H, frac, block_m, shared, dtype, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    num_shared = min(shared, H)
    g = torch.rand(B, H, T, generator=gen) + 0.5
    g = g.masked_fill(torch.rand(B, H, T, generator=gen) >= frac, 0.0)
    g[:, :num_shared] = 0.75  # shared heads are active
    g = g.to(DEV, dtype).transpose(1, 2)  # [B, T, H], non-contiguous
    if not transposed:
        g = g.contiguous()
    want = pack_active_rows(g, block_m)
    for ns in {0, num_shared}:
        got = moh_pack_rows(g, block_m, ns, backend="triton")
        for name in ("rows", "counts", "tile_offsets"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype == torch.int32 and torch.equal(a, b), f"{name} differs (num_shared={ns})"
        assert (got.block_m, got.max_tiles) == (want.block_m, want.max_tiles)


def test_packing_shared_heads_need_no_gate():
    """Heads below ``num_shared`` are listed as fully active whatever their gate (reference agrees)."""
    g = torch.zeros(2, 21, 3, device=DEV)
    g[:, ::3, 2] = 1.0
    got = moh_pack_rows(g, 16, 2, backend="triton")
    ref = moh_pack_rows(g, 16, 2, backend="reference")
    assert got.counts.tolist() == [21, 21, 7, 21, 21, 7]
    assert torch.equal(got.rows, ref.rows) and torch.equal(got.tile_offsets, ref.tile_offsets)
    assert torch.equal(got.rows[:, 0].cpu(), torch.arange(21, dtype=torch.int32).expand(2, -1))


def test_router_then_packing():
    """End to end: kernel gates -> kernel packing == pack_active_rows of the same gates."""
    gen = torch.Generator().manual_seed(3)
    hs, hr, k = 1, 7, 3
    z = torch.randn(2, 33, hs + hr + 2, generator=gen).to(DEV)
    out = moh_router(*split(z, hr, hs, True), k, backend="triton")
    got = moh_pack_rows(out.gates, 16, hs, backend="triton")
    want = pack_active_rows(out.gates, 16)
    assert torch.equal(got.rows, want.rows) and torch.equal(got.counts, want.counts)
    assert torch.equal(got.tile_offsets, want.tile_offsets)
    assert got.counts.view(2, -1)[:, hs:].sum().item() == 2 * 33 * k


def test_custom_ops_opcheck():
    from attnzoo.ops.moh import triton_packing as TP
    from attnzoo.ops.moh import triton_router as TR

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 9, generator=gen).to(DEV)
    lr, ls, lm = z[..., :5].contiguous(), z[..., 5:7].contiguous(), z[..., 7:].contiguous()
    lr.requires_grad_()
    ls.requires_grad_()
    lm.requires_grad_()
    quick = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(TR.moh_router_fwd, (lr, ls, lm, 2, True, torch.float32))  # + aot_dispatch_dynamic
    torch.library.opcheck(TR.moh_router_fwd, (lr, None, None, 3, False, torch.float16), test_utils=quick)
    dg, dp = torch.randn(2, 5, 7, device=DEV), torch.randn(2, 5, 5, device=DEV)
    torch.library.opcheck(TR.moh_router_bwd, (dg, dp, lr.detach(), ls.detach(), lm.detach(), 2, True),
                          test_utils=quick[:2])
    torch.library.opcheck(TP.moh_pack_rows, ((z > 0).float(), 16, 1))


def test_dispatch_and_validation():
    lr = torch.randn(1, 4, 3, device=DEV)
    if DEV == "cpu":  # auto never picks the interpreter
        assert backends.select("moh_router", "auto", logits_routed=lr, logits_shared=None, logits_mix=None,
                               top_k=1, normalize="code", gates_dtype=None).backend == "reference"
    with pytest.raises(BackendUnavailableError, match="float64"):
        moh_router(lr.double(), None, None, 1, backend="triton")
    with pytest.raises(InputError, match="top_k"):
        moh_router(lr, None, None, 4)
    with pytest.raises(InputError, match="logits_shared"):
        moh_router(lr, torch.randn(1, 5, 2, device=DEV), None, 1)
    with pytest.raises(InputError, match="logits_mix"):
        moh_router(lr, torch.randn(1, 4, 2, device=DEV), torch.randn(1, 4, 3, device=DEV), 1)
    with pytest.raises(InputError, match="at least one"):
        moh_router(None, None, None, 1)
    with pytest.raises(InputError, match="normalize"):
        moh_router(lr, None, None, 1, "both")
    with pytest.raises(InputError, match="num_shared"):
        moh_pack_rows(torch.ones(1, 4, 2, device=DEV), 16, 3)
