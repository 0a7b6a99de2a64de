"""Decode and prefill speed of compressed models against the dense model, on the default model, in one process.

Every recipe compresses a copy of SmolLM2-135M (calibrated once on 32 windows from the start of the pydoc topics,
statistics shared), is scored for perplexity on held-out windows from the end of the text, and is timed with
:func:`rankwise.eval.speed.measure_speed`: batch-1 and batch-8 greedy decode with the KV cache (64 new tokens, the
time of 65 minus the time of 1, best of ``--repeats``), and prefill at 1 x 512, 1 x 2048 and 8 x 256 tokens. Each
compressed model is timed as saved (``eager``), with its input groups fused (``fused``: q/k/v and gate/up project
down in one matmul, :func:`rankwise.nn.fused.fuse_inputs_`) and, with ``--compile``, with its decoding forward
under ``torch.compile`` (``compiled``; the dense model too). The dense model is timed first and again last, and
every speed-up is against the mean of those two dense timings of the same variant (eager or compiled).

A recipe is ``method[+allocation][+field=value]...@ratio``, e.g. ``svd_llm+loss@0.2`` or ``modegpt@0.2`` (smaller
dense matrices: nothing to fuse, so no fused variant).

    .venv/bin/python benchmarks/speed.py --out /tmp/speed
    .venv/bin/python benchmarks/speed.py --recipes svd_llm+loss@0.2 --compile --out /tmp/speed-compiled
    .venv/bin/python benchmarks/speed.py --recipes svd_llm@0.2 --eval-samples 2 --new-tokens 8 --repeats 1 \\
        --prefill 1x64 --out /tmp/speed-small

Writes ``speed.md``, ``speed.json`` and ``speed.png`` (perplexity against batch-1 decode tokens/s, every row).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

RECIPES = ["svd_llm+loss@0.2", "svd_llm+loss@0.4", "svd_llm@0.2", "svd_llm@0.4"]


def parse(recipe: str):
    from rankwise.methods.recipes import parse_recipe

    name, _, ratio = recipe.partition("@")
    if not ratio:
        raise SystemExit(f"recipe {recipe!r}: give the ratio after @, e.g. svd_llm+loss@0.2")
    return parse_recipe(name, float(ratio))


def timed(model, args, variant: str) -> dict:
    from rankwise.eval.speed import measure_speed
    from rankwise.nn.fused import fuse_inputs_, unfuse_

    if variant == "fused":
        fuse_inputs_(model)
    try:
        result = measure_speed(model, decode_batches=args.batches, prefill_shapes=args.prefill,
                               new_tokens=args.new_tokens, repeats=args.repeats,
                               compile="default" if variant == "compiled" else None)
    finally:
        unfuse_(model)
    print(f"  {variant}: {result.describe()}", flush=True)
    return result.to_dict()


def variants(args, model) -> list[str]:
    """Eager, fused where the model has low-rank layers to fuse, compiled with ``--compile``."""
    from rankwise.nn import LowRankLinear

    fusable = any(isinstance(m, LowRankLinear) for m in model.modules())
    return ["eager"] + (["fused"] if fusable else []) + (["compiled"] if args.compile else [])


def table(rows: list[dict], dense: dict[str, dict], args) -> str:
    batches = [str(b) for b in args.batches]
    shapes = [f"{b}x{n}" for b, n in args.prefill]
    head = ["recipe", "ratio", "perplexity", "targeted kept", "targeted removed", "weights MB (bf16)", "variant",
            *[f"decode b{b} tok/s" for b in batches], *[f"prefill {s} tok/s" for s in shapes],
            *[f"decode b{b} vs dense" for b in batches], *[f"prefill {s} vs dense" for s in shapes]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for variant, speed in row["speed"].items():
            ref = dense["compiled" if variant == "compiled" else "eager"]
            dec = [speed["decode_tokens_per_s"][b] for b in args.batches]
            pre = [speed["prefill_tokens_per_s"].get(s) for s in shapes]
            cells = [row["recipe"], f"{row['ratio']:g}", f"{row['perplexity']:.2f}", f"{row['kept']:,}",
                     f"{row['removed']:,}", f"{row['weights_mb']:.1f}", variant,
                     *[f"{v:,.1f}" for v in dec], *[f"{v:,.0f}" if v else "-" for v in pre],
                     *[f"{v / ref['decode'][b]:.2f}x" for v, b in zip(dec, args.batches, strict=True)],
                     *[f"{v / ref['prefill'][s]:.2f}x" if v else "-" for v, s in zip(pre, shapes, strict=True)]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for variant, marker in (("eager", "o"), ("fused", "s"), ("compiled", "^")):
        for row in rows:
            if variant in row["speed"]:
                x = row["speed"][variant]["decode_tokens_per_s"][batch]
                ax.scatter(x, row["perplexity"], marker=marker, s=40)
                ax.annotate(f"{row['recipe']} {variant}", (x, row["perplexity"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"decode tokens/s (batch {batch}, KV cache, greedy)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title("SmolLM2-135M on this machine: perplexity against decode speed")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list (default {','.join(RECIPES)})")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=[1, 8])
    parser.add_argument("--prefill", type=lambda t: [tuple(int(v) for v in x.split("x")) for x in t.split(",")],
                        default=[(1, 512), (1, 2048), (8, 256)], help="comma list of BATCHxLENGTH")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time every model under torch.compile")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="/tmp/speed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rankwise.calibrate import collect_stats, load_text, split_windows
    from rankwise.compression import compress_
    from rankwise.eval.compare import label
    from rankwise.eval.measure import count_params, peak_rss_mb, perplexity, targeted_bytes
    from rankwise.io.models import load_model
    from rankwise.targets import find_targets

    configs = [(r, parse(r)) for r in args.recipes.split(",") if r.strip()]
    loaded = load_model("smollm2")
    model = loaded.model.to(args.device).eval()
    ids = loaded.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calibration, evaluation = split_windows(ids, args.seq_len, args.calib_samples, args.eval_samples)
    start = time.perf_counter()
    kinds = set().union(*(c.needs for _, c in configs)) | {"xxt"}
    if any(c.allocation == "loss" for _, c in configs):
        kinds.add("gout")
    stats = collect_stats(model, calibration, find_targets(model), kinds=kinds, progress=False) if configs else {}
    print(f"calibration {time.perf_counter() - start:.0f} s", flush=True)
    _, dense_targeted = count_params(model)
    dense_bytes = sum(p.numel() for p in model.parameters()) * 2

    def row_of(name: str, ratio: float, candidate, seconds: float) -> dict:
        _, kept = count_params(candidate)
        rest = dense_bytes - dense_targeted * 2
        row = {"recipe": name, "ratio": ratio, "perplexity": perplexity(candidate, evaluation), "kept": kept,
               "removed": dense_targeted - kept, "compress_s": seconds,
               "weights_mb": (targeted_bytes(candidate, 2) + rest) / 1e6, "speed": {}}
        print(f"{name} @ {ratio:g}: perplexity {row['perplexity']:.3f}", flush=True)
        for variant in variants(args, candidate):
            row["speed"][variant] = timed(candidate, args, variant)
        return row

    first = row_of("dense", 0.0, model, 0.0)
    rows = []
    for _, config in configs:
        candidate = copy.deepcopy(model)
        start = time.perf_counter()
        needs_data = config.sequential or config.update_u or config.needs_influence
        compress_(candidate, config, calibration if needs_data else None, stats=stats, progress=False,
                  save_dtype=torch.bfloat16)
        rows.append(row_of(label(config), config.ratio, candidate, time.perf_counter() - start))
        del candidate
    last = {variant: timed(model, args, variant) for variant in variants(args, model)}
    dense = {}  # each variant's dense reference: the mean of its first and last timing
    for variant, speed in first["speed"].items():
        again = last[variant]
        dense[variant] = {
            "decode": {b: (speed["decode_tokens_per_s"][b] + again["decode_tokens_per_s"][b]) / 2
                       for b in args.batches},
            "prefill": {s: (speed["prefill_tokens_per_s"][s] + again["prefill_tokens_per_s"][s]) / 2
                        for s in speed["prefill_tokens_per_s"]}}
    first["speed_again"] = last
    text = (f"SmolLM2-135M ({loaded.source}), {args.device}, {torch.get_num_threads()} threads; perplexity on "
            f"{args.eval_samples} held-out windows of {args.seq_len} tokens, calibration on {args.calib_samples} "
            f"disjoint windows; decode {args.new_tokens} new tokens, best of {args.repeats}; speed-ups against the "
            f"dense model of the same variant (mean of its timings before and after the rows: decode b1 "
            + ", ".join(f"{v}: {first['speed'][v]['decode_tokens_per_s'][1]:.1f} then "
                        f"{last[v]['decode_tokens_per_s'][1]:.1f}" for v in last if 1 in args.batches)
            + f"); peak RSS {peak_rss_mb():,.0f} MB.\n\n" + table([first, *rows], dense, args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.md").write_text(text + "\n")
    (out / "speed.json").write_text(json.dumps({"dense": first, "rows": rows, "dense_reference": dense,
                                                "args": vars(args)}, indent=1, default=str))
    plot([first, *rows], out / "speed.png", args.batches[0])
    print(text)
    print(f"wrote {out}/speed.md, speed.json and speed.png")


if __name__ == "__main__":
    main()
