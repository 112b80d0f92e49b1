"""KHA-MLP's "torch" backend (SPEC §4) against the reference by the accuracy rule (output and the gradients of
v and the three weights), the baseline being the reference on the same low-precision inputs."""

import pytest
import torch

from attnzoo.ops.knocking import reference as R
from attnzoo.ops.knocking.api import kha_mlp
from attnzoo.testing import assert_accuracy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [8, 64])
def test_against_reference(dtype, D):
    g = torch.Generator().manual_seed(D)
    v = torch.randn(2, 9, 3, D, generator=g)
    ws = [torch.randn(D, D, generator=g) * D**-0.5 for _ in range(3)]
    do = torch.randn(2, 9, 3, D, generator=g)

    def run(fn, vd, wd):
        ins = [v.to(vd).requires_grad_()] + [w.to(wd).requires_grad_() for w in ws]
        o = fn(*ins)
        return [o] + list(torch.autograd.grad(o, ins, do.to(o.dtype)))

    got = run(lambda *a: kha_mlp(*a, backend="torch"), dtype, torch.float32)
    hi = run(R.kha_mlp, torch.float64, torch.float64)
    # the baseline: the reference on the backend's own inputs (fp16 v, fp32 weights; it computes in fp32, as
    # the backend does) -- the one `attnzoo check` uses
    lo = run(R.kha_mlp, dtype, torch.float32)
    for name, a, b, c in zip(("o", "dv", "dw_up", "dw_gate", "dw_down"), got, hi, lo):
        assert_accuracy(a.detach(), b.detach(), c.detach(), name, dtype)
