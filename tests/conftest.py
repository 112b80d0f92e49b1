"""Test set-up, in one place: without a GPU, run Triton kernels through the CPU interpreter; fill every
fresh kernel output with NaN (``ATTNZOO_FILL_NAN=1``, read by ``attnzoo.ops.triton_common.new_output``) so
an element a kernel forgets to write shows up.

TRITON_INTERPRET must be set before any Triton kernel is defined, so this runs before attnzoo (or any
kernel module) is imported. On a GPU machine the same tests run the kernels natively.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ATTNZOO_FILL_NAN"] = "1"

from hypothesis import HealthCheck, settings  # noqa: E402

from torchvision_cpu import declare_torchvision_ops_if_unloadable  # noqa: E402

# timm and transformers import torchvision; PyPI's build of it cannot load into CPU torch (see the module)
declare_torchvision_ops_if_unloadable()

# Bounded profiles: the CPU suite must stay within minutes on 2 cores.
settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("gpu", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("ATTNZOO_HYPOTHESIS_PROFILE", "gpu" if torch.cuda.is_available() else "ci"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
