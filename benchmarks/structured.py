"""Structured compression against low-rank and plain quantisation on the default model, at equal ratios and at equal
bytes.

One process loads SmolLM2-135M, calibrates once on the start of the pydoc topics and evaluates every row on held-out
windows from the end of the same text (disjoint), through :func:`rankwise.eval.compare.compare` with shared
statistics; bytes count floating-point values in bfloat16, the dtype the model is published and saved in.

- ``--ratios`` rows (fraction of targeted parameters removed): svd_llm, svd_llm+loss, dictionary, dictionary+loss,
  monarch (whitened), monarch+whiten=False, basis_sharing, basis_sharing+loss;
- ``--bits`` rows (stored bits per targeted weight, scales and indices counted): lq and lq+data_aware=True (NF),
  the same two with HQQ as the quantiser at group 128, all with ``quant_bits`` the largest of 2, 3, 4 strictly below
  the budget (codes and their scales take a little more than b bits, so a budget of exactly b leaves no room),
  svd_llm+loss with floating-point and with 8-bit factors, and dictionary with 8-bit values; once, at the bits
  their own format stores: the HQQ anchors (hqq 2/3/4-bit g64, HQQ's own layers), nf+quant_bits=2/3/4, and
  rankwise's hqq method at group 128 with EoRA compensation of the rank that fills the bits a group of 64 would have
  spent on scales (``--eora``: 2/3/4 bits, 0.25 bits per weight of rank).

A method that is not registered when this runs is skipped with a note. ``--recipes`` keeps a subset: a name keeps
every row of that method (``lq`` keeps lq and lq+data_aware=True, ``hqq`` the HQQ rows), a full recipe only itself;
with ``--exact`` only whole recipes count, and any recipe of a method that takes a ratio runs at ``--ratios``.

    .venv/bin/python benchmarks/structured.py --out /tmp/structured
    .venv/bin/python benchmarks/structured.py --calib-samples 4 --eval-samples 4 --seq-len 128 --ratios 0.2 \\
        --bits 3.5 --recipes svd_llm,lq,nf,hqq --out /tmp/structured-small
    .venv/bin/python benchmarks/structured.py --streamed --recipes svd_llm,lq --out /tmp/structured-streamed

``--streamed`` instead runs ``rankwise compress`` (streamed block by block from the checkpoint) for each listed
recipe at ratio 0.2 and at 3.5 bits (an empty ``--ratios`` or ``--bits`` drops that budget; nf and hqq at their own
bits) in a child process each, and reports its seconds and peak RSS (``os.wait4`` on the child).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RATIO_RECIPES = ["svd_llm", "svd_llm+loss", "dictionary", "dictionary+loss", "monarch", "monarch+whiten=False",
                 "basis_sharing", "basis_sharing+loss"]
BITS_RECIPES = ["lq", "lq+data_aware=True", "lq+quantiser=hqq+block_size=128",
                "lq+quantiser=hqq+block_size=128+data_aware=True", "svd_llm+loss", "svd_llm+loss+factor_bits=8",
                "dictionary+value_bits=8"]  # at every --bits budget
OWN_BITS = (2, 3, 4)  # hqq N-bit g64 and nf+quant_bits=N, each at the bits its format stores
EORA_BASE = "hqq+block_size=128"  # + quant_bits=N, then EoRA: the 0.25 bits per weight g64 spends on more scales
EORA_BITS = 0.25
HQQ_GROUP = 64
STREAMED_RATIO, STREAMED_BITS = 0.2, 3.5


def quant_bits_for(bits: float) -> int:
    """The NF bits of lq's quantised part under a budget of ``bits``: the largest of 2, 3, 4 strictly below it."""
    return max(b for b in (2, 3, 4) if b < bits) if bits > 2 else 2


EXACT = False  # --exact: --recipes names whole recipes only


def wanted(recipe: str, keep: list[str] | None) -> bool:
    return keep is None or recipe in keep or (not EXACT and recipe.split("+")[0] in keep)


