"""The attention autotune lists' flags (triton_fwd.NOT_SPARSE / NOT_KEY_DBIAS / FULL_REGS): the pruner drops
a flagged config exactly where its flag says, and FULL_REGS configs compile with ``maxnreg=255``. (Which
configs spill is checked offline by tools/cross_compile.py, not here.)"""

import pytest
import torch

from attnzoo import backends

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(bool(backends.triton_device_reasons(torch.device(DEV))),
                                reason="Triton cannot run here")


def test_flags_prune_and_set_registers():
    from attnzoo.ops.attention import triton_fwd as F

    cfgs = [F._config(128, 32, 8, 2, F.SMALL, F.NOT_SPARSE, F.NOT_KEY_DBIAS),
            F._config(32, 16, 2, 2, F.SMALL),
            F._config(16, 16, 2, 2, F.ALL, F.FULL_REGS)]

    def kept(**launch):
        out = F.prune_for_block_mask(cfgs, {"BLOCK_D": 64, "BLOCK_DV": 64}, **launch)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in out]

    assert kept() == [(128, 32), (32, 16), (16, 16)]
    assert kept(DB_MODE=1) == [(128, 32), (32, 16), (16, 16)]  # per-query dbias: tiles, not a register sum
    assert kept(DB_MODE=2) == [(32, 16), (16, 16)]
    assert kept(SPARSE=True, BM_BQ=128, BM_BK=128) == [(32, 16), (16, 16)]
    assert kept(SPARSE=True, BM_BQ=16, BM_BK=16) == [(16, 16)]
    assert [c.maxnreg for c in cfgs] == [None, None, 255]


def test_listed_flags_are_known():
    from attnzoo.ops.attention import triton_bwd as Bw, triton_fwd as F

    known = {F.NOT_SPARSE, F.NOT_KEY_DBIAS, F.FULL_REGS}
    for lst in (F.GPU_FWD_CONFIGS, Bw.GPU_DKDV_CONFIGS, Bw.GPU_DQ_CONFIGS):
        for c in lst:
            assert set(c[5:]) <= known, c
