"""Study 3: converting a trained MHA char-LM (study 2) with ``attnzoo.convert`` and uptraining it.

MHA -> GQA with 2 kv heads (``mha_to_gqa``: mean-pooled K/V projections, GQA paper) and MHA -> MoH with
75% of the heads active (``mha_to_moh``, 1 shared + top-2 of 3 routed, the parameter-free ``qnorm``
router), each swapped into the model with ``convert.swap_modules``; held-out loss before conversion,
right after, and after a short uptraining. Control: the MHA model trained for the same extra steps."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from attnzoo import convert
from attnzoo.modules.mha import MultiHeadAttention
from attnzoo.studies import charlm
from attnzoo.studies.common import check_run, environment, fmt, plot_bars, plot_curves, save_study
from attnzoo.studies.data import CharCorpus, pydoc_text
from attnzoo.studies.model import TinyLM, num_params
from attnzoo.studies.train import train

NAME = "conversion"
TARGETS = {
    "gqa (mean pool, 2 kv heads)": lambda m: convert.mha_to_gqa(m, num_kv_heads=2),
    "moh75 (qnorm router)": lambda m: convert.mha_to_moh(m, num_shared_heads=1, top_k=2, router="qnorm"),
    "mha (control: no conversion)": lambda m: copy.deepcopy(m),
}


def config(quick: bool) -> dict:
    base = charlm.config(quick)
    base.update(uptrain_steps=8 if quick else 100, uptrain_lr=1e-3)
    return base


def run(out: Path, quick: bool, log, seeds=None, steps=None) -> dict:
    cfg = config(quick)
    if seeds is not None:
        cfg["seeds"] = list(seeds)
    if steps is not None:
        cfg["uptrain_steps"] = steps
    corpus = CharCorpus(pydoc_text())
    batches = corpus.eval_batches(cfg["eval_batches"], cfg["eval_batch_size"], cfg["seq_len"])
    t_start = time.perf_counter()
    runs = []
    for seed in cfg["seeds"]:
        path = out / "checkpoints" / f"charlm_mha_seed{seed}.pt"
        if path.exists():
            torch.manual_seed(seed)
            base = TinyLM("mha", corpus.vocab, cfg["dim"], cfg["num_heads"], cfg["num_layers"], cfg["window"])
            base.load_state_dict(torch.load(path))
            source = str(path.name)
        else:  # study 2 was not run into this folder: train the MHA model the same way
            log(f"[conversion] no {path}; training the study-2 MHA model for seed {seed}")
            base, _ = charlm.train_one("mha", seed, cfg, corpus, log)
            source = "trained here (study 2 settings)"
        before = charlm.eval_loss(base, batches)
        for target, fn in TARGETS.items():
            log(f"[conversion] seed {seed}: {target}")
            t0 = time.perf_counter()
            model = copy.deepcopy(base)
            convert.swap_modules(model, lambda m: fn(m) if isinstance(m, MultiHeadAttention) else None)
            after = charlm.eval_loss(model, batches)
            g = torch.Generator().manual_seed(1000 + seed)
            hist = train(model, lambda step: corpus.batch("train", cfg["batch_size"], cfg["seq_len"], g),
                         steps=cfg["uptrain_steps"], lr=cfg["uptrain_lr"], warmup=max(1, cfg["uptrain_steps"] // 10),
                         log=log)
            uptrained = charlm.eval_loss(model, batches)
            runs.append(dict(name=f"{target}/seed{seed}", target=target, seed=seed, source=source,
                             params_before=num_params(base), params_after=num_params(model),
                             attention_class=type(model.blocks[0].attn).__name__, train=hist,
                             eval=dict(loss_before=before, loss_converted=after, loss_uptrained=uptrained),
                             wall_seconds=time.perf_counter() - t0))
            log(f"  held-out loss: before {before:.4f}, converted {after:.4f}, uptrained {uptrained:.4f}")
    result = dict(study=NAME, quick=quick, config=cfg, environment=environment(), runs=runs,
                  wall_seconds=time.perf_counter() - t_start)
    # uptraining starts from a trained model: "falling" is judged against the loss right after conversion
    problems = [p for r in runs for p in check_run(r) if "did not fall" not in p]
    for r in runs:
        if not r["eval"]["loss_uptrained"] <= r["eval"]["loss_converted"] + 1e-3:
            problems.append(f"{r['name']}: uptraining did not lower the held-out loss")
    result["problems"] = problems
    return save_study(out, NAME, result, plot, report)


def plot(out: Path, result: dict) -> None:
    stages = [("loss_before", "MHA (before)"), ("loss_converted", "converted"), ("loss_uptrained", "uptrained")]
    series = {}
    for r in result["runs"]:
        for key, label in stages:
            series.setdefault(label, {}).setdefault(r["target"], []).append(r["eval"][key])
    plot_bars(out / f"{NAME}.png", list(TARGETS), series,
              f"held-out loss before / right after conversion / after {result['config']['uptrain_steps']} uptraining steps",
              "nats/char", zoom=True)
    curves = {}
    for r in result["runs"]:
        curves.setdefault(r["target"], []).append(r["train"]["loss"])
    plot_curves(out / f"{NAME}_uptrain.png", curves, "uptraining loss after conversion (mean, min-max over seeds)",
                "loss (nats/char)", smooth_k=5)


def summary(result: dict) -> dict:
    rows = {}
    for t in TARGETS:
        rs = [r for r in result["runs"] if r["target"] == t]
        if rs:
            rows[t] = dict(params=(rs[0]["params_before"], rs[0]["params_after"]),
                           **{k: [r["eval"][k] for r in rs] for k in ("loss_before", "loss_converted", "loss_uptrained")})
    return rows


def report(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"## Study 3: converting the trained MHA char-LM{' — QUICK smoke run' if result['quick'] else ''}",
        "",
        f"The study-2 MHA models (seeds {cfg['seeds']}; source: "
        f"{', '.join(sorted({r['source'] for r in result['runs']}))}) "
        "converted layer by layer with `attnzoo.convert` through `convert.swap_modules`, then uptrained for "
        f"{cfg['uptrain_steps']} steps (AdamW lr {cfg['uptrain_lr']}, warmup 10%, cosine) on the training split. "
        "Control: the unconverted MHA model uptrained the same way. Held-out loss in nats/char, mean ± std over seeds.",
        "",
        "| conversion | params | before | right after conversion | after uptraining |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for t, r in summary(result).items():
        lines.append(f"| {t} | {r['params'][0]:,} -> {r['params'][1]:,} | {fmt(r['loss_before'])} | "
                     f"{fmt(r['loss_converted'])} | {fmt(r['loss_uptrained'])} |")
    lines += ["", f"![conversion]({NAME}.png)", f"![uptrain]({NAME}_uptrain.png)", "",
              f"Wall time: {result['wall_seconds'] / 60:.1f} min."]
    if result["problems"]:
        lines += ["", "Self-check problems: " + "; ".join(result["problems"])]
    return "\n".join(lines) + "\n"
