"""ONNX export of the default model, dense and compressed: file bytes, logits and greedy tokens against torch, decode
speed in onnxruntime against torch, peak memory.

Compresses SmolLM2-135M with SVD-LLM (``rankwise compress --method svd_llm --ratio 0.4 --calib-samples 8
--seq-len 128``) unless ``--compressed DIR`` is given, exports the dense and the compressed model with
``rankwise export --format onnx``, then runs each model in each engine in its own child process (peak resident
memory from ``os.wait4``): logits on held-out windows (the end of the pydoc topics, disjoint from calibration), and
the same greedy decoding loop with a KV cache (prompt in one step, then one token per step) in torch and in
onnxruntime with the same thread count.

    .venv/bin/python benchmarks/onnx_export.py --out /tmp/rankwise-onnx-bench
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from stream_vs_memory import measured  # one child process: seconds and peak RSS

CHILD = """
import json, sys, torch
from rankwise.calibrate import load_text, split_windows
from rankwise.io.models import load_model, load_tokenizer
engine, model_dir, onnx_dir, out, windows, seq_len, new_tokens, threads = sys.argv[1:9]
windows, seq_len, new_tokens, threads = map(int, (windows, seq_len, new_tokens, threads))
torch.set_num_threads(threads)
tokenizer = load_tokenizer(onnx_dir)
ids = tokenizer(load_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
_, held_out = split_windows(ids, seq_len, 0, windows + 1)
prompt, held_out = held_out[-1:, :32], held_out[:-1]
eos = json.load(open(f"{onnx_dir}/generation_config.json")).get("eos_token_id")
eos = eos[0] if isinstance(eos, list) else eos
if engine == "float64":  # the answer without float32 rounding, in its own process (its memory is not torch's)
    model = load_model(model_dir).model.double()
    with torch.no_grad():
        torch.save(torch.cat([model(w[None]).logits for w in held_out]), out)
    sys.exit()
if engine == "torch":
    from rankwise.export import torch_generate
    model = load_model(model_dir).model.float()  # as exported (a compressed bf16 checkpoint runs in float32)
    with torch.no_grad():
        logits = torch.cat([model(w[None]).logits for w in held_out])
        reference = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=eos)
    tokens = torch_generate(model, prompt, new_tokens, eos_token_id=eos).tokens
else:
    from rankwise.export import OnnxCausalLM
    model = OnnxCausalLM(onnx_dir, threads=threads)
    logits = torch.cat([model.logits(w[None]) for w in held_out])
    reference = None
    tokens = model.generate(prompt, new_tokens, eos_token_id=eos).tokens
torch.save({"logits": logits, "tokens": tokens, "reference": reference}, out)
"""

# Decode speed: one process per engine, in which the dense and the compressed model take turns for every repeat (so
# a change in the machine's load from other jobs hits both alike); the median per model is reported. The engines get
# separate processes so that neither engine's idle threads compete with the other's. On a loaded machine (more
# runnable jobs than cores) torch with 2 OpenMP threads decoded 3-4x slower than with 1: use --threads 1 there.
SPEED = """
import json, statistics, sys, torch
from rankwise.export import OnnxCausalLM, torch_generate
from rankwise.io.models import load_model, load_tokenizer
engine, out, new_tokens, threads, repeats, *triples = sys.argv[1:]
new_tokens, threads, repeats = int(new_tokens), int(threads), int(repeats)
torch.set_num_threads(threads)
prompt = load_tokenizer(triples[2])("The difference between a list and a tuple in Python is",
                                    return_tensors="pt").input_ids
runners = {}
for name, model_dir, onnx_dir in zip(triples[::3], triples[1::3], triples[2::3]):
    if engine == "torch":
        model = load_model(model_dir).model.float()
        runners[name] = lambda m=model: torch_generate(m, prompt, new_tokens)
    else:
        session = OnnxCausalLM(onnx_dir, threads=threads)
        runners[name] = lambda s=session: s.generate(prompt, new_tokens)
for runner in runners.values():
    runner()  # warm-up
speeds = {name: [] for name in runners}
for _ in range(repeats):
    for name, runner in runners.items():
        speeds[name].append(runner().decode_tokens_per_s)
