"""The 2025-2026 training-free records, reimplemented, against rankwise's recipes on the default model (issue 21).

Usage:
    python benchmarks/records.py [--ratios 0.2,0.4] [--seeds 0] [--rows all] [--results records.json]

Rows (each a recipe of ``rankwise compress --recipe``; the published method each reproduces in brackets):

* ``svd_llm``: SVD-LLM, the anchor;
* ``svd_llm+seq+anc+anchor=1.0``: AA-SVD's anchored closed form, sequential, without its block refinement;
* ``svd_llm+zs``: ZS-SVD's zero-sum allocation (one shot, no correction stages);
* ``svd_llm+drank``: D-Rank's effective-rank allocation with the query/key to value transfer;
* ``svd_llm+loss+seq``: rankwise's best recipe before this work;
* the combinations: each allocation x sequential x anchored (rankwise's anchored fit, ``anchor`` 0.25 by default);
* ``+ow``: each layer's error weighted per output channel by the root mean squared loss gradient there
  (``output_weighted``); ``svd_llm+loss+seq+anc+ow`` is ``--recipe best`` from ratio 0.3 (below it,
  ``svd_llm+loss+ow``); ``loss_channels`` allocates with the same per-channel curvature; ``+score_samples=N`` scores
  the allocation on the first N calibration windows only.

Calibration: 32 windows of 256 tokens drawn at random (seeded) from the pydoc topics before the held-out part;
evaluation on two texts no calibration window touches: the last 64 x 256 tokens of the pydoc topics (same domain)
and the first 32 x 256 tokens of the standard library's Python sources (another domain; they fall within
``argparse``). With ``--validation`` the pydoc column is instead 32 windows of the calibration region that the draw
did not pick: settings are chosen there, never on the held-out windows. Each result is appended to ``--results`` as
it is measured, so an interrupted run resumes; the tables are printed from that file.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import time
from pathlib import Path

import torch

from rankwise.calibrate import load_text
from rankwise.compression import compress_
from rankwise.eval import peak_rss_mb
from rankwise.eval.compare import label
from rankwise.eval.measure import perplexity
from rankwise.io.models import load_model
from rankwise.methods.recipes import parse_recipe

SEQ_LEN = 256
RECORDS = {  # recipe -> the published method it reimplements
    "svd_llm": "SVD-LLM",
    "svd_llm+seq+anc+anchor=1.0": "AA-SVD (closed form, no refinement)",
    "svd_llm+zs": "ZS-SVD (one shot)",
    "svd_llm+drank": "D-Rank",
}
ROWS = ["svd_llm", "svd_llm+zs", "svd_llm+drank", "svd_llm+loss+seq", "svd_llm+seq+anc+anchor=1.0",
        "svd_llm+loss+seq+anc", "svd_llm+zs+seq+anc", "svd_llm+drank+seq+anc", "svd_llm+seq+anc",
        "svd_llm+zs+seq", "svd_llm+drank+seq", "svd_llm+seq", "svd_llm+ow", "svd_llm+loss+ow",
        "svd_llm+loss+seq+anc+ow", "svd_llm+loss_channels+seq+anc+ow", "svd_llm+loss+seq+anc+score_samples=8"]
SOURCES = ["argparse", "textwrap", "functools", "dataclasses", "heapq", "shlex", "string", "fractions", "statistics"]


def python_sources() -> str:
    """Standard-library Python sources, a second domain (code rather than prose)."""
    import importlib

    return "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in SOURCES)


def windows(ids: torch.Tensor, count: int, *, seed: int | None = None, end: int | None = None,
            skip: int = 0) -> torch.Tensor:
    """``count`` non-overlapping windows from ``ids[:end]``: the first ones, or a seeded random choice (after the
    ``skip`` windows the same seed picks first: a choice disjoint from theirs)."""
    ids = ids[:end].reshape(-1)
    available = ids.numel() // SEQ_LEN
    if available < skip + count:
        raise ValueError(f"text too short: {available} windows of {SEQ_LEN} tokens, {skip + count} wanted")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed)) if seed is not None else None
    chosen = range(count) if order is None else order[skip:skip + count].sort().values
    return torch.stack([ids[int(k) * SEQ_LEN:(int(k) + 1) * SEQ_LEN] for k in chosen])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rows", default="all", help="comma list of recipes, or all")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--results", type=Path, default=Path("records.json"))
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on 32 calibration-region windows the draw did not pick (not the held-out)")
    args = parser.parse_args()
    rows = ROWS if args.rows == "all" else args.rows.split(",")
    done = json.loads(args.results.read_text()) if args.results.exists() else []
    if any(bool(r.get("validation")) != args.validation for r in done):
        raise SystemExit(f"{args.results} holds rows of the other evaluation: use another --results file")
    have = {(r["recipe"], r["ratio"], r["seed"]) for r in done}
    loaded = load_model()
    tok = loaded.tokenizer
    topics = tok(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    held_out = windows(topics[-64 * SEQ_LEN:], 64)
    code = windows(tok(python_sources(), return_tensors="pt", add_special_tokens=False).input_ids[0], 32)
    evals = {"pydoc": held_out, "python": code}
    dense = loaded.model
    for seed in (int(s) for s in args.seeds.split(",")):
        end = topics.numel() - 64 * SEQ_LEN
        calib = windows(topics, args.calib_samples, seed=seed, end=end)
        if args.validation:
            evals["pydoc"] = windows(topics, 32, seed=seed, end=end, skip=args.calib_samples)
        dense_seed = seed if args.validation else 0  # the held-out windows are the same for every draw
        if ("dense", 0.0, dense_seed) not in have:
            row = {"recipe": "dense", "ratio": 0.0, "seed": dense_seed, "seconds": 0.0, "validation": args.validation,
                   **{f"ppl_{k}": perplexity(dense, v) for k, v in evals.items()}}
            done.append(row)
            have.add(("dense", 0.0, dense_seed))
            args.results.write_text(json.dumps(done, indent=1))
        for recipe in rows:
            for ratio in (float(r) for r in args.ratios.split(",")):
                if (recipe, ratio, seed) in have:
                    continue
                config = parse_recipe(recipe, ratio)
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                report = compress_(model, config, calib, progress=False, cache=args.results.with_suffix(".cache"))
                seconds = time.perf_counter() - start
                row = {"recipe": recipe, "label": label(config), "ratio": ratio, "seed": seed, "seconds": seconds,
                       "validation": args.validation,
                       "kept": report.params_targeted_after,
                       "removed": report.params_targeted_before - report.params_targeted_after,
                       "notes": report.notes, **{f"ppl_{k}": perplexity(model, v) for k, v in evals.items()}}
                print(json.dumps({k: v for k, v in row.items() if k != "notes"}), flush=True)
                done.append(row)
                args.results.write_text(json.dumps(done, indent=1))
                del model
    print_tables(done)
    print(f"\npeak RSS of this process {peak_rss_mb():,.0f} MB (the dense model and one copy being compressed)")


def print_tables(done: list[dict]) -> None:
    dense = {r["seed"]: r for r in done if r["recipe"] == "dense"}  # held-out: seed 0 only (same windows each draw)
    validation = any(r.get("validation") for r in done)
    where = "pydoc validation (32 unpicked calibration-region windows per draw)" if validation else "pydoc held-out"
    print(f"\n# torch {torch.__version__}, {torch.get_num_threads()} threads; dense perplexity: {where} "
          + ", ".join(f"{r['ppl_pydoc']:.2f}" for r in dense.values())
          + f", Python sources {next(iter(dense.values()))['ppl_python']:.2f}\n")
    print("| recipe | reproduces | ratio | seeds | pydoc ppl | / dense | spread | Python ppl | / dense | spread | "
          "targeted kept | removed | compress s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in done:
        if r["recipe"] != "dense":
            groups.setdefault((r["recipe"], r["ratio"]), []).append(r)
    for (recipe, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], ROWS.index(kv[0][0])
                                                                        if kv[0][0] in ROWS else 99)):
        cells = []
        for text in ("pydoc", "python"):
            values = [r[f"ppl_{text}"] for r in rs]
            mean = sum(values) / len(values)
            over = sum(r[f"ppl_{text}"] / dense[r["seed"] if validation else 0][f"ppl_{text}"] for r in rs) / len(rs)
            cells += [f"{mean:.2f}", f"{over:.3f}x",
                      f"{max(values) - min(values):.2f}" if len(values) > 1 else "-"]
        kept, removed = rs[0]["kept"], rs[0]["removed"]
        print(f"| {recipe} | {RECORDS.get(recipe, '')} | {ratio:g} | {','.join(str(r['seed']) for r in rs)} | "
              f"{' | '.join(cells)} | {kept:,} ({kept / (kept + removed):.1%}) | {removed:,} | "
              f"{sum(r['seconds'] for r in rs) / len(rs):.0f} |")


if __name__ == "__main__":
    main()
