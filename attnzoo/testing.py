"""The accuracy rule every kernel is held to (SPEC §0), shared by the tests and ``attnzoo check``.

Against a float64 reference, a kernel's max error must be at most ``2x`` the max error of the same
reference evaluated in the kernel's own low precision, plus a small absolute floor. Never "95% of
elements close".
"""

from __future__ import annotations

from typing import Tuple

import torch

FLOORS = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference, treating equal infinities (e.g. lse = -inf) as 0 and any NaN as inf."""
    a, b = a.double(), b.double()
    diff = (a - b).abs()
    same_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    diff = torch.where(same_inf, torch.zeros_like(diff), diff)
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0


def accuracy_rule(
    out: torch.Tensor,
    ref_hi: torch.Tensor,
    ref_lo: torch.Tensor,
    dtype: torch.dtype | None = None,
    *,
    factor: float = 2.0,
    floor: float | None = None,
) -> Tuple[bool, float, float]:
    """``(ok, err, tol)`` with ``err = |out - ref_hi|_max``, ``tol = factor |ref_lo - ref_hi|_max + floor``
    (``floor`` defaults to the dtype's entry in ``FLOORS``). A NaN in ``out``, a shape mismatch, or an
    infinity the reference does not have (e.g. lse = -inf of a fully masked row) fails: error inf."""
    dtype = dtype or out.dtype
    err = max_abs_error(out, ref_hi) if tuple(out.shape) == tuple(ref_hi.shape) else float("inf")
    ref_err = max_abs_error(ref_lo, ref_hi)
    if ref_err == float("inf"):
        # the low-precision reference overflowed or produced NaN: it bounds nothing (an infinite tolerance
        # would pass anything), so the check fails and the caller must pick a usable reference or floor
        return False, err, float("nan")
    tol = factor * ref_err + (FLOORS.get(dtype, 1e-5) if floor is None else floor)
    return err <= tol, err, tol


def assert_accuracy(out, ref_hi, ref_lo, name: str = "output", dtype=None, *, factor=2.0, floor=None):
    """Assert SPEC §0's rule; returns ``(err, tol)``."""
    assert tuple(out.shape) == tuple(ref_hi.shape), f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_hi.shape)}"
    assert not torch.isnan(out).any(), f"{name}: output has {int(torch.isnan(out).sum())} NaN(s) (unwritten or 0/0)"
    ok, err, tol = accuracy_rule(out, ref_hi, ref_lo, dtype, factor=factor, floor=floor)
    assert tol == tol, f"{name}: the low-precision reference is not finite where the fp64 one is; it bounds nothing"
    assert ok, (
        f"{name}: max error {err:.3e} vs fp64 exceeds {factor} x the low-precision reference's error + floor = {tol:.3e}"
    )
    return err, tol
