"""Every adapter on SmolLM2-135M, same data and steps, on two offline tasks, in one run.

Usage:
    python benchmarks/adapt_smollm2.py [--steps 24] [--methods lora,pissa,...] [--tasks domain,addition]

Tasks (data from this machine only):
- ``domain``: next-token loss on the Python source of the standard library: train on the top-level modules whose
  names start with a-m, evaluate on n-z (windows of 128 tokens).
- ``addition``: 3-digit addition written ``123+456=0579`` (answers zero-padded to 4 digits), 8 problems per
  training window, loss on the answer digits only; scored by greedy-decoding accuracy on 200 held-out problems,
  each prompted with 3 solved examples (the evaluation loss during training is on the first 48 of them).
  Problems come from ``random.Random(0)``; held-out ones never appear in training.

Each (task, method) runs in its own child process (this script with ``--one``) so its peak RSS is its own. Prints a
Markdown table per task (trainable parameters, final eval loss / accuracy, steps to reach LoRA's final eval loss,
seconds per step, peak RSS) and writes ``adapt_<task>.png`` (evaluation loss against step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# (method, rank, learning rate): LoRA-family at rank 8; the tiny-parameter methods at the rank that keeps them
# >= 10x below LoRA's budget, with the larger learning rate their papers use for so few parameters.
PLAN = {
    "lora": (8, 5e-4), "pissa": (8, 5e-4), "olora": (8, 5e-4), "dora": (8, 5e-4), "eva": (8, 5e-4),
    "corda": (8, 5e-4), "lora_ga": (8, 5e-4), "milora": (8, 5e-4), "block_lora": (8, 5e-4),
    "randlora": (32, 5e-4), "lora_sb": (24, 5e-3), "svfit": (64, 5e-3), "loldu": (64, 5e-3),
}
SEQ = 128
PROBLEMS_PER_WINDOW = 8


def domain_task(tokenizer, n_eval: int = 12) -> dict:
    """Windows of the standard library's top-level modules: a-m for training, n-z (first n_eval) for evaluation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    train = "\n".join(f.read_text(errors="replace") for f in files if f.name[0].lower() <= "m")
    held = "\n".join(f.read_text(errors="replace") for f in files if f.name[0].lower() > "m")

    def windows(text: str, limit: int | None) -> torch.Tensor:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        n = ids.numel() // SEQ if limit is None else min(limit, ids.numel() // SEQ)
        return ids[: n * SEQ].reshape(n, SEQ)

    return {"train": windows(train, 4000), "eval": windows(held, n_eval)}