def own_bits(config, shapes: list[tuple[int, int]], value_bytes: int) -> float:
    """The bits per weight ``config`` stores at its smallest knob (nf: its codes and scales), rounded up so the
    budget covers it."""
    stored = sum(config.cost(m, n, config.knob_range(m, n)[0], value_bytes).bytes for m, n in shapes)
    return math.ceil(8 * stored / sum(m * n for m, n in shapes) * 1000) / 1000


def plan(args, shapes: list[tuple[int, int]], value_bytes: int) -> tuple[list, list[int], list, list[str]]:
    """``(configs, HQQ anchor bits, configs for EoRA, notes)`` for the rows asked for; unregistered methods and
    budgets a method cannot meet are skipped with a note (checked here, before any work, with the method's own cost
    model)."""
    from rankwise.methods import config_class
    from rankwise.methods.base import choose_knobs
    from rankwise.methods.recipes import parse_recipe

    keep = [r.strip() for r in args.recipes.split(",")] if args.recipes else None
    ratio_recipes, bits_recipes = RATIO_RECIPES, BITS_RECIPES
    if EXACT and keep:  # any recipe, in the order given: at --ratios if its method takes a ratio, and at --bits
        known = [r for r in keep if r.split("+")[0] in _registered()]
        ratio_recipes = [r for r in known if "params" in config_class(r.split("+")[0]).units]
        bits_recipes = [r for r in known if not r.startswith(("hqq", "nf"))]  # those two run at their own bits
    # (recipe, budget, the recipe as --recipes names it)
    todo: list[tuple[str, dict, str]] = [(r, {"ratio": x}, r) for r in ratio_recipes for x in args.ratios]
    todo += [(f"nf+quant_bits={b}", {"own": True}, f"nf+quant_bits={b}") for b in OWN_BITS]
    todo += [("hqq+quant_bits=3", {"own": True}, "hqq+quant_bits=3")]  # HQQ 3-bit in 3 bits per code, not 3.2
    for bits in args.bits:
        todo += [(r if not r.startswith("lq") else f"{r}+quant_bits={quant_bits_for(bits)}"
                  + (f"+iterations={args.lq_iterations}" if args.lq_iterations else ""), {"bits": bits}, r)
                 for r in bits_recipes]
    configs, notes, missing = [], [], set()
    named = dict(zip([f"m{k}" for k in range(len(shapes))], shapes, strict=True))
    for recipe, budget, origin in todo:
        if not wanted(origin, keep):
            continue
        method = recipe.split("+")[0]
        try:
            config_class(method)
        except ValueError:
            missing.add(method)
            continue
        try:  # a config refused here (a missing optional package, a budget it cannot meet) is a note, not a stop
            if budget.get("own"):
                probe = parse_recipe(recipe, bits=15.0)
                config = dataclasses.replace(probe, bits=own_bits(probe, shapes, value_bytes))
            else:
                config = parse_recipe(recipe, budget.get("ratio"), bits=budget.get("bits"))
            choose_knobs(config, named, dict.fromkeys(named, config.kept_fraction(value_bytes)), value_bytes)
        except ValueError as err:
            notes.append(f"skipped {recipe} at {budget}: {err}")
            continue
        configs.append(config)
    notes += [f"skipped {m}: not registered in this rankwise" for m in sorted(missing)]
    hqq = [b for b in OWN_BITS if wanted("hqq", keep)]
    eora = []
    if args.eora and "hqq" in _registered():
        try:
            eora = [dataclasses.replace(probe, bits=own_bits(probe, shapes, value_bytes))
                    for b in OWN_BITS for probe in [parse_recipe(f"{EORA_BASE}+quant_bits={b}", bits=15.0)]]
        except ValueError as err:
            notes.append(f"skipped the EoRA rows: {err}")
    return configs, hqq, eora, notes


def _registered() -> list[str]:
    from rankwise.methods import method_names

    return method_names()


