"""Adapters beyond matrices: Tucker (FLoRA) and SNELL against full fine-tuning and LoRA, on a CNN and on SmolLM2.

Usage:
    python benchmarks/adapters_nd.py [--parts cnn,lm] [--seeds 3] [--epochs 30] [--lm-steps 20]
    flock /tmp/rankwise-heavy.lock python benchmarks/adapters_nd.py --parts lm   # loads SmolLM2-135M

Part ``cnn`` (offline, seconds): a small CNN (three 3x3 Conv2d layers and a linear head) is pre-trained on half of
scikit-learn's digits, then adapted to the other half rotated by 90 degrees with Gaussian noise (sigma 0.3): 300
training images, 150 for choosing each method's learning rate (grid ``--lrs``, seed 0), the rest (447) for the test.
Every adapter targets the three convs and the head: PEFT's LoRA (its Conv2d LoRA), Tucker (a 4-mode core per conv)
and SNELL (the conv weight as an ``out x in·9`` matrix), at about the same trainable parameters (LoRA's and SNELL's
counts are equal at equal rank; Tucker's rank is the one whose count is closest to LoRA's unless ``--tucker-rank``
is given). Rows: test accuracy (mean and spread over ``--seeds`` seeds of the adapter init and batch order),
trainable parameters and training time, with the full fine-tuning anchor's ratios beside them.

Part ``lm`` (needs the cached SmolLM2-135M; run it under the shared lock): ``rankwise adapt smollm2 --method M`` for
lora, tucker and snell at the same rank (equal trainable parameters up to Tucker's ``r x r`` cores), the same steps,
learning rate and data (the pydoc topics: training windows from the start, held-out windows from the end); each in
its own child process so its peak RSS is its own. Rows: held-out perplexity before and after, seconds per step,
peak RSS, with LoRA's ratios beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

CNN_TARGETS = ["conv1", "conv2", "conv3", "fc"]


class DigitsCNN(nn.Module):
    """8x8 grey images -> 10 classes: conv 1->16, conv 16->32, 2x2 max-pool, conv 32->32, mean-pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 32, 8, 8)
        h = torch.relu(self.conv3(nn.functional.max_pool2d(h, 2)))  # (B, 32, 4, 4)
        return self.fc(h.mean(dim=(-2, -1)))


def digits_data(seed: int = 0, n_train: int = 300, n_val: int = 150) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pre-training half (original digits) and the shifted half (rotated 90 degrees, noised) split train/val/test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    half = len(y) // 2
    pre, shift = order[:half], order[half:]
    Xs = torch.rot90(X[shift], 1, dims=(2, 3)) + 0.3 * torch.randn(len(shift), 1, 8, 8, generator=g)
    ys = y[shift]
    if n_train + n_val >= len(ys):
        raise ValueError(f"--n-train + --n-val must be below {len(ys)} (the shifted half), got {n_train + n_val}")
    return {"pre": (X[pre], y[pre]), "train": (Xs[:n_train], ys[:n_train]),
            "val": (Xs[n_train:n_train + n_val], ys[n_train:n_train + n_val]),
            "test": (Xs[n_train + n_val:], ys[n_train + n_val:])}


def fit(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int, lr: float, seed: int,
        batch: int = 64) -> float:
    """Adam on the trainable parameters; returns the seconds it took."""
    X, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch):
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    X, y = data
    return (model(X).argmax(-1) == y).float().mean().item()


