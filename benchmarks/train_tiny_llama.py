"""Pre-training from scratch with every optimizer and layer, side by side: AdamW, galore-torch, apollo-torch and
rankwise's GaLore (SVD and DCT projections, per-layer updates), APOLLO (channel-wise and rank-1 tensor-wise) and the
SLTrain, SST and LOST layers, same model, data, steps and seed, in one run.

Usage:
    python benchmarks/train_tiny_llama.py [--steps 250] [--grid-steps 40] [--methods adamw,rw_galore,...]
        [--size tiny|llama60m] [--device cpu|cuda] [--work-dir /tmp/rankwise-train] [--report-only]

Data (local only): the pydoc topics and the standard library's top-level modules; every 20th document (in a fixed
order) is validation, the rest training. A byte-level BPE tokenizer of 4,096 entries is trained with ``tokenizers``
on the training documents only. The model is a Llama built from a config (``tiny``: ~12M parameters, 6 layers of
width 384; ``llama60m``: GaLore's LLaMA-60M shape, for a GPU).

Learning rates: each method runs the full ``--steps`` at each rate of its grid and is reported at the rate with the
lowest final validation loss (with ``--grid-steps`` below ``--steps`` the grid runs are that short and the best rate
is then run in full). Every run is its own child process
(this script with ``--one``), so its peak RSS is its own. Prints a Markdown table (validation perplexity, optimizer
state bytes counted from the state tensors, peak RSS, seconds per step and per optimizer step, each as a ratio to
AdamW or galore-torch) and writes ``train_tiny_llama.png`` (validation loss against step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VOCAB = 4096
SEQ = 128
BATCH = 8
RANK = 80  # GaLore / APOLLO / SLTrain / SST rank for the tiny model (about a fifth of its width)
GAP = 50  # projection refresh gap (GaLore's 200 scaled to this run's length)
GRID = {  # learning rates tried per method: three or more, extended where the best sat at an edge
    "adamw": (5e-4, 1e-3, 2e-3, 4e-3, 8e-3),
    "galore_torch": (2e-3, 4e-3, 8e-3, 1.6e-2), "rw_galore": (2e-3, 4e-3, 8e-3, 1.6e-2),
    "rw_galore_dct": (2e-3, 4e-3, 8e-3, 1.6e-2),
    "rw_galore_layer": (),
    "apollo_torch": (1e-3, 2e-3, 4e-3, 8e-3), "rw_apollo": (1e-3, 2e-3, 4e-3, 8e-3),
    "rw_apollo_mini": (2.5e-4, 5e-4, 1e-3, 2e-3),
    "sltrain": (5e-4, 1e-3, 2e-3, 4e-3), "sst": (5e-4, 1e-3, 2e-3, 4e-3),
    "lost": (5e-4, 1e-3, 2e-3, 4e-3),
}
SHARE = {"rw_galore_layer": "rw_galore"}  # the same algorithm stepped during backward: it takes the other's rate
VAL_BATCHES = 8
LABELS = {
    "adamw": "AdamW (torch)", "galore_torch": "GaLore (galore-torch 1.0)", "apollo_torch": "APOLLO (apollo-torch)",
    "rw_galore": "rankwise GaLoreAdamW (svd)", "rw_galore_dct": "rankwise GaLoreAdamW (dct)",
    "rw_galore_layer": "rankwise GaLoreAdamW (svd, per-layer)", "rw_apollo": "rankwise APOLLOAdamW (channel)",
    "rw_apollo_mini": "rankwise APOLLOAdamW (rank 1, tensor)", "sltrain": "rankwise SLTrainLinear + AdamW",
    "sst": "rankwise SSTLinear + AdamW", "lost": "rankwise LOSTLinear + AdamW",
}


# data
def documents() -> list[str]:
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [topics[k] for k in sorted(topics)]
    docs += [f.read_text(errors="replace") for f in sorted(root.glob("*.py"))]
    return docs


def prepare(work: Path) -> Path:
    """Train the tokenizer on the training documents and tokenise both splits (cached in ``work``)."""
    out = work / "data.pt"
    if out.exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    docs = documents()
    train = [d for k, d in enumerate(docs) if k % 20 != 0]
    val = [d for k, d in enumerate(docs) if k % 20 == 0]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eot = tok.token_to_id("<|endoftext|>")

    def encode(texts: list[str]) -> torch.Tensor:
        ids: list[int] = []
        for enc in tok.encode_batch(texts):
            ids += [*enc.ids, eot]
        return torch.tensor(ids, dtype=torch.int32)

    work.mkdir(parents=True, exist_ok=True)
    torch.save({"train": encode(train), "val": encode(val), "vocab": tok.get_vocab_size()}, out)
    tok.save(str(work / "tokenizer.json"))
    return out


def batches(ids: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` batches of ``BATCH`` random windows of ``SEQ`` tokens (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - SEQ - 1, (count, BATCH), generator=g)
    return [torch.stack([ids[s:s + SEQ].long() for s in row.tolist()]) for row in starts]


# model
def build_model(size: str, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {"tiny": (384, 1024, 6, 6), "llama60m": (512, 1376, 8, 8)}
    hidden, inter, layers, heads = shapes[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=SEQ,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def matrices(model) -> tuple[list, list]:
    """(projected matrices, the rest) as GaLore's experiments split them: attention and MLP weights vs the rest."""
    low, rest = [], []
    for name, p in model.named_parameters():
        (low if p.ndim == 2 and ".layers." in name else rest).append(p)
    return low, rest


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer state (galore-torch and apollo-torch keep projection matrices inside
    projector objects: counted too)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "ortho_matrix"):
                m = value.ortho_matrix
                for t in (m if isinstance(m, list | tuple) else [m]):
                    if isinstance(t, torch.Tensor):
                        total += t.numel() * t.element_size()
    return total


