"""SPEC §0's accuracy rule, shared by the kernel tests.

A kernel's max error against an fp64 reference must be at most ``2x`` the max error of the *same
reference evaluated in the kernel's own low precision*, plus a small absolute floor (the project's
table in ``attnzoo.testing``). Never "95% close". The rule itself is ``attnzoo.testing.assert_accuracy``;
this file adds the kernel tests' calling convention and a context manager that builds the low-precision
reference.

Non-finite reference values (e.g. ``lse = -inf`` for a row that sees no key) must be reproduced exactly,
and the kernel output must contain no NaN -- together with NaN-filled output buffers
(``ATTNZOO_FILL_NAN=1``) this catches elements a kernel forgot to write.
"""

from __future__ import annotations

import contextlib

import torch

from attnzoo.testing import assert_accuracy


def assert_close_by_rule(out, ref_fp64, ref_lowp, name, *, dtype=None, factor=2.0, floor=None):
    """``out``: the kernel's result; ``ref_fp64``: the reference in float64; ``ref_lowp``: the same reference
    evaluated in the kernel's precision (``dtype`` defaults to the lowp reference's dtype, else ``out``'s)."""
    assert out is not None, f"{name}: kernel returned None"
    assert ref_fp64 is not None and ref_lowp is not None, f"{name}: reference returned None"
    dtype = dtype or (ref_lowp.dtype if ref_lowp.dtype != torch.float64 else out.dtype)
    return assert_accuracy(out.detach(), ref_fp64.detach(), ref_lowp.detach(), name, dtype, factor=factor, floor=floor)


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


def check_op_against_reference(op, reference, inputs, do, names, *, dtype=None, **kw):
    """``op(*inputs, **kw)`` (a backend of an op) against ``reference``: its output and the gradients of every
    input under the cotangent ``do``, by the accuracy rule -- the fp64 reference, and the reference in the
    inputs' own precision (:func:`lowp_reference`) as the baseline. ``names``: the output's, then each
    input's gradient's. Returns the op's ``[out, *grads]``."""

    def run(fn, cast):
        ins = [cast(t).detach().requires_grad_() for t in inputs]
        o = fn(*ins, **kw)
        return [o] + list(torch.autograd.grad(o, ins, do.to(o.dtype)))

    got = run(op, lambda t: t)
    ref = run(reference, lambda t: t.double())
    with lowp_reference():
        low = run(reference, lambda t: t)
    for name, a, r, lo in zip(names, got, ref, low):
        assert_close_by_rule(a, r, lo, name, dtype=dtype)
    return got