def eora_rank(shapes: list[tuple[int, int]], value_bytes: int) -> int:
    """The uniform EoRA rank whose factors take at most :data:`EORA_BITS` per targeted weight."""
    per_rank = 8 * value_bytes * sum(m + n for m, n in shapes) / sum(m * n for m, n in shapes)
    return max(1, int(EORA_BITS // per_rank))


def row_name(config) -> str:
    """The row label, with the NF bits of a quantised method spelled out even at their default."""
    from rankwise.eval.compare import label

    name = label(config)
    bits = getattr(config, "quant_bits", None)
    return name if bits is None or "+quant_bits=" in name else f"{name} +quant_bits={bits}"


def budget_text(row, own: set[int]) -> str:
    if id(row) in own:
        return "own"
    return f"{row.bits:g} bits" if row.bits is not None else f"ratio {row.ratio:g}"


def reference(row, rows, own: set[int]) -> str:
    """vs svd_llm (uniform) at the same ratio, or vs the HQQ row nearest in stored bits."""
    if row.bits is None:
        refs = [r for r in rows if r.method == "svd_llm" and r.bits is None and r.ratio == row.ratio]
    else:
        hqq = [r for r in rows if re.match(r"hqq \d+-bit", r.method)]  # HQQ's own layers, not the hqq method
        refs = sorted(hqq, key=lambda r: abs(r.bits_per_weight - row.bits_per_weight))[:1]
    if not refs or refs[0] is row:
        return ""
    return f"{row.perplexity / refs[0].perplexity:.2f}x ({refs[0].method})"


def table(result, own: set[int], peak_mb: float, args) -> str:
    s = result.settings
    head = (f"Model {s['model']}; {args.calib_samples} calibration and {args.eval_samples} disjoint held-out windows "
            f"of {args.seq_len} tokens (pydoc topics); bytes at {s['dtype']} (computed in {s['compute_dtype']}); "
            f"shared calibration {result.calibration_s:.1f} s; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads.\n\n")
    lines = ["| recipe | budget | perplexity | vs dense | vs svd_llm (same ratio) or HQQ (nearest bits) "
             "| bits / weight stored | MB | compress s |", "|---|---|---|---|---|---|---|---|"]
    for r in [result.dense, *result.rows]:
        lines.append(f"| {r.method} | {budget_text(r, own) if r is not result.dense else ''} | {r.perplexity:.2f} | "
                     f"{r.perplexity / result.dense.perplexity:.2f}x | {reference(r, result.rows, own)} | "
                     f"{r.bits_per_weight:.2f} | {r.weights_mb:,.1f} | {r.compress_s:.1f} |")
    notes = "".join(f"\n- {n}" for n in result.notes)
    return head + "\n".join(lines) + f"\n\nPeak RSS of this process: {peak_mb:,.0f} MB.{notes}\n"


def family(method: str) -> str:
    """One line per method and options, across bits: ``hqq 3-bit g64`` -> ``hqq g64``, lq's quant_bits dropped."""
    return re.sub(r"hqq \d+-bit", "hqq", re.sub(r" \+quant_bits=\d+", "", method))


def plot(result, path: Path) -> None:
    """Perplexity against the bits each row stores per targeted weight, one line per family (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(9, 5.5))
    names = list(dict.fromkeys(family(r.method) for r in result.rows))
    colours = plt.get_cmap("tab20")
    for k, name in enumerate(names):
        rows = sorted((r for r in result.rows if family(r.method) == name), key=lambda r: r.bits_per_weight)
        ax.plot([r.bits_per_weight for r in rows], [r.perplexity for r in rows], marker="osD^v<>P*X"[k % 10],
                color=colours(k % 20), label=name)
    ax.axhline(result.dense.perplexity, color="black", linestyle="--", label=f"dense ({result.dense.perplexity:.1f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 3, 4, 6, 8, 12, 16])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    ax.set_xlabel("bits stored per targeted weight (bf16 values, scales and indices counted)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{result.settings['model']}: perplexity against bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BROKEN = 100.0  # rows above this many times the dense perplexity are left off the combined plot (and listed)


def combined(args, out: Path) -> None:
    """One plot of perplexity against stored bits from several runs' ``comparison/comparison.json`` (``--plot-from``),
    refused unless they measured the same dense perplexity (same model, windows and dtype)."""
    import json
    from types import SimpleNamespace

    runs = [json.loads((Path(d) / "comparison" / "comparison.json").read_text()) for d in args.plot_from.split(",")]
    dense = {round(run["dense"]["perplexity"], 6) for run in runs}
    if len(dense) != 1:
        raise SystemExit(f"the runs disagree on the dense perplexity ({sorted(dense)}): not the same model and windows")
    seen, rows, broken = set(), [], []
    for run in runs:
        for row in run["rows"]:
            key = (row["method"], row["ratio"], row["bits"])
            if key in seen:
                continue
            seen.add(key)
            if row["perplexity"] > BROKEN * runs[0]["dense"]["perplexity"]:
                broken.append(f"{row['method']} at {row['bits_per_weight']:.2f} bits ({row['perplexity']:.3g})")
            else:
                rows.append(SimpleNamespace(**row))
    result = SimpleNamespace(rows=rows, dense=SimpleNamespace(**runs[0]["dense"]), settings=runs[0]["settings"])
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "structured.png")
    print(f"wrote {out}/structured.png: {len(rows)} rows from {len(runs)} runs"
          + (f"; left off (over {BROKEN:g}x dense): {'; '.join(broken)}" if broken else ""))


def in_process(args, out: Path) -> None:
    from rankwise.calibrate import load_text, split_windows
    from rankwise.eval.compare import compare
    from rankwise.eval.measure import peak_rss_mb
    from rankwise.io.models import load_model
    from rankwise.targets import find_targets

    loaded = load_model("smollm2")
    ids = loaded.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calibration, evaluation = split_windows(ids, args.seq_len, args.calib_samples, args.eval_samples)
    shapes = [tuple(m.weight.shape) for m in find_targets(loaded.model).values()]
    configs, hqq, eora, notes = plan(args, shapes, torch.bfloat16.itemsize)
    for note in notes:
        print(f"note: {note}", flush=True)
    settings = {"model": loaded.source}
    result = compare(loaded.model, calibration, evaluation, configs, storage_dtype=torch.bfloat16, hqq_bits=hqq,
                     hqq_group=HQQ_GROUP, settings=settings, speed_repeats=args.speed_repeats, cache=None)
    result.notes[:0] = notes
    for config, row in zip(configs, result.rows, strict=False):  # one row per config, in order, then HQQ's
        row.method = row_name(config)
    if eora:  # a second comparison: EoRA's rank applies to every config of one call
        rank = eora_rank(shapes, torch.bfloat16.itemsize)
        more = compare(loaded.model, calibration, evaluation, eora, storage_dtype=torch.bfloat16, eora_rank=rank,
                       settings=settings, speed_repeats=args.speed_repeats, cache=None)
        for k, row in enumerate(more.rows):  # base, base + EoRA, for each config
            row.method = row_name(eora[k // 2]) + (f" +eora{rank}" if k % 2 else "")
        result.rows += more.rows
        result.notes.append(f"EoRA rows: the same calibration, dense perplexity {more.dense.perplexity:.2f} in their "
                            f"own comparison")
    own = {id(r) for r in result.rows if r.method.startswith(("hqq", "nf"))}
    text = table(result, own, peak_rss_mb(), args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.md").write_text(text)
    plot(result, out / "structured.png")
    result.save(out / "comparison", overwrite=True)  # every field as JSON, and the standard table
    print(text)
    print(f"wrote {out}/structured.md, structured.png and comparison/")


def cli_args(config) -> list[str]:
    """``rankwise compress`` options for ``config``: method, budget, allocation, flags and its own fields."""
    from rankwise.methods.recipes import method_fields

    args = ["--method", config.name]
    args += ["--bits", str(config.bits)] if config.bits is not None else ["--ratio", str(config.ratio)]
    if config.allocation != "uniform":
        args += ["--allocation", str(config.allocation)]
    args += ["--sequential"] * config.sequential + ["--update-u"] * config.update_u
    for name, (_, default) in method_fields(type(config)).items():
        if getattr(config, name) != default:
            args += ["--set", f"{name}={getattr(config, name)}"]
    return args


def child(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """``(seconds, peak RSS MB, "")`` of one child process, or its last error line in place of ``""``."""
    start = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds, peak = time.perf_counter() - start, usage.ru_maxrss / 1024
    if os.waitstatus_to_exitcode(status) != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        return seconds, peak, lines[-1] if lines else "failed"
    return seconds, peak, ""


def streamed(args, out: Path) -> None:
    from rankwise.io.models import load_model
    from rankwise.targets import find_targets

    shapes = [tuple(m.weight.shape) for m in find_targets(load_model("smollm2").model).values()]
    # one budget each: ratio 0.2 and 3.5 bits, unless --ratios or --bits is given empty (then none of that kind)
    args.ratios, args.bits = [STREAMED_RATIO] if args.ratios else [], [STREAMED_BITS] if args.bits else []
    configs, _, _, notes = plan(args, shapes, torch.bfloat16.itemsize)
    from rankwise.eval.compare import label

    exe = str(Path(sys.executable).with_name("rankwise"))
    lines = [f"`rankwise compress smollm2` (streamed) with {args.calib_samples} x {args.seq_len} calibration "
             f"tokens, one child process each; torch {torch.__version__}.", "",
             "| recipe | budget | compress s | peak RSS MB | status |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for k, config in enumerate(configs):
            cmd = [exe, "compress", "smollm2", *cli_args(config), "--calib-samples", str(args.calib_samples),
                   "--seq-len", str(args.seq_len), "--no-cache", "--out", f"{tmp}/{k}"]
            seconds, peak, error = child(cmd, Path(tmp) / f"{k}.log")
            budget = f"{config.bits:g} bits" if config.bits is not None else f"ratio {config.ratio:g}"
            lines.append(f"| {label(config)} | {budget} | {seconds:.1f} | {peak:,.0f} | {error or 'ok'} |")
            print(lines[-1], flush=True)
    text = ("\n".join(lines) + "".join(f"\n- {n}" for n in notes)
            + "\n- The HQQ anchor rows (HQQ's own layers) are not rankwise methods: not streamed.\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured_streamed.md").write_text(text)
    print(text)
    print(f"wrote {out}/structured_streamed.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    numbers = lambda text: [float(x) for x in text.split(",") if x.strip()]  # noqa: E731
    parser.add_argument("--ratios", type=numbers, default=[0.2, 0.4], help="comma list (default 0.2,0.4)")
    parser.add_argument("--bits", type=numbers, default=[2.5, 3.0, 3.5, 4.0, 4.5],
                        help="comma list (default 2.5,3,3.5,4,4.5)")
    parser.add_argument("--recipes", default=None, help="comma list of method names or recipes to keep (default all)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--speed-repeats", type=int, default=3, help="timed prefill passes per row")
    parser.add_argument("--lq-iterations", type=int, default=None,
                        help="lq's alternations (default: LQConfig's); fewer is faster")
    parser.add_argument("--streamed", action="store_true", help="measure `rankwise compress` per recipe instead")
    parser.add_argument("--out", default="/tmp/structured")
    parser.add_argument("--exact", action="store_true", help="--recipes lists whole recipes, not method names")
    parser.add_argument("--eora", action="store_true", help="also rankwise's hqq at group 128 plus EoRA rows")
    parser.add_argument("--plot-from", default=None,
                        help="comma list of earlier --out directories: only plot their rows together into --out")
    args = parser.parse_args()
    global EXACT
    EXACT = args.exact
    if args.plot_from:
        combined(args, Path(args.out))
    else:
        (streamed if args.streamed else in_process)(args, Path(args.out))


if __name__ == "__main__":
    main()
