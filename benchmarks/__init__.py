"""attnzoo's benchmark suite: attnzoo against the libraries people would use instead, on the same inputs
in the same run.

- ``attnzoo bench [--suite NAME ...] [--quick] [--out DIR] [--dry-run]`` or ``python -m benchmarks``
  (:func:`benchmarks.runner.main`);
- suites in :mod:`benchmarks.suites` (attention, decode, lightning, moh, sparse, knocking);
- providers (attnzoo's backends and the peers, each used when importable): each suite owns its own, on the shared protocol and helpers of :mod:`benchmarks.providers`;
- FLOP / byte formulas in :mod:`benchmarks.flops`;
- results under ``benchmarks/results/<gpu>/``, plots and ``benchmarks/RESULTS.md`` from
  :mod:`benchmarks.report`.

Importing this package needs neither a GPU nor any peer library.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """``attnzoo bench``'s entry point (see :func:`benchmarks.runner.main`)."""
    from benchmarks.runner import main as _main

    return _main(argv)
