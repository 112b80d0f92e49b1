"""Lets the integration tests (transformers, timm; installed by the ``test`` extra) import torchvision on a
CPU-only torch. Called once from ``tests/conftest.py``.

CPU torch with the torchvision wheel from PyPI
----------------------------------------------
timm imports torchvision, and transformers imports it too once it is installed. For Linux x86-64 PyPI only
carries torchvision's CUDA build; with a CPU-only torch (CI's ``torch==2.13.0+cpu``) its compiled library
``torchvision/_C.so`` fails to load (it links libtorch_cuda). torchvision tolerates that, except that
``torchvision/_meta_registrations.py`` then registers fake kernels for two operators that were never
declared (``torchvision::nms``, ``torchvision::qnms``) and ``import torchvision`` raises. Declaring those two
schemas first (exactly as torchvision's C++ declares them) lets the pure-Python parts -- all that timm's ViT
and transformers' language models use -- import and run. Nothing is declared when the library loads.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_libs = []  # keep the Library objects alive: their definitions die with them


def declare_torchvision_ops_if_unloadable() -> bool:
    """Declare torchvision's ``nms``/``qnms`` schemas when torchvision is installed but its compiled
    library cannot load into this torch; returns whether it did."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    pkg = list(spec.submodule_search_locations)[0]
    lib = next((os.path.join(pkg, f) for f in os.listdir(pkg) if f.startswith("_C.") and f.endswith((".so", ".pyd"))), None)
    if lib is not None:
        try:
            torch.ops.load_library(lib)
            return False  # a matching build: nothing to do
        except (OSError, RuntimeError):
            pass
    missing = {n: s for n, s in _TORCHVISION_SCHEMAS.items() if not hasattr(torch.ops.torchvision, n)}
    if missing:
        frag = torch.library.Library("torchvision", "FRAGMENT")
        for schema in missing.values():
            frag.define(schema)
        _libs.append(frag)
    return bool(missing)