def _problem(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
    return f"{a}+{b}=", f"{a + b:04d}\n"


def addition_task(tokenizer, n_train_windows: int = 1200, n_eval: int = 200) -> dict:
    rng = random.Random(0)
    held: dict[str, str] = {}
    while len(held) < n_eval + 3:
        q, a = _problem(rng)
        held[q] = a
    shots = list(held.items())[:3]
    evaluation = list(held.items())[3:]
    rows, masks = [], []
    while len(rows) < n_train_windows:
        ids, mask = [], []
        while len(ids) < PROBLEMS_PER_WINDOW * 13:
            q, a = _problem(rng)
            if q in held:
                continue
            qi = tokenizer(q, add_special_tokens=False).input_ids
            ai = tokenizer(a, add_special_tokens=False).input_ids
            ids += qi + ai
            mask += [0] * len(qi) + [1] * len(ai)
        rows.append(ids[: PROBLEMS_PER_WINDOW * 13])
        masks.append(mask[: PROBLEMS_PER_WINDOW * 13])
    prefix = "".join(q + a for q, a in shots)
    prompts = [tokenizer(prefix + q, add_special_tokens=False).input_ids for q, _ in evaluation]
    answers = [a.strip() for _, a in evaluation]
    eval_ids = torch.tensor([tokenizer(prefix + q + a, add_special_tokens=False).input_ids for q, a in evaluation])
    eval_mask = torch.zeros_like(eval_ids)
    eval_mask[:, -5:] = 1  # the four answer digits and the newline
    return {"train": torch.tensor(rows), "mask": torch.tensor(masks).bool(), "eval": eval_ids[:48],
            "eval_mask": eval_mask[:48].bool(), "prompts": torch.tensor(prompts), "answers": answers}


@torch.no_grad()
def greedy_accuracy(model, tokenizer, prompts: torch.Tensor, answers: list[str], batch: int = 50) -> float:
    """Exact-match accuracy of 4 greedy tokens after each prompt (all prompts have the same length)."""
    model.eval()
    right = 0
    for start in range(0, prompts.shape[0], batch):
        ids = prompts[start:start + batch]
        for _ in range(4):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
        for row, want in zip(ids[:, -4:], answers[start:start + batch], strict=True):
            right += tokenizer.decode(row) == want
    return right / prompts.shape[0]


def one(task: str, method: str, steps: int, out: Path) -> None:
    """Train one adapter on one task in this process and write its measurements to ``out``."""
    from rankwise.adapt.methods import add_adapter
    from rankwise.adapt.train import TrainConfig, train
    from rankwise.io.models import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_model("smollm2")
    data = domain_task(loaded.tokenizer) if task == "domain" else addition_task(loaded.tokenizer)
    rank, lr = PLAN[method]
    begun = time.perf_counter()
    model = add_adapter(loaded.model, method, rank, data=data["train"], batch_size=8, prepass_batches=4, seed=0)
    prepass = time.perf_counter() - begun
    config = TrainConfig(steps=steps, lr=lr, batch_size=8, eval_every=max(1, steps // 8), seed=0, bf16=True)
    result = train(model, data["train"], config, mask=data.get("mask"), eval_ids=data["eval"],
                   eval_mask=data.get("eval_mask"), progress=False)
    record = {"task": task, "method": method, "rank": rank, "lr": lr, "steps": steps, "trainable": result.trainable,
              "evals": result.evals, "losses": result.losses, "seconds_per_step": result.seconds_per_step,
              "init_seconds": prepass, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if task == "addition":
        record["accuracy"] = greedy_accuracy(model, loaded.tokenizer, data["prompts"], data["answers"])
    out.write_text(json.dumps(record))


def steps_to_reach(evals: list, target: float) -> int | None:
    return next((s for s, v in evals if v <= target), None)


def report(task: str, records: list[dict], plot_dir: Path) -> None:
    lora = next((r for r in records if r["method"] == "lora"), None)
    target = lora["evals"][-1][1] if lora else None
    acc = task == "addition"
    print(f"\n### {task}\n")
    print("| method | rank | lr | trainable params | vs LoRA params | eval loss start | eval loss end | vs LoRA loss | "
          f"steps to LoRA's final loss |{' accuracy |' if acc else ''} s/step | init s | peak RSS (GB) |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if acc else "") + "---|---|---|")
    for r in records:
        end = r["evals"][-1][1]
        reach = steps_to_reach(r["evals"], target) if target is not None else None
        ratio_p = f"{r['trainable'] / lora['trainable']:.3f}x" if lora else "-"
        ratio_l = f"{end / target:.3f}x" if target else "-"
        reach_s = f"{reach} ({reach / r['steps']:.2f}x)" if reach is not None else "not reached"
        accuracy = f" {r['accuracy']:.3f} |" if acc else ""
        print(f"| {r['method']} | {r['rank']} | {r['lr']:g} | {r['trainable']:,} | {ratio_p} | "
              f"{r['evals'][0][1]:.4f} | {end:.4f} | {ratio_l} | {reach_s} |{accuracy} "
              f"{r['seconds_per_step']:.2f} | {r['init_seconds']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, r in enumerate(records):
        ax.plot([s for s, _ in r["evals"]], [v for _, v in r["evals"]], marker=".", label=r["method"],
                color="black" if r["method"] == "lora" else colors[i % len(colors)],
                linestyle="-" if i % 2 == 0 else "--", linewidth=2.5 if r["method"] == "lora" else 1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss" + (" (answer tokens)" if acc else ""))
    ax.set_title(f"SmolLM2-135M adapters: {task}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = plot_dir / f"adapt_{task}.png"
    fig.savefig(path, dpi=120)
    print(f"\nplot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--methods", default=",".join(PLAN))
    parser.add_argument("--tasks", default="domain,addition")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rankwise-adapt"))
    parser.add_argument("--plot-dir", type=Path, default=HERE)
    parser.add_argument("--one", nargs=2, metavar=("TASK", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="redo the tables and plots from --work-dir")
    args = parser.parse_args()
    if args.one:
        one(args.one[0], args.one[1], args.steps, args.json)
        return
    if args.report_only:
        for task in args.tasks.split(","):
            records = [json.loads(p.read_text()) for m in args.methods.split(",")
                       if (p := args.work_dir / f"{task}-{m}.json").is_file()]
            report(task, records, args.plot_dir)
        return
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"SmolLM2-135M, {args.steps} steps x 8 windows of {SEQ} tokens (addition: {PROBLEMS_PER_WINDOW} problems "
          f"of 13 tokens), AdamW, 5 % warm-up then cosine, clip 1.0, seed 0, bfloat16 autocast, "
          f"torch {torch.__version__}, {os.cpu_count()} threads; targets: every linear layer in the blocks.")
    for task in args.tasks.split(","):
        records = []
        for method in args.methods.split(","):
            out = args.work_dir / f"{task}-{method}.json"
            code = subprocess.run([sys.executable, __file__, "--one", task, method, "--steps", str(args.steps),
                                   "--json", str(out)], check=False).returncode
            if code:
                print(f"| {method} | failed with exit code {code} |")
                continue
            records.append(json.loads(out.read_text()))
        report(task, records, args.plot_dir)


if __name__ == "__main__":
    main()
