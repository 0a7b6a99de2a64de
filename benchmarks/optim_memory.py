"""Peak resident memory of training with each optimizer: where low-rank state and per-layer updates pay off.

A model whose weights dominate memory (GaLore's LLaMA-60M shape, or ``--size tiny``) trained for a few steps on a
short batch, so activations are small beside weights, gradients and optimizer state. Each optimizer runs in its own
child process; the table gives its peak RSS (``ru_maxrss``), its optimizer-state bytes and the model's weight bytes.
The same optimizers and settings as ``train_tiny_llama.py`` (which it imports), rank and gap included.

    python benchmarks/optim_memory.py [--size llama60m] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from train_tiny_llama import LABELS, build_model, make, state_bytes

METHODS = ("adamw", "galore_torch", "rw_galore", "rw_galore_layer", "apollo_torch", "rw_apollo", "rw_apollo_mini")


def one(method: str, size: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(size, 4096)
    optimizer, _, per_layer = make(method, model, 1e-3)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, 4096, (1, 64), generator=g)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "peak_rss_mb": peak / 1024, "growth_mb": (peak - base) / 1024,
            "state_mb": state_bytes(optimizer) / 2**20, "per_layer": per_layer,
            "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "llama60m"), default="llama60m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.size, args.steps)))
        return
    rows = []
    for method in args.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", method, "--size", args.size, "--steps",
                              str(args.steps)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = rows[0] if rows[0]["method"] == "adamw" else None
    print(f"\n{args.size}, weights {rows[0]['weights_mb']:.0f} MB, {args.steps} steps of 1 x 64 tokens, "
          f"torch {torch.__version__}\n")
    print("| optimizer | peak RSS MB | vs AdamW | RSS growth while training MB | vs AdamW | optimizer state MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else ""
        vg = f"{r['growth_mb'] / base['growth_mb']:.2f}x" if base else ""
        print(f"| {LABELS[r['method']]} | {r['peak_rss_mb']:,.0f} | {vs} | {r['growth_mb']:,.0f} | {vg} | "
              f"{r['state_mb']:,.1f} |")


if __name__ == "__main__":
    main()