def optimizer(method: str, low: list, rest: list, lr: float, rank: int = RANK, gap: int = GAP):
    """The optimizer of an optimizer-only method: ``low`` are the matrices projected, ``rest`` get plain AdamW
    (either may be empty). Shared with optim_step.py and optim_memory.py, so every benchmark uses one setting."""

    def groups(rest_options: dict, low_options: dict) -> list[dict]:
        return [g for g in ({"params": rest, **rest_options}, {"params": low, **low_options}) if g["params"]]

    if method == "adamw":
        return torch.optim.AdamW(low + rest, lr=lr, weight_decay=0.0)
    if method == "galore_torch":
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(groups({}, {"rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"}),
                           lr=lr, weight_decay=0.0, no_deprecation_warning=True)
    if method == "apollo_torch":
        from apollo_torch import APOLLOAdamW

        return APOLLOAdamW(groups({}, {"rank": rank, "proj": "random", "scale_type": "channel", "scale": 1.0,
                                       "update_proj_gap": gap, "proj_type": "std"}), lr=lr, weight_decay=0.0)
    from rankwise.optim import APOLLOAdamW, GaLoreAdamW

    rw = groups({"rank": None}, {})
    if method == "rw_apollo":
        return APOLLOAdamW(rw, lr=lr, rank=rank, update_gap=gap)
    if method == "rw_apollo_mini":
        return APOLLOAdamW(rw, lr=lr, rank=1, scaling="tensor", scale=128.0, update_gap=gap)
    if method in ("rw_galore", "rw_galore_dct", "rw_galore_layer"):
        return GaLoreAdamW(rw, lr=lr, rank=rank, update_gap=gap, scale=0.25,
                           projection="dct" if method == "rw_galore_dct" else "svd")
    raise ValueError(f"{method!r} is not an optimizer-only method")


