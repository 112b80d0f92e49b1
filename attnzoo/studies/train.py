"""The training loop every study shares: AdamW, linear warmup then cosine decay, gradient clipping,
MoH load-balance loss added the way a user would (``0.01 * mean over layers`` of ``module.aux_loss``)."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from attnzoo import backends

AUX_WEIGHT = 0.01


@contextmanager
def record_backends():
    """Records ``{op: backend}`` of every op that ``backend="auto"`` dispatches inside the block."""
    seen: Dict[str, str] = {}
    original = backends.select

    def select(op, backend, **inputs):
        impl = original(op, backend, **inputs)
        seen[op] = impl.backend
        return impl

    backends.select = select
    try:
        yield seen
    finally:
        backends.select = original


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train(model, next_batch: Callable[[int], tuple], *, steps: int, lr: float, warmup: int = None,
          weight_decay: float = 0.1, clip: float = 1.0, log: Callable[[str], None] = None, log_every: int = 50) -> dict:
    """Train ``model`` for ``steps`` steps on ``next_batch(step) -> (x, y)``. Returns per-step task loss,
    MoH aux loss, gradient norm (before clipping), learning rate, the backends used and the wall time."""
    warmup = max(1, steps // 10) if warmup is None else warmup
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "knocking" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "knocking" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    hist = {"loss": [], "aux_loss": [], "grad_norm": [], "lr": []}
    model.train()
    t0 = time.perf_counter()
    used: Dict[str, str] = {}
    for step in range(steps):
        x, y = next_batch(step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        if step == 0:
            with record_backends() as used:
                loss = lm_loss(model(x), y)
        else:
            loss = lm_loss(model(x), y)
        aux = model.aux_loss()
        opt.zero_grad(set_to_none=True)
        (loss + AUX_WEIGHT * aux).backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        hist["loss"].append(loss.item())
        hist["aux_loss"].append(float(aux.detach()))
        hist["grad_norm"].append(float(gn))
        hist["lr"].append(opt.param_groups[0]["lr"])
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"  step {step:4d} loss {loss.item():.4f} aux {float(aux):.4f} gnorm {float(gn):.2f}")
    hist["train_seconds"] = time.perf_counter() - t0
    hist["backends"] = dict(used)
    return hist


def spikes(losses: List[float], *, skip: int, window: int = 10, rels=(0.05, 0.10)) -> dict:
    """Loss spikes: steps (after ``skip``) whose loss exceeds the mean of the previous ``window`` steps by
    more than ``rel`` (relative), counted for each threshold in ``rels``; and the largest relative jump."""
    counts, worst = {r: 0 for r in rels}, 0.0
    for t in range(max(skip, window), len(losses)):
        ref = sum(losses[t - window : t]) / window
        jump = (losses[t] - ref) / ref
        worst = max(worst, jump)
        for r in rels:
            counts[r] += jump > r
    out = {f"count_over_{round(100 * r)}pct": c for r, c in counts.items()}
    out["count"] = counts[max(rels)]
    out["max_rel_jump"] = worst
    return out
