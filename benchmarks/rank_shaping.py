"""Rank-shaping training: does training with TRP or Maestro make a model easier to compress?

Pre-trains the tiny Llama of ``train_tiny_llama.py`` (its data, tokenizer, model, schedule and clipping, imported from
it) three ways, same steps, data, learning rate and seed: AdamW; AdamW plus TRP (``rankwise.optim.trp``: truncated SVD
every ``--trp-period`` steps at ``--trp-energy``, nuclear subgradient weight ``--trp-nuclear``); and Maestro layers
(``rankwise.nn.maestro``: every attention/MLP linear layer factorised at full rank from its initial SVD, trained with
ordered dropout, the hierarchical group lasso and progressive shrinking) with AdamW. Each trained model is then
compressed with plain ``svd`` at ``--ratio`` of the targeted parameters removed (``rankwise.compress_``; Maestro's
layers are first multiplied out into ``nn.Linear``) and its validation perplexity is measured before and after, as
ratios to the AdamW row. Also printed: the share of the squared singular values the kept rank holds (mean over the
targeted matrices), TRP's last truncation ranks and Maestro's learned ranks, and Maestro cut to the same ranks by
keeping its first factor pairs instead of an SVD.

Usage:
    python benchmarks/rank_shaping.py [--steps 200] [--methods adamw,trp,maestro] [--ratio 0.5] [--lr 1e-3]
        [--trp-period 20 --trp-energy 0.99 --trp-nuclear 3e-4] [--maestro-sampler layer --maestro-lasso 5e-3
        --maestro-threshold 1e-5 --maestro-shrink-every 50 --no-full-pass] [--work-dir /tmp/rankwise-train]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from train_tiny_llama import VAL_BATCHES, batches, build_model, lr_at, matrices, prepare, val_loss  # shared setup

from rankwise.compression import compress_
from rankwise.linalg.rank import rank_for_params_kept
from rankwise.methods.svd import SVDConfig
from rankwise.nn.maestro import MaestroLinear, MaestroSchedule
from rankwise.nn.train_layers import replace_linears
from rankwise.optim.trp import TRP
from rankwise.targets import find_targets

LABELS = {"adamw": "AdamW", "trp": "AdamW + TRP", "maestro": "Maestro layers + AdamW",
          "maestro_prefix": "Maestro, first pairs kept (no SVD)"}


def train(method: str, args, data: dict) -> tuple[nn.Module, dict]:
    """Train one model; return it (Maestro layers multiplied out) and what to report."""
    train_batches = batches(data["train"], args.steps, seed=1)
    model = build_model(args.size, data["vocab"])
    info: dict = {}
    trp = schedule = None
    if method == "maestro":
        replace_linears(model, lambda lin, name: MaestroLinear.from_linear(lin))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    if method == "trp":
        low, _ = matrices(model)  # the attention and MLP weights, as train_tiny_llama projects them
        names = {id(p): n for n, p in model.named_parameters()}
        trp = TRP({names[id(p)]: p for p in low}, period=args.trp_period, energy=args.trp_energy,
                  nuclear=args.trp_nuclear)
    if method == "maestro":
        schedule = MaestroSchedule(model, opt, sampler=args.maestro_sampler, lasso=args.maestro_lasso,
                                   threshold=args.maestro_threshold, shrink_every=args.maestro_shrink_every, seed=0)
    start = time.perf_counter()
    for step, batch in enumerate(train_batches):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        if schedule is None:
            loss = model(input_ids=batch, labels=batch).loss
        else:  # the authors' step: a full pass, a sampled pass fitted to the full pass's predictions, the penalty
            schedule.full()
            out = model(input_ids=batch, labels=batch) if args.full_pass else None
            schedule.sample()
            logits = model(input_ids=batch).logits  # (B, T, V)
            schedule.full()
            if out is not None:
                target = out.logits.detach().softmax(-1)
                loss = out.loss + F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))
            else:
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
            loss = loss + schedule.penalty()
        loss.backward()
        if trp is not None:
            trp.regularize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if trp is not None:
            trp.step()
        if schedule is not None:
            schedule.step()
        if not math.isfinite(loss.item()):
            raise SystemExit(f"{method} diverged at step {step}")
    info["train_s"] = time.perf_counter() - start
    if trp is not None:
        info["ranks"] = trp.ranks
    if schedule is not None:
        info["ranks"] = schedule.ranks()
        info["prefix_model"] = _prefix_copy(model, args.ratio)
        _multiply_out(model)
    return model, info


def _prefix_copy(model: nn.Module, ratio: float) -> nn.Module:
    """A copy whose Maestro layers keep only their first pairs, as many as ``svd`` at ``ratio`` would keep."""
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, MaestroLinear):
            m.truncate(min(m.rank, rank_for_params_kept(m.out_features, m.in_features, 1.0 - ratio)))
    return twin


def _multiply_out(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, MaestroLinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.to_linear())


@torch.no_grad()
def energy_kept(model: nn.Module, ratio: float) -> float:
    """Mean over the targeted matrices of the share of ``sum(s**2)`` the rank kept at ``ratio`` holds."""
    shares = []
    for m in find_targets(model).values():
        W = m.weight.double()
        S = torch.linalg.svdvals(W)
        k = rank_for_params_kept(W.shape[0], W.shape[1], 1.0 - ratio)
        shares.append(float((S[:k] ** 2).sum() / (S**2).sum()))
    return sum(shares) / len(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--methods", default="adamw,trp,maestro")
    parser.add_argument("--size", default="tiny", choices=("tiny", "llama60m"))
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's best rate on train_tiny_llama's grid")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of targeted parameters removed by svd")
    parser.add_argument("--trp-period", type=int, default=20)
    parser.add_argument("--trp-energy", type=float, default=0.99)
    parser.add_argument("--trp-nuclear", type=float, default=3e-4)
    parser.add_argument("--maestro-sampler", default="layer", choices=("layer", "independent"))
    parser.add_argument("--maestro-lasso", type=float, default=5e-3)
    parser.add_argument("--maestro-threshold", type=float, default=1e-5)
    parser.add_argument("--maestro-shrink-every", type=int, default=50)
    parser.add_argument("--no-full-pass", dest="full_pass", action="store_false",
                        help="Maestro: the sampled pass only (about half the cost)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rankwise-train"))
    args = parser.parse_args()
    data = torch.load(prepare(args.work_dir), weights_only=True)
    val = batches(data["val"], VAL_BATCHES, seed=2)
    calib = torch.cat(batches(data["train"], 2, seed=3))  # (16, SEQ) training windows; svd itself is data-free
    rows: dict[str, dict] = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in ("adamw", "trp", "maestro"):
            raise SystemExit(f"unknown method {method!r}; known: adamw, trp, maestro")
        model, info = train(method, args, data)
        model.eval()
        before = val_loss(model, val, "cpu")
        share = energy_kept(model, args.ratio)
        report = compress_(model, SVDConfig(ratio=args.ratio), calib, progress=False)
        after = val_loss(model, val, "cpu")
        prefix = info.pop("prefix_model", None)
        rows[method] = {**info, "before": before, "after": after, "share": share,
                        "removed": report.removed_fraction}
        print(f"{method}: val loss {before:.4f} -> {after:.4f} after svd ({info['train_s']:.0f} s training)",
              flush=True)
        if prefix is not None:
            layers = [m for m in prefix.modules() if isinstance(m, MaestroLinear)]
            dense = sum(m.in_features * m.out_features for m in layers)
            kept = sum(m.rank * (m.in_features + m.out_features) for m in layers)
            rows["maestro_prefix"] = {"before": before, "after": val_loss(prefix.eval(), val, "cpu"),
                                      "share": float("nan"), "removed": 1.0 - kept / dense,
                                      "train_s": info["train_s"],
                                      "ranks": {n: m.rank for n, m in prefix.named_modules()
                                                if isinstance(m, MaestroLinear)}}
    print(table(rows, args))


def table(rows: dict[str, dict], args) -> str:
    base = rows.get("adamw")
    lines = [f"{args.size} Llama, {args.steps} steps x 8 x 128 tokens, lr {args.lr:g} (cosine, 10 % warm-up, clip "
             f"1.0), seed 0, cpu, torch {torch.__version__}, {torch.get_num_threads()} threads. Compression: svd, "
             f"ratio {args.ratio} of the targeted parameters removed. TRP: period {args.trp_period}, energy "
             f"{args.trp_energy}, nuclear {args.trp_nuclear:g}. Maestro: sampler {args.maestro_sampler}, lasso "
             f"{args.maestro_lasso:g}, threshold {args.maestro_threshold:g}, shrink every "
             f"{args.maestro_shrink_every}, full pass {args.full_pass}.\n",
             "| method | train s | val ppl | vs AdamW | ppl after svd | vs AdamW | after / before | removed | "
             "energy in kept rank | mean rank (TRP: last truncation; Maestro: learned) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, r in rows.items():
        ppl, after = math.exp(r["before"]), math.exp(r["after"])
        vs = f"{ppl / math.exp(base['before']):.3f}x" if base else ""
        vs_after = f"{after / math.exp(base['after']):.3f}x" if base else ""
        ranks = r.get("ranks")
        mean_rank = f"{sum(ranks.values()) / len(ranks):.1f}" if ranks else ""
        share = "" if math.isnan(r["share"]) else f"{r['share']:.3f}"
        lines.append(f"| {LABELS[method]} | {r['train_s']:.0f} | {ppl:.2f} | {vs} | {after:.2f} | {vs_after} | "
                     f"{after / ppl:.3f} | {r['removed']:.1%} | {share} | {mean_rank} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