def make(method: str, model, lr: float):
    """(optimizer, after-step hook or None, per_layer)."""
    if method in ("adamw", "galore_torch", "apollo_torch") or method.startswith("rw_"):
        low, rest = matrices(model)
        opt = optimizer(method, low, rest, lr)
        if method == "rw_galore_layer":
            opt.attach_per_layer()
        return opt, None, method == "rw_galore_layer"
    from rankwise.nn import LOSTLinear, SLTrainLinear, SSTLinear, SSTSchedule, replace_linears

    if method == "sltrain":
        replace_linears(model, lambda lin, n: SLTrainLinear(lin.in_features, lin.out_features, RANK, density=0.03,
                                                            alpha=32.0, bias=lin.bias is not None, seed=_seed(n)))
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), None, False
    if method == "lost":  # as many sparse numbers as SLTrain's: 3 % of the input channels, whole columns
        replace_linears(model, lambda lin, n: LOSTLinear(lin.in_features, lin.out_features, RANK, channels=0.03,
                                                         gamma=0.9, bias=lin.bias is not None,
                                                         seed=_seed(n)))
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), None, False
    if method == "sst":
        replace_linears(model, lambda lin, n: SSTLinear(lin.in_features, lin.out_features, RANK,
                                                        bias=lin.bias is not None, seed=_seed(n)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        return opt, SSTSchedule(model, opt, resample_every=GAP, reorthogonalize_every=4 * GAP).step, False
    raise ValueError(f"unknown method {method!r}; known: {', '.join(GRID)}")


def _seed(name: str) -> int:
    """A layer's own seed (from its name), so that layers of one shape do not start identical."""
    return zlib.crc32(name.encode())


def lr_at(step: int, steps: int, peak: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


@torch.no_grad()
def val_loss(model, val: list[torch.Tensor], device: str) -> float:
    model.eval()
    losses = [model(input_ids=b.to(device), labels=b.to(device)).loss.item() for b in val]
    model.train()
    return sum(losses) / len(losses)


def run_one(method: str, lr: float, steps: int, size: str, device: str, work: Path) -> dict:
    data = torch.load(prepare(work), weights_only=True)
    train = batches(data["train"], steps, seed=1)
    val = batches(data["val"], VAL_BATCHES, seed=2)
    model = build_model(size, data["vocab"]).to(device)
    optimizer, after, per_layer = make(method, model, lr)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    curve, step_s, opt_s = [], [], []
    every = max(1, steps // 6)
    for step, batch in enumerate(train):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        start = time.perf_counter()
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if not per_layer:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mid = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after is not None:
            after()
        if device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        step_s.append(end - start)
        opt_s.append(end - mid)
        if not math.isfinite(loss.item()):
            return {"method": method, "lr": lr, "diverged_at": step, "curve": curve}
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append((step + 1, val_loss(model, val, device)))
    skip = min(5, len(step_s) // 4)  # warm-up steps (allocations, first refresh) left out of the timing
    return {"method": method, "lr": lr, "steps": steps, "params": params, "trainable": trainable,
            "val_loss": curve[-1][1], "curve": curve, "state_bytes": state_bytes(optimizer),
            "s_per_step": sum(step_s[skip:]) / len(step_s[skip:]),
            "opt_s_per_step": sum(opt_s[skip:]) / len(opt_s[skip:]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch_threads": torch.get_num_threads()}


def resume_check(method: str, lr: float, steps: int, stop: int, size: str, device: str, work: Path) -> dict:
    """Train ``steps`` steps uninterrupted, and again stopping at ``stop``: model and optimizer saved to disk and
    loaded into a freshly built model and optimizer that finish the run. Returns both loss curves' largest gap."""
    import tempfile

    data = torch.load(prepare(work), weights_only=True)
    train = batches(data["train"], steps, seed=1)

    def run(model, optimizer, start: int, end: int) -> list[float]:
        losses = []
        for step in range(start, end):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            batch = train[step].to(device)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    def fresh():
        model = build_model(size, data["vocab"]).to(device)
        return model, make(method, model, lr)[0]

    whole = run(*fresh(), 0, steps)
    model, optimizer = fresh()
    first = run(model, optimizer, 0, stop)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        del model, optimizer
        saved = torch.load(path, weights_only=True)
    model, optimizer = fresh()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    resumed = first + run(model, optimizer, stop, steps)
    gap = max(abs(a - b) for a, b in zip(whole, resumed, strict=True))
    return {"method": method, "steps": steps, "stop": stop, "max_loss_gap": gap,
            "identical": whole == resumed, "final_loss": whole[-1]}


def child(method: str, lr: float, steps: int, args, out: Path) -> dict:
    if not out.exists():
        cmd = [sys.executable, __file__, "--one", method, str(lr), str(steps), "--size", args.size, "--device",
               args.device, "--work-dir", str(args.work_dir), "--json", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return json.loads(out.read_text())


def report(results: dict[str, dict], grid: dict[str, dict[float, float]], timing: dict[str, list[tuple]],
           args) -> str:
    """The table. Time columns are medians over all of a method's grid runs (a step costs the same at any learning
    rate, and single runs on a shared machine vary by +-10 %)."""
    base = results.get("adamw")
    median = {m: tuple(statistics.median(col) for col in zip(*runs, strict=True)) for m, runs in timing.items() if runs}
    anchor = median.get("galore_torch")
    shared = "; ".join(f"{k} takes {v}'s rate" for k, v in SHARE.items())
    lines = [f"{args.size} Llama ({next(iter(results.values()))['params']:,} parameters), {args.steps} steps x "
             f"{BATCH} x {SEQ} tokens, rank {RANK}, refresh gap {GAP}, cosine schedule with 10 % warm-up, clip 1.0 "
             f"(none with per-layer updates), seed 0, {args.device}, torch {torch.__version__}, "
             f"{next(iter(results.values()))['torch_threads']} threads. Learning rate: best validation loss after "
             f"{args.grid_steps} steps over the grid shown ({shared}). Time columns: medians over each method's "
             "grid runs.\n",
             "| method | lr grid (val loss at grid steps) | lr | val ppl | vs AdamW | optimizer state MB | vs AdamW | "
             "trainable params | s/step | opt s/step | opt s/step vs galore-torch | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, r in results.items():
        if "val_loss" not in r:
            lines.append(f"| {LABELS[method]} | diverged at step {r.get('diverged_at')} | | | | | | | | | | |")
            continue
        tried = ", ".join(f"{lr:g}: {v:.3f}" if math.isfinite(v) else f"{lr:g}: diverged"
                          for lr, v in grid.get(method, {}).items())
        ppl = math.exp(r["val_loss"])
        vs = f"{ppl / math.exp(base['val_loss']):.3f}x" if base and "val_loss" in base else ""
        sb = f"{r['state_bytes'] / base['state_bytes']:.3f}x" if base else ""
        step_s, opt_s = median[method]
        ot = f"{opt_s / anchor[1]:.2f}x" if anchor else ""
        lines.append(f"| {LABELS[method]} | {tried} | {r['lr']:g} | {ppl:.2f} | {vs} | {r['state_bytes'] / 2**20:.2f} "
                     f"| {sb} | {r['trainable']:,} | {step_s:.3f} | {opt_s:.4f} | {ot} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab10")
    for k, (method, r) in enumerate(results.items()):
        if r.get("curve"):
            xs, ys = zip(*r["curve"], strict=True)
            ax.plot(xs, ys, label=LABELS[method], color=cmap(k % 10), linestyle="-" if k < 10 else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Pre-training from scratch: validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--grid-steps", type=int, default=None, help="default: --steps (grid at the full budget)")
    parser.add_argument("--methods", default=",".join(GRID))
    parser.add_argument("--size", default="tiny", choices=("tiny", "llama60m"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rankwise-train"))
    parser.add_argument("--plot-dir", type=Path, default=HERE)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "LR", "STEPS"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--resume-check", metavar="METHODS",
                        help="instead of the benchmark: for each listed rankwise optimizer, train 60 steps at its "
                             "grid's middle rate uninterrupted and stopped at step 30, saved, reloaded and resumed; "
                             "print the largest gap between the two loss curves")
    args = parser.parse_args()
    args.grid_steps = args.grid_steps or args.steps
    random.seed(0)
    if args.one:
        method, lr, steps = args.one[0], float(args.one[1]), int(args.one[2])
        result = run_one(method, lr, steps, args.size, args.device, args.work_dir)
        args.json.write_text(json.dumps(result))
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.resume_check:
        prepare(args.work_dir)
        print("| optimizer | steps | stopped and resumed at | identical loss curve | largest loss gap |")
        print("|---|---|---|---|---|")
        for method in args.resume_check.split(","):
            r = resume_check(method, GRID[method][1], 60, 30, args.size, args.device, args.work_dir)
            print(f"| {LABELS[method]} | {r['steps']} | {r['stop']} | {r['identical']} | {r['max_loss_gap']:.2e} |",
                  flush=True)
        return
    if not args.report_only:
        prepare(args.work_dir)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grid: dict[str, dict[float, float]] = {}
    results: dict[str, dict] = {}
    timing: dict[str, list[tuple]] = {}
    for method in methods:
        if method not in GRID:
            raise SystemExit(f"unknown method {method!r}; known: {', '.join(GRID)}")
        tag = f"{args.size}-{args.device}-{method}"
        grid[method], timing[method] = {}, []
        if method in SHARE:
            rate = results.get(SHARE[method], {}).get("lr")
            if rate is None:
                raise SystemExit(f"{method} takes {SHARE[method]}'s learning rate: list {SHARE[method]} before it")
            lrs = (rate,)
        else:
            lrs = GRID[method]
        for lr in lrs:
            out = args.work_dir / f"{tag}-grid-{lr:g}-{args.grid_steps}.json"
            if args.report_only and not out.exists():
                continue
            r = child(method, lr, args.grid_steps, args, out)
            grid[method][lr] = r.get("val_loss", float("inf"))
            if "s_per_step" in r:
                timing[method].append((r["s_per_step"], r["opt_s_per_step"]))
            if args.grid_steps == args.steps and (method not in results or grid[method][lr] < grid[method][
                    results[method]["lr"]]):
                results[method] = r
        if not grid[method]:
            continue
        if args.grid_steps != args.steps:
            best = min(grid[method], key=grid[method].get)
            out = args.work_dir / f"{tag}-full-{best:g}-{args.steps}.json"
            if args.report_only and not out.exists():
                continue
            results[method] = child(method, best, args.steps, args, out)
        print(f"{method}: lr {results[method]['lr']:g}, val loss {results[method].get('val_loss')}", flush=True)
    print(report(results, grid, timing, args))
    plot(results, args.plot_dir / f"train_{args.size}.png")


if __name__ == "__main__":
    main()
