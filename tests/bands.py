"""The causal / window combinations that host-side band logic is property-tested over (block lists cut to
the band, MoH key-tile row ranges): one name per combination, drawn by hypothesis, turned into arguments."""

BAND_MODES = ["none", "causal", "window", "causal-window", "right-only", "both"]


def band_args(mode: str, left: int, right: int):
    """``(causal, window_left, window_right)`` of ``mode``; -1 = that side unbounded."""
    causal = mode in ("causal", "causal-window")
    wl = left if mode in ("window", "causal-window", "both") else -1
    wr = right if mode in ("right-only", "both") else -1
    return causal, wl, wr
