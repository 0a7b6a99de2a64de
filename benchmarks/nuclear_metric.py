"""Does the label-free Matrix Nuclear-Norm (Li et al. 2024, https://arxiv.org/abs/2410.10672) rank compressed models
as perplexity does, and what does it cost?

Usage:
    flock /tmp/rankwise-heavy.lock python benchmarks/nuclear_metric.py [--methods svd,fwsvd,asvd,svd_llm]
        [--ratios 0.2,0.4] [--calib-samples 8] [--eval-samples 8] [--seq-len 256]

The rows of a ``compare`` table on the default model (dense plus every method at every ratio, the same shared
calibration statistics and the same code path as :func:`rankwise.eval.compare.candidate_rows`): each row's
perplexity on held-out windows (the anchor) beside four variants of the score on the same windows: the paper's
matrix (last hidden state) and the next-token probabilities, each with the paper's L1,2 approximation and with the
exact nuclear norm. Then the rank correlation of each variant with perplexity over the rows (Spearman and Kendall;
the paper reads a lower score as better, so agreement with perplexity is a positive correlation), and the cost of
one pass of each variant alone (:func:`rankwise.eval.nuclear.nuclear_scores`) relative to a perplexity pass, timed
on the dense model over the first ``--cost-windows`` evaluation windows. To keep the run short, each row's
perplexity and four scores come from one forward pass (:func:`one_pass`, the library's per-window
:func:`~rankwise.eval.nuclear.matrix_nuclear_norm` on the LM head's input and on the softmax of its output).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from scipy.stats import kendalltau, spearmanr

from rankwise.calibrate import load_text, split_windows
from rankwise.calibrate.cache import collect_stats_cached
from rankwise.compression import compress_
from rankwise.eval import peak_rss_mb, perplexity
from rankwise.eval.compare import label, recipes, storage_dtype_of
from rankwise.eval.nuclear import NuclearConfig, matrix_nuclear_norm, nuclear_scores
from rankwise.io.models import load_model
from rankwise.targets import find_targets

VARIANTS = [NuclearConfig("hidden", True), NuclearConfig("hidden", False), NuclearConfig("probs", True),
            NuclearConfig("probs", False)]
TITLES = {"nuclear": "hidden, L1,2 (paper)", "nuclear_exact": "hidden, exact", "nuclear_probs": "probs, L1,2",
          "nuclear_probs_exact": "probs, exact"}


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


@torch.no_grad()
def one_pass(model, windows: torch.Tensor, batch_size: int) -> tuple[float, list[float]]:
    """``(perplexity, [score of each of VARIANTS])`` from one forward pass per batch."""
    captured = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, a, _o: captured.append(a[0]))
    nll, totals = 0.0, [0.0] * len(VARIANTS)
    try:
        for batch in windows.split(batch_size):
            captured.clear()
            logits = model(input_ids=batch).logits.float()  # (b, L, vocab)
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                         reduction="sum"))
            for w in range(batch.shape[0]):
                probs = torch.softmax(logits[w], dim=-1)  # (L, vocab)
                for k, c in enumerate(VARIANTS):
                    totals[k] += matrix_nuclear_norm(probs if c.matrix == "probs" else captured[-1][w],
                                                     approx=c.approx)
    finally:
        hook.remove()
    return math.exp(nll / windows[:, 1:].numel()), [t / windows.shape[0] for t in totals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="svd,fwsvd,asvd,svd_llm")
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cost-windows", type=int, default=4, help="evaluation windows the cost is timed on")
    args = parser.parse_args()
    start = time.perf_counter()
    loaded = load_model()
    model, bs = loaded.model, args.batch_size
    ids = loaded.tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    calibration, evaluation = split_windows(ids, args.seq_len, args.calib_samples, args.eval_samples)
    configs = recipes(args.methods.split(","), [float(r) for r in args.ratios.split(",")])
    kinds = set().union(*(c.needs | c.policy.kinds for c in configs)) | {"xxt"}
    stats, _ = collect_stats_cached(None, model, calibration, find_targets(model), kinds=kinds, batch_size=bs)
    dtype = storage_dtype_of(model, None)

    # cost: one pass of each variant alone against the perplexity pass, on the dense model (warm after calibration)
    timing = evaluation[:args.cost_windows]
    _, ppl_s = timed(perplexity, model, timing, batch_size=bs)
    cost = {c.name: timed(nuclear_scores, model, timing, [c], batch_size=bs)[1] for c in VARIANTS}

    rows = []
    for config in [None, *configs]:
        candidate = model
        if config is not None:
            candidate = copy.deepcopy(model)
            needs_data = config.sequential or config.update_u or config.needs_influence
            compress_(candidate, config, calibration if needs_data else None, stats=stats, batch_size=bs,
                      progress=False, save_dtype=dtype)
        ppl, scores = one_pass(candidate, evaluation, bs)
        rows.append((label(config) if config else "dense", config.ratio if config else 0.0, ppl, scores))
        print(f"{rows[-1][0]} @ {rows[-1][1]:g}: perplexity {ppl:.2f}, " + ", ".join(
            f"{c.name} {s:.4f}" for c, s in zip(VARIANTS, scores, strict=True)), flush=True)
        del candidate

    print(f"\n# torch {torch.__version__}, {torch.get_num_threads()} threads; {loaded.source}; calibration "
          f"{args.calib_samples} and disjoint evaluation {args.eval_samples} windows of {args.seq_len} tokens "
          "(pydoc topics)\n")
    print("| method | ratio | perplexity | " + " | ".join(TITLES[c.name] for c in VARIANTS) + " |")
    print("|---|---|---|" + "---|" * len(VARIANTS))
    for name, ratio, ppl, scores in rows:
        print(f"| {name} | {ratio:g} | {ppl:.2f} | " + " | ".join(f"{s:.4f}" for s in scores) + " |")
    ppls = [r[2] for r in rows]
    print(f"\nRank correlation with perplexity over the {len(rows)} rows (positive: the score falls as perplexity "
          "does, the paper's reading; negative: higher score, lower perplexity)\n")
    print(f"| score | Spearman rho | p | Kendall tau | p | pass s ({len(timing)} windows) | cost vs perplexity |")
    print("|---|---|---|---|---|---|---|")
    print(f"| perplexity (anchor) | 1 | - | 1 | - | {ppl_s:.1f} | 1.00x |")
    for k, c in enumerate(VARIANTS):
        values = [r[3][k] for r in rows]
        rho, tau = spearmanr(ppls, values), kendalltau(ppls, values)
        print(f"| {TITLES[c.name]} | {rho.statistic:+.3f} | {rho.pvalue:.3g} | {tau.statistic:+.3f} | "
              f"{tau.pvalue:.3g} | {cost[c.name]:.1f} | {cost[c.name] / ppl_s:.2f}x |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s, peak RSS {peak_rss_mb():,.0f} MB")


if __name__ == "__main__":
    main()
