"""Scatterbrain attention (Chen, Dao et al. 2021, https://arxiv.org/abs/2110.15343) against exact attention, the
Performer alone and a local window alone, at an equal budget of scores per query.

Usage (loads the default model: run under the shared lock):
    flock /tmp/rankwise-heavy.lock python benchmarks/scatterbrain.py [--lengths 2048,4096,8192,16384]
        [--budgets 256] [--eval-windows 2] [--seq-len 2048] [--layers 3,15,27] [--threads 1] [--skip-model]
        [--sink 4] [--skip-attention]

Budget ``B`` scores per query: scatterbrain = window ``B/2`` + ``B/2`` features, performer = ``B`` features,
local = window ``B`` (exact softmax over the last ``B`` keys only); with ``--sink S`` > 0 also scatterbrain = window
``B/2 - S`` + ``S`` sink keys + ``B/2`` features and local = window ``B - S`` + ``S`` sink keys (the first ``S`` keys
scored exactly for every query: attention sinks, Xiao et al. 2023, https://arxiv.org/abs/2309.17453). The anchor is
exact causal attention (torch's ``scaled_dot_product_attention``), measured in the same process.

(a) Attention outputs with SmolLM2-135M's shapes (1 batch, 9 query heads, 3 kv heads, head_dim 64): relative error
``||out - exact|| / ||exact||`` and time. At ``--seq-len`` the q/k/v are the real ones (after RoPE) of the default
model's ``--layers`` on the last window of the pydoc topics; at other lengths they are random Gaussian with the
real tensors' standard deviations (the model's tensors at 16k tokens would need the whole model run to 16k).
(b) Perplexity of the default model on the last ``--eval-windows`` windows of ``--seq-len`` tokens of the pydoc topics
with each attention, with time and peak RSS (the process's high-water mark, reset before each row).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from rankwise.nn.scatterbrain import scatterbrain_attention, use_scatterbrain

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
LOCAL_NAME = "rankwise_bench_local"
CAPTURE_NAME = "rankwise_bench_capture"


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, *, sink: int = 0,
                    scale: float | None = None, chunk: int = 256) -> torch.Tensor:
    """Causal softmax over the last ``window`` keys and the first ``sink`` keys only (``0 <= i - j < window`` or
    ``j < sink``, ``j <= i``; StreamingLLM, Xiao et al. 2023, https://arxiv.org/abs/2309.17453), ``chunk`` queries at
    a time: memory ``O(tokens * (window + sink + chunk))``."""
    tokens = q.shape[2]
    outs = []
    for start in range(0, tokens, chunk):
        stop = min(start + chunk, tokens)
        k_lo = max(start - window + 1, 0)
        old = min(sink, k_lo)  # sink keys left of the block: all j < i, each counted once
        keys = torch.cat([torch.arange(old), torch.arange(k_lo, stop)])
        delta = torch.arange(start, stop)[:, None] - keys[None, :]
        mask = (delta >= 0) & ((delta < window) | (keys[None, :] < sink))
        outs.append(F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, keys], v[:, :, keys],
                                                   attn_mask=mask, scale=scale, enable_gqa=True))
    return torch.cat(outs, dim=2)


def methods(budget: int, sink: int = 0) -> dict[str, Callable[..., torch.Tensor]]:
    half = budget // 2 - (budget // 2) % 2
    rows = {
        "exact (sdpa)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        f"scatterbrain w={half} m={half}": lambda q, k, v: scatterbrain_attention(q, k, v, window=half,
                                                                                    num_features=half, seed=0),
        f"performer m={budget}": lambda q, k, v: scatterbrain_attention(q, k, v, window=0, num_features=budget, seed=0),
        f"local w={budget}": lambda q, k, v: local_attention(q, k, v, budget),
    }
    if sink:
        rows[f"scatterbrain w={half - sink} sink={sink} m={half}"] = lambda q, k, v: scatterbrain_attention(
            q, k, v, window=half - sink, num_features=half, seed=0, sink=sink)
        rows[f"local w={budget - sink} sink={sink}"] = lambda q, k, v: local_attention(q, k, v, budget - sink,
                                                                                       sink=sink)
    return rows


def hwm_reset() -> None:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5) so the next row's peak is its own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


# ------------------------------------------------------------------------------------------------------ the model


def load() -> tuple[Any, torch.Tensor]:
    from rankwise.calibrate import default_text
    from rankwise.io.models import load_model

    loaded = load_model("smollm2")
    ids = loaded.tokenizer(default_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return loaded.model.eval(), ids


def capture(model: Any, window: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """The q/k/v (after RoPE, kv heads not repeated) each of ``layers`` receives on ``window``."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    got: dict[int, tuple[torch.Tensor, ...]] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            got[module.layer_idx] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_NAME, record)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        with torch.no_grad():
            model(window[None])
    finally:
        model.set_attn_implementation(previous)
    return got


def perplexity_rows(model: Any, windows: torch.Tensor, budget: int, sink: int = 0) -> list[dict[str, Any]]:
    from transformers import AttentionInterface

    half = budget // 2 - (budget // 2) % 2

    def local_fn(module, query, key, value, attention_mask, scaling=None, **kwargs):
        return local_attention(query, key, value, budget, scale=scaling).transpose(1, 2).contiguous(), None

    def local_sink_fn(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = local_attention(query, key, value, budget - sink, sink=sink, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(LOCAL_NAME, local_fn)
    AttentionInterface.register(LOCAL_NAME + "_sink", local_sink_fn)
    previous = model.config._attn_implementation

    def run(name: str, enter: Callable[[], Any]) -> dict[str, Any]:
        hwm_reset()
        start = time.perf_counter()
        nll, count = 0.0, 0
        with enter(), torch.no_grad():
            for window in windows:
                logits = model(window[None]).logits[0, :-1].float()
                nll += F.cross_entropy(logits, window[1:], reduction="sum").item()
                count += window.numel() - 1
        seconds = time.perf_counter() - start
        return {"attention": name, "ppl": math.exp(nll / count), "seconds": seconds, "rss": hwm_mb()}

    class _Impl:
        def __init__(self, name: str) -> None:
            self.name = name

        def __enter__(self) -> None:
            model.set_attn_implementation(self.name)

        def __exit__(self, *exc: object) -> None:
            model.set_attn_implementation(previous)

    rows = [
        run("exact (sdpa)", lambda: _Impl("sdpa")),
        run(f"scatterbrain w={half} m={half}", lambda: use_scatterbrain(model, window=half, num_features=half)),
        run(f"performer m={budget}", lambda: use_scatterbrain(model, window=0, num_features=budget)),
        run(f"local w={budget}", lambda: _Impl(LOCAL_NAME)),
    ]
    if sink:
        rows += [
            run(f"scatterbrain w={half - sink} sink={sink} m={half}",
                lambda: use_scatterbrain(model, window=half - sink, num_features=half, sink=sink)),
            run(f"local w={budget - sink} sink={sink}", lambda: _Impl(LOCAL_NAME + "_sink")),
        ]
    return rows


# ------------------------------------------------------------------------------------------------------ the tables


def attention_rows(length: int, data: list[tuple[torch.Tensor, ...]], budget: int, sink: int = 0
                   ) -> list[dict[str, Any]]:
    rows = []
    exact = None
    for name, fn in methods(budget, sink).items():
        err, seconds = 0.0, 0.0
        outs = []
        for q, k, v in data:
            start = time.perf_counter()
            out = fn(q, k, v)
            seconds += time.perf_counter() - start
            outs.append(out)
        if exact is None:
            exact = outs
        err = sum(((o - e).norm() / e.norm()).item() for o, e in zip(outs, exact, strict=True)) / len(data)
        rows.append({"tokens": length, "attention": name, "error": err, "seconds": seconds / len(data)})
    return rows


def random_data(length: int, std: tuple[float, float, float], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, HEADS, length, HEAD_DIM, generator=g) * std[0],
            torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=g) * std[1],
            torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=g) * std[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192,16384", help="tokens for part (a)")
    parser.add_argument("--budgets", default="256", help="scores per query (window + features), comma-separated")
    parser.add_argument("--seq-len", type=int, default=2048, help="window length for the model parts")
    parser.add_argument("--eval-windows", type=int, default=2, help="windows from the end of the text for (b)")
    parser.add_argument("--layers", default="3,15,27", help="layers whose real q/k/v part (a) uses at --seq-len")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids spin-waits on a busy CPU)")
    parser.add_argument("--skip-model", action="store_true", help="random q/k/v only, no perplexity")
    parser.add_argument("--sink", type=int, default=4, help="first keys always exact in the sink rows (0: no rows)")
    parser.add_argument("--skip-attention", action="store_true", help="skip part (a): perplexity only")
    args = parser.parse_args()
    if args.skip_model and args.skip_attention:
        parser.error("--skip-model and --skip-attention together leave nothing to run")
    if not 0 <= args.sink < min(int(b) // 2 for b in args.budgets.split(",")):
        parser.error(f"--sink must be >= 0 and < half of every budget, got {args.sink}")
    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    layers = [int(x) for x in args.layers.split(",")]

    real: list[tuple[torch.Tensor, ...]] = []
    model = ids = None
    if not args.skip_model:
        start = time.perf_counter()
        model, ids = load()
        print(f"loaded the default model and {ids.numel()} tokens in {time.perf_counter() - start:.1f} s "
              f"({hwm_mb():.0f} MB peak RSS)")
        if not args.skip_attention:
            real = list(capture(model, ids[-args.seq_len:], layers).values())
    std = tuple(float(torch.stack([t[i].std() for t in real]).mean()) if real else 1.0 for i in range(3))
    if args.skip_attention:
        lengths = []
    else:
        print(f"\n(a) attention outputs, {HEADS} heads / {KV_HEADS} kv heads / head_dim {HEAD_DIM}, "
              f"{torch.get_num_threads()} thread(s); q/k/v: "
              + (f"real at {args.seq_len} (layers {layers}), " if real else "")
              + f"random Gaussian elsewhere (std q {std[0]:.2f}, k {std[1]:.2f}, v {std[2]:.2f})\n")
        print("| tokens | q/k/v | budget | attention | rel. error | time (s) | time / exact |")
        print("|---:|---|---:|---|---:|---:|---:|")
    for length in lengths:
        data = real if (real and length == args.seq_len) else [random_data(length, std, length)]
        kind = "real" if data is real else "random"
        for budget in budgets:
            rows = attention_rows(length, data, budget, args.sink)
            for row in rows:
                print(f"| {length} | {kind} | {budget} | {row['attention']} | {row['error']:.4f} | "
                      f"{row['seconds']:.3f} | {row['seconds'] / rows[0]['seconds']:.2f} |", flush=True)

    if model is None:
        return
    windows = ids[-args.eval_windows * args.seq_len:].reshape(args.eval_windows, args.seq_len)
    print(f"\n(b) perplexity of the default model, last {args.eval_windows} x {args.seq_len} tokens of the pydoc "
          "topics\n")
    print("| budget | attention | perplexity | ppl / exact | time (s) | time / exact | peak RSS (MB) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for budget in budgets:
        rows = perplexity_rows(model, windows, budget, args.sink)
        for row in rows:
            print(f"| {budget} | {row['attention']} | {row['ppl']:.3f} | {row['ppl'] / rows[0]['ppl']:.3f} | "
                  f"{row['seconds']:.1f} | {row['seconds'] / rows[0]['seconds']:.2f} | {row['rss']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
