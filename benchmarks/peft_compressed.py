"""LoRA on a compressed default model with plain transformers + PEFT: train, merge into the factors, compare.

Run: ``.venv/bin/python benchmarks/peft_compressed.py [--ratio 0.4] [--steps 30] [--rank 8]``.

Compresses SmolLM2-135M (svd_llm, calibrated on the start of the pydoc topics), loads the directory with
``AutoModelForCausalLM.from_pretrained`` in a fresh child process, puts a LoRA adapter on every linear layer with
``get_peft_model(..., target_modules="all-linear")``, trains it on the middle of the text, merges it with
``merge_and_unload()`` (ranks grow by the adapter's), saves with ``save_pretrained`` and reloads. Reports held-out
perplexity (end of the text) before and after, the largest logit difference adapted vs merged and merged vs
reloaded, the weights on disk, and the child's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

CHILD = r"""
import json, math, sys, time, torch
import rankwise
from rankwise.calibrate import load_text, split_windows
from rankwise.eval import perplexity
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model

path, merged_dir, steps, rank = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(path)
ids = tok(load_text(), return_tensors="pt").input_ids[0]
_, held_out = split_windows(ids, 128, 0, 16)
train = ids[len(ids) // 3: len(ids) // 3 + steps * 4 * 128].view(steps, 4, 128)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
before = perplexity(model, held_out, batch_size=8)
peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
targets = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A"))
opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-4)
start = time.perf_counter()
for batch in train:
    loss = peft_model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
train_s = time.perf_counter() - start
peft_model.eval()
with torch.no_grad():
    adapted_ppl = perplexity(peft_model, held_out, batch_size=8)
    adapted = peft_model(input_ids=held_out[:4]).logits
    merged = peft_model.merge_and_unload()
    diff_merge = float((merged(input_ids=held_out[:4]).logits - adapted).abs().max())
    merged.save_pretrained(merged_dir)
    again = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    diff_reload = float((again(input_ids=held_out[:4]).logits - merged(input_ids=held_out[:4]).logits).abs().max())
    merged_ppl = perplexity(again, held_out, batch_size=8)
print(json.dumps(dict(before=before, adapted=adapted_ppl, merged=merged_ppl, diff_merge=diff_merge,
                      diff_reload=diff_reload, targets=targets, train_s=train_s)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    rankwise_cli = str(__import__("pathlib").Path(sys.executable).with_name("rankwise"))
    with tempfile.TemporaryDirectory() as tmp:
        out, merged = f"{tmp}/compressed", f"{tmp}/merged"
        subprocess.run([rankwise_cli, "compress", "--method", "svd_llm", "--ratio", str(args.ratio),
                        "--calib-samples", "8", "--seq-len", "128", "--no-cache", "--out", out], check=True,
                       capture_output=True)
        child = subprocess.run([sys.executable, "-c", CHILD, out, merged, str(args.steps), str(args.rank)],
                               check=True, capture_output=True, text=True)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        r = json.loads(child.stdout.strip().splitlines()[-1])
        size = {d: sum(p.stat().st_size for p in __import__("pathlib").Path(d).glob("*.safetensors"))
                for d in (out, merged)}
    print(f"svd_llm at ratio {args.ratio}; LoRA r={args.rank} on {r['targets']} layers (all-linear), "
          f"{args.steps} steps x 4 x 128 tokens in {r['train_s']:.0f} s; peak RSS of the children {peak_mb:,.0f} MB\n")
    print("| model | held-out ppl | weights on disk | max abs logit diff |")
    print("|---|---|---|---|")
    print(f"| compressed, bfloat16 (from_pretrained) | {r['before']:.2f} | {size[out] / 1e6:,.1f} MB | |")
    print(f"| + LoRA, unmerged | {r['adapted']:.2f} | | |")
    print(f"| merged into the factors, saved (float32), reloaded | {r['merged']:.2f} | {size[merged] / 1e6:,.1f} MB | "
          f"merged vs adapted {r['diff_merge']:.2e}; reloaded vs merged {r['diff_reload']:.2e} |")


if __name__ == "__main__":
    main()