json.dump({f"{name} {engine}": statistics.median(v) for name, v in speeds.items()}, open(out, "w"))
"""


def onnx_bytes(directory: Path) -> int:
    layout = json.loads((directory / "rankwise_onnx.json").read_text())
    return sum((directory / f).stat().st_size for f in layout["files"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/rankwise-onnx-bench", help="working directory")
    parser.add_argument("--compressed", default=None, help="an existing compressed directory (skips compress)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--windows", type=int, default=4, help="held-out windows for the logit difference")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated")
    parser.add_argument("--repeats", type=int, default=5, help="timed generations per model and engine, taking "
                        "turns; the median speed is reported")
    parser.add_argument("--reuse", action="store_true", help="keep exports already in --out (their export line "
                        "is then not measured)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="for torch and onnxruntime")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    exe = str(Path(sys.executable).parent / "rankwise")
    compressed = Path(args.compressed) if args.compressed else out / f"svd_llm-{args.ratio}"
    commands = {}
    if not args.compressed:
        commands["compress"] = [exe, "compress", "--method", "svd_llm", "--ratio", str(args.ratio),
                                "--calib-samples", "8", "--seq-len", "128", "--out", str(compressed), "--overwrite"]
    models = {"dense": "smollm2", "compressed": str(compressed)}
    for name, model in models.items():
        if args.reuse and (out / f"{name}-onnx" / "rankwise_onnx.json").is_file():
            continue
        commands[f"export {name}"] = [exe, "export", model, "--format", "onnx", "--out", str(out / f"{name}-onnx"),
                                      "--overwrite", "--threads", str(args.threads)]
    print(f"# torch {torch.__version__}, {args.threads} threads; SmolLM2-135M dense and svd_llm at ratio "
          f"{args.ratio}; {args.windows} held-out windows of {args.seq_len}; {args.new_tokens} greedy tokens")
    steps = {}
    for label, cmd in commands.items():
        steps[label] = measured(cmd)
        print(f"{label}: {steps[label][0]:.1f} s, peak RSS {steps[label][1]:,.0f} MB   ({' '.join(cmd)})")
    results = {}
    for name, model in models.items():
        for engine in ("float64", "torch", "onnxruntime"):
            result = out / f"{name}-{engine}.pt"
            cmd = [sys.executable, "-c", CHILD, engine, model, str(out / f"{name}-onnx"), str(result),
                   str(args.windows), str(args.seq_len), str(args.new_tokens), str(args.threads)]
            _, rss = measured(cmd)
            loaded = torch.load(result)
            results[name, engine] = {**loaded, "rss": rss} if isinstance(loaded, dict) else loaded
    pairs = [item for name, model in models.items() for item in (name, model, str(out / f"{name}-onnx"))]
    speed = {}
    for engine in ("torch", "onnxruntime"):
        measured([sys.executable, "-c", SPEED, engine, str(out / "speed.json"), str(args.new_tokens),
                  str(args.threads), str(args.repeats), *pairs])
        speed.update(json.loads((out / "speed.json").read_text()))
    dense_bytes = onnx_bytes(out / "dense-onnx")
    print("\n| model | ONNX bytes | bytes / dense | max logit diff ORT vs torch | "
          "max error vs float64: torch, ORT | "
          "greedy ORT = torch = HF generate | decode tok/s torch | decode tok/s ORT | ORT / torch | "
          "peak RSS MB torch | peak RSS MB ORT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in models:
        t, o = results[name, "torch"], results[name, "onnxruntime"]
        nbytes = onnx_bytes(out / f"{name}-onnx")
        diff = float((t["logits"] - o["logits"]).abs().max())
        exact = results[name, "float64"]
        err_torch, err_ort = (float((r["logits"].double() - exact).abs().max()) for r in (t, o))
        equal = torch.equal(t["tokens"], o["tokens"]) and torch.equal(t["tokens"], t["reference"])
        speed_t, speed_o = speed[f"{name} torch"], speed[f"{name} onnxruntime"]
        generated = o["tokens"].shape[1] - 32
        print(f"| {name} | {nbytes:,} | {nbytes / dense_bytes:.3f} | {diff:.2e} | {err_torch:.2e}, {err_ort:.2e} | "
              f"{equal} ({generated} tokens) | {speed_t:.1f} | {speed_o:.1f} | {speed_o / speed_t:.2f} | "
              f"{t['rss']:,.0f} | {o['rss']:,.0f} |")
    for engine in ("torch", "onnxruntime"):
        print(f"\ndecode speed compressed / dense in {engine}: "
              f"{speed[f'compressed {engine}'] / speed[f'dense {engine}']:.2f}", end="")
    print()
    from rankwise.io.models import checkpoint_dir

    dense_dir, _ = checkpoint_dir("smollm2")
    p_dense, p_comp = stored_params(Path(dense_dir)), stored_params(compressed)
    print(f"\nparameters stored: dense {p_dense:,}, compressed {p_comp:,} ({p_comp / p_dense:.3f}); ONNX bytes "
          f"compressed / dense {onnx_bytes(out / 'compressed-onnx') / dense_bytes:.3f}")


def stored_params(directory: Path) -> int:
    """Elements of every tensor in the safetensors files of ``directory`` (tied tensors stored once)."""
    from safetensors import safe_open

    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    return total


if __name__ == "__main__":
    main()
