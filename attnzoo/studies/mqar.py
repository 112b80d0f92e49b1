"""Study 1: multi-query associative recall (MQAR) with the pairs beyond a short window.

Claims tested (from the papers): dynamic mask attention (DMA) recalls where a sliding window of the same
budget fails, because it keeps the keys its learned bias ranks highest wherever they are; linear
(lightning) attention, a fixed-size state, degrades as the number of pairs grows (Zoology)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from attnzoo.studies.common import check_run, environment, fmt, plot_bars, plot_curves, save_study
from attnzoo.studies.data import IGNORE, MQAR
from attnzoo.studies.model import VARIANTS, TinyLM, attention_params, num_params
from attnzoo.studies.train import train

NAME = "mqar"
VARIANT_LIST = ["mha", "swa", "dma", "lightning", "moh50", "kha"]


def config(quick: bool) -> dict:
    if quick:
        return dict(seq_len=32, num_keys=16, num_values=16, pairs=[2, 4], window=4, dim=32, num_heads=4,
                    num_layers=2, batch_size=8, steps=20, lr=3e-3, eval_sequences=32, seeds=[0])
    return dict(seq_len=64, num_keys=32, num_values=32, pairs=[2, 4, 8], window=8, dim=64, num_heads=4,
                num_layers=2, batch_size=32, steps=400, lr=3e-3, eval_sequences=256, seeds=[0, 1, 2])


@torch.no_grad()
def recall_accuracy(model, data: MQAR, num_pairs: int, n: int, seed: int) -> float:
    g = torch.Generator().manual_seed(10_000 + seed * 100 + num_pairs)  # the same set for every variant
    x, y = data.batch(n, num_pairs, g)
    model.eval()
    pred = model(x).argmax(-1)
    keep = y != IGNORE
    return (pred[keep] == y[keep]).float().mean().item()


def run(out: Path, quick: bool, log, seeds=None, steps=None) -> dict:
    cfg = config(quick)
    if seeds is not None:
        cfg["seeds"] = list(seeds)
    if steps is not None:
        cfg["steps"] = steps
    data = MQAR(cfg["seq_len"], cfg["num_keys"], cfg["num_values"])
    t_start = time.perf_counter()
    runs = []
    for variant in VARIANT_LIST:
        for seed in cfg["seeds"]:
            torch.manual_seed(seed)
            model = TinyLM(variant, data.vocab, cfg["dim"], cfg["num_heads"], cfg["num_layers"], cfg["window"])
            g = torch.Generator().manual_seed(seed)
            pairs = cfg["pairs"]

            def next_batch(step, g=g, pairs=pairs):  # the pair counts in turn, so every run sees the same mix
                return data.batch(cfg["batch_size"], pairs[step % len(pairs)], g)

            log(f"[mqar] {variant} seed {seed}")
            t0 = time.perf_counter()
            hist = train(model, next_batch, steps=cfg["steps"], lr=cfg["lr"], log=log)
            acc = {str(n): recall_accuracy(model, data, n, cfg["eval_sequences"], 0) for n in pairs}
            runs.append(dict(
                name=f"{variant}/seed{seed}", variant=variant, seed=seed, description=VARIANTS[variant],
                params=num_params(model), attention_params=attention_params(model), train=hist,
                eval={f"recall_acc_{n}_pairs": a for n, a in acc.items()}, wall_seconds=time.perf_counter() - t0,
            ))
            log(f"  recall accuracy by number of pairs: {acc}  ({runs[-1]['wall_seconds']:.0f} s)")
    result = dict(study=NAME, quick=quick, config=cfg, environment=environment(), runs=runs,
                  wall_seconds=time.perf_counter() - t_start)
    result["problems"] = [p for r in runs for p in check_run(r)]
    out.mkdir(parents=True, exist_ok=True)
    return save_study(out, NAME, result, plot, report)


def by_variant(result, key):
    out = {}
    for r in result["runs"]:
        out.setdefault(r["variant"], []).append(r["eval"][key] if key in r["eval"] else r["train"][key])
    return out


def plot(out: Path, result: dict) -> None:
    cfg = result["config"]
    pairs = [str(n) for n in cfg["pairs"]]
    series = {}
    for r in result["runs"]:
        for n in pairs:
            series.setdefault(r["variant"], {}).setdefault(f"{n} pairs", []).append(r["eval"][f"recall_acc_{n}_pairs"])
    plot_bars(out / f"{NAME}_recall.png", [f"{n} pairs" for n in pairs], series,
              f"MQAR recall accuracy (seq {cfg['seq_len']}, pairs beyond a {cfg['window']}-token window; "
              f"{len(cfg['seeds'])} seeds)", "recall accuracy", ylim=(0, 1.02))
    plot_curves(out / f"{NAME}_loss.png", by_variant(result, "loss"),
                f"MQAR training loss (answers only), mean and min-max over {len(cfg['seeds'])} seeds", "loss")


def summary(result: dict) -> dict:
    """Mean and spread of recall accuracy per variant and pair count."""
    cfg = result["config"]
    rows = {}
    for v in VARIANT_LIST:
        rs = [r for r in result["runs"] if r["variant"] == v]
        if rs:
            rows[v] = {n: [r["eval"][f"recall_acc_{n}_pairs"] for r in rs] for n in cfg["pairs"]}
            rows[v]["params"] = rs[0]["params"]
    return rows


def report(result: dict) -> str:
    cfg = result["config"]
    rows = summary(result)
    lines = [
        f"## Study 1: multi-query associative recall (MQAR){' — QUICK smoke run' if result['quick'] else ''}",
        "",
        f"Sequences of {cfg['seq_len']} tokens: key-value pairs at the start, each key queried once in the second "
        f"half, so every answer lies more than {cfg['seq_len'] // 2 - 2 * max(cfg['pairs'])} tokens back — beyond the "
        f"sliding window (w = {cfg['window']}) and DMA's keep_window (= w). {cfg['num_keys']} keys, "
        f"{cfg['num_values']} values; training mixes {', '.join(map(str, cfg['pairs']))} pairs; accuracy on "
        f"{cfg['eval_sequences']} held-out sequences per pair count. Models: d_model {cfg['dim']}, "
        f"{cfg['num_layers']} layers, {cfg['num_heads']} heads, {cfg['steps']} steps of batch {cfg['batch_size']}, "
        f"AdamW lr {cfg['lr']}, seeds {cfg['seeds']}. Mean ± std over seeds.",
        "",
        "| variant | params | " + " | ".join(f"recall, {n} pairs" for n in cfg["pairs"]) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in cfg["pairs"]) + " |",
    ]
    for v, row in rows.items():
        lines.append(f"| {v} | {row['params']:,} | " + " | ".join(fmt(row[n], 2) for n in cfg["pairs"]) + " |")
    lines += ["", f"![recall]({NAME}_recall.png)", f"![loss]({NAME}_loss.png)", "",
              f"Wall time: {result['wall_seconds'] / 60:.1f} min. Backends used: "
              + ", ".join(sorted({f"{op}: {b}" for r in result['runs'] for op, b in r['train']['backends'].items()})) + "."]
    if result["problems"]:
        lines += ["", "Self-check problems: " + "; ".join(result["problems"])]
    return "\n".join(lines) + "\n"
