"""SPEC §0's accuracy rule, shared by the kernel tests.

A kernel's max error against an fp64 reference must be at most ``2x`` the max error of the *same
reference evaluated in the kernel's own low precision*, plus a small absolute floor (the project's
table in ``attnzoo.testing``). Never "95% close". Same rule as ``attnzoo.testing.assert_accuracy``, plus
the checks below and a context manager that builds the low-precision reference.

Non-finite reference values (e.g. ``lse = -inf`` for a row that sees no key) must be reproduced exactly,
and the kernel output must contain no NaN -- together with NaN-filled output buffers
(``ATTNZOO_FILL_NAN=1``) this catches elements a kernel forgot to write.
"""

from __future__ import annotations

import contextlib

import torch

try:  # one table of floors for the whole project
    from attnzoo.testing import FLOORS
except ImportError:  # pragma: no cover
    FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    fin = torch.isfinite(ref)
    if not fin.any():
        return 0.0
    return (a[fin] - ref[fin]).abs().max().nan_to_num(nan=float("inf")).item()


def assert_close_by_rule(out, ref_fp64, ref_lowp, name, *, dtype=None, factor=2.0, floor=None):
    """``out``: the kernel's result; ``ref_fp64``: the reference in float64; ``ref_lowp``: the same reference
    evaluated in the kernel's precision (``dtype`` defaults to ``out.dtype``, or the lowp ref's dtype)."""
    assert out is not None, f"{name}: kernel returned None"
    assert ref_fp64 is not None and ref_lowp is not None, f"{name}: reference returned None"
    assert tuple(out.shape) == tuple(ref_fp64.shape), (
        f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_fp64.shape)}"
    )
    dtype = dtype or (ref_lowp.dtype if ref_lowp.dtype != torch.float64 else out.dtype)
    o = out.detach().double()
    r = ref_fp64.detach().double()
    assert not torch.isnan(o).any(), f"{name}: kernel output has {int(torch.isnan(o).sum())} NaN(s) (unwritten or 0/0)"
    fin = torch.isfinite(r)
    if not fin.all():
        same = torch.equal(torch.isfinite(o), fin) and torch.equal(o[~fin], r[~fin])
        assert same, f"{name}: non-finite entries differ from the reference (e.g. lse = -inf of fully masked rows)"
    err = max_err(o, r)
    ref_err = max_err(ref_lowp, r)
    if floor is None:
        floor = FLOORS.get(dtype, 1e-3)
    bound = factor * ref_err + floor
    assert err <= bound, (
        f"{name}: max error {err:.3e} vs fp64 exceeds {factor} x {ref_err:.3e} (reference in {dtype}) + floor {floor:.1e}"
    )
    return err, ref_err


@contextlib.contextmanager
def lowp_reference():
    """Inside, the PyTorch attention reference computes in its inputs' dtype instead of upcasting to fp32
    (the "same reference evaluated in the kernel's own low precision" of the accuracy rule)."""
    from attnzoo.ops.attention import reference as R

    saved = R.compute_dtype
    R.compute_dtype = lambda dtype: dtype
    try:
        yield
    finally:
        R.compute_dtype = saved