def adapted(method: str, base: nn.Module, rank: int, seed: int, sparsity: float) -> nn.Module:
    """A copy of ``base`` with ``method``'s trainable parameters (full: all of them)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from rankwise.adapt import SNELLConfig, TuckerConfig

    model = copy.deepcopy(base)
    if method == "full":
        return model.requires_grad_(True)
    if method == "lora":  # PEFT draws LoRA's A from the global generator: fork it
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=CNN_TARGETS))
    if method == "tucker":
        return get_peft_model(model, TuckerConfig(r=rank, lora_alpha=rank, seed=seed, target_modules=CNN_TARGETS))
    if method == "snell":
        return get_peft_model(model, SNELLConfig(r=rank, sparsity=sparsity, seed=seed, target_modules=CNN_TARGETS))
    raise ValueError(f"unknown method {method!r}; choose full, lora, tucker or snell")


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cnn_part(args: argparse.Namespace) -> None:
    data = digits_data()
    torch.manual_seed(0)  # the pre-trained network's init, in this process only
    base = DigitsCNN()
    seconds = fit(base, data["pre"], epochs=args.pre_epochs, lr=1e-2, seed=0, batch=128)
    base.requires_grad_(False)
    print(f"pre-trained on {len(data['pre'][1])} original digits in {seconds:.1f} s; accuracy on the shifted test set "
          f"before adapting: {accuracy(base, data['test']):.3f}\n")
    lora_params = trainable(adapted("lora", base, args.rank, 0, args.sparsity))
    tucker_rank = args.tucker_rank or min(range(1, 33), key=lambda r: abs(
        trainable(adapted("tucker", base, r, 0, args.sparsity)) - lora_params))
    ranks = {"full": 0, "lora": args.rank, "tucker": tucker_rank, "snell": args.rank}
    rows = {}
    for method, rank in ranks.items():
        tried = {lr: run(method, base, rank, 0, lr, data, args) for lr in args.lrs}  # (val acc, test acc, s)
        best = max(args.lrs, key=lambda lr: tried[lr][0])
        runs = [tried[best], *(run(method, base, rank, seed, best, data, args) for seed in range(1, args.seeds))]
        accs = torch.tensor([test for _, test, _ in runs])
        rows[method] = {"rank": rank, "lr": best, "acc": accs.mean().item(),
                        "spread": (accs.max() - accs.min()).item(), "seconds": sum(s for *_, s in runs) / len(runs),
                        "params": trainable(adapted(method, base, rank, 0, args.sparsity))}
    full = rows["full"]
    print(f"| method | rank | trainable params | x full | lr (val) | test acc (mean of {args.seeds}, spread) | "
          "x full | train s | x full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, row in rows.items():
        print(f"| {method}{f' (sparsity {args.sparsity})' if method == 'snell' else ''} | {row['rank'] or '-'} | "
              f"{row['params']:,} | {row['params'] / full['params']:.3f} | {row['lr']:g} | "
              f"{row['acc']:.3f} ({row['spread']:.3f}) | {row['acc'] / full['acc']:.3f} | {row['seconds']:.1f} | "
              f"{row['seconds'] / full['seconds']:.2f} |")


def run(method: str, base: nn.Module, rank: int, seed: int, lr: float, data: dict, args: argparse.Namespace
        ) -> tuple[float, float, float]:
    """Adapt a copy of ``base``: (validation accuracy, test accuracy, training seconds)."""
    model = adapted(method, base, rank, seed, args.sparsity)
    seconds = fit(model, data["train"], epochs=args.epochs, lr=lr, seed=seed)
    return accuracy(model, data["val"]), accuracy(model, data["test"]), seconds


def lm_part(args: argparse.Namespace) -> None:
    exe = Path(sys.executable).with_name("rankwise")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.lm_methods.split(","):
            out = Path(tmp) / method
            command = [str(exe), "adapt", args.lm_model, "--method", method, "--rank", str(args.lm_rank), "--steps",
                       str(args.lm_steps), "--lr", str(args.lm_lr), "--seq-len", str(args.lm_seq_len), "--batch-size",
                       str(args.lm_batch), "--eval-samples", str(args.lm_eval), "--out", str(out)]
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output = child.stdout.read()
            _, status, usage = os.wait4(child.pid, 0)
            if status != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{output}")
            summary = json.loads((out / "rankwise_adapt.json").read_text())
            first, last = summary["evals"][0][1], summary["evals"][-1][1]
            rows[method] = {"params": summary["trainable"], "before": math.exp(first), "after": math.exp(last),
                            "step_s": summary["seconds"] / summary["steps"], "wall": time.perf_counter() - start,
                            "rss_mb": usage.ru_maxrss / 1024}
            print(f"{method}: {output.strip().splitlines()[-2] if output.strip() else ''}", flush=True)
    anchor = rows.get("lora") or next(iter(rows.values()))
    print(f"\n`rankwise adapt {args.lm_model} --rank {args.lm_rank} --steps {args.lm_steps} --lr {args.lm_lr} "
          f"--seq-len {args.lm_seq_len} --batch-size {args.lm_batch} --eval-samples {args.lm_eval}`\n")
    print("| method | trainable params | x lora | held-out ppl before | after | after x lora | s/step | x lora | "
          "peak RSS MB | x lora |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, row in rows.items():
        print(f"| {method} | {row['params']:,} | {row['params'] / anchor['params']:.3f} | {row['before']:.3f} | "
              f"{row['after']:.3f} | {row['after'] / anchor['after']:.3f} | {row['step_s']:.2f} | "
              f"{row['step_s'] / anchor['step_s']:.2f} | {row['rss_mb']:.0f} | "
              f"{row['rss_mb'] / anchor['rss_mb']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="cnn,lm", help="comma list of cnn, lm")
    parser.add_argument("--rank", type=int, default=4, help="LoRA's and SNELL's rank on the CNN")
    parser.add_argument("--tucker-rank", type=int, default=0, help="Tucker's rank on the CNN (0: match LoRA's count)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="SNELL's sparsity on the CNN")
    parser.add_argument("--epochs", type=int, default=40, help="adaptation epochs (batch 64)")
    parser.add_argument("--pre-epochs", type=int, default=30, help="pre-training epochs")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (adapter init, batch order)")
    parser.add_argument("--lrs", default="3e-3,1e-2,3e-2", help="learning rates tried on the validation split")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny convs: 1 is fastest)")
    parser.add_argument("--lm-model", default="smollm2", help="model for the lm part (a directory for a quick check)")
    parser.add_argument("--lm-methods", default="lora,tucker", help="snell also works, at about 0.1-0.3 s per "
                        "adapted 576 x 1536 matrix and step on one CPU core (its dense kernel and top-k)")
    parser.add_argument("--lm-rank", type=int, default=8)
    parser.add_argument("--lm-steps", type=int, default=20)
    parser.add_argument("--lm-lr", type=float, default=1e-3)
    parser.add_argument("--lm-seq-len", type=int, default=128)
    parser.add_argument("--lm-batch", type=int, default=4)
    parser.add_argument("--lm-eval", type=int, default=8, help="held-out windows")
    args = parser.parse_args()
    args.lrs = [float(v) for v in args.lrs.split(",")]
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    if "cnn" in parts:
        cnn_part(args)
    if "lm" in parts:
        lm_part(args)


if __name__ == "__main__":
    main()
