"""The benchmark suites, by name, in the order ``attnzoo bench`` runs them."""

from __future__ import annotations

from typing import Dict, List

from benchmarks.suites.base import Case, Suite

_MODULES = ("attention", "decode", "lightning", "moh", "sparse", "knocking")
NAMES: List[str] = list(_MODULES)  # the GPU suites (the default of `attnzoo bench`)
#: suites that run on the CPU, by their own driver (``benchmarks.suites.cpu.main``); only when named
CPU_NAMES: List[str] = ["cpu"]


def get(name: str) -> Suite:
    """The suite called ``name`` (ValueError naming the known suites otherwise)."""
    if name not in _MODULES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(_MODULES + tuple(CPU_NAMES))}")
    import importlib

    return importlib.import_module(f"benchmarks.suites.{name}").SUITE


def all_suites() -> Dict[str, Suite]:
    return {n: get(n) for n in _MODULES}


__all__ = ["Case", "Suite", "NAMES", "CPU_NAMES", "get", "all_suites"]
