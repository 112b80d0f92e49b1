"""``attnzoo.info()``: what this machine has and which backend can run each op here (``attnzoo info``).

Kept apart from the CLI so that ``import attnzoo`` imports no command-line code.
"""

from __future__ import annotations

import platform


def info(print_it: bool = True) -> str:
    """Versions, devices, and for each op which backends can run here and why not (``attnzoo info``)."""
    import torch

    import attnzoo
    from attnzoo import backends
    from attnzoo.check import _dispatch_kwargs, all_cases

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    lines = [
        f"attnzoo  {attnzoo.__version__}",
        f"python   {platform.python_version()}",
        f"torch    {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton   {triton_v}" + (" (CPU interpreter on)" if backends.triton_interpreter_on() else ""),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}    {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("gpu      none (CPU only)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    lines += [
        "",
        f"backends on {device} (for a small sample input of each op):",
        "  'auto' picks the best backend that says yes, but never a Triton kernel running through the CPU",
        "  interpreter (that is for tests: pass backend='triton' to use it).",
    ]
    seen = set()
    for case in all_cases():
        if case.op in seen:
            continue
        seen.add(case.op)
        inputs = {}
        for k, v in case.make(torch.Generator().manual_seed(0)).items():
            if isinstance(v, torch.Tensor):
                v = v.to(device, dtype) if v.is_floating_point() else v.to(device)
            inputs[k] = v
        for b, rs in backends.why_not(case.op, **_dispatch_kwargs(case, inputs)).items():
            lines.append(f"  {case.op:<24} {b:<10} " + ("yes" if not rs else "no:  " + "; ".join(rs)))
    lines += ["", f"the auto policy on {device} (backends.AUTO_TABLE: op, when, order tried -> what auto picks here):"]
    lines += ["  " + ln for ln in backends.format_auto_table(torch.device(device)).splitlines()]
    text = "\n".join(lines)
    if print_it:
        print(text)
    return text
