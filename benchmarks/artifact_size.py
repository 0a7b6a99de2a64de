"""Size on disk of the default model's compressed directories against the dense bf16 checkpoint, CLI against
library bytes, and ``from_pretrained`` against ``rankwise.load``.

Run: ``.venv/bin/python benchmarks/artifact_size.py [--ratios 0.2,0.4] [--calib-samples 8] [--seq-len 128]``.
Each compression runs as ``rankwise compress`` in a child process under ``/usr/bin/time -f %M`` (peak RSS); the
library path (``compress_checkpoint``) runs in another child for the last ratio and its files are compared byte for
byte with the CLI's.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIBRARY = """
import sys, torch
from rankwise.calibrate import load_text, split_windows
from rankwise.compression import compress_checkpoint
from rankwise.io.models import checkpoint_dir, load_tokenizer
from rankwise.methods.svd_llm import SVDLLMConfig
path, _ = checkpoint_dir("smollm2")
tok = load_tokenizer(path)
ids = tok(load_text(), return_tensors="pt").input_ids[0]
calib, _ = split_windows(ids, int(sys.argv[3]), int(sys.argv[2]), 0)
compress_checkpoint(path, SVDLLMConfig(ratio=float(sys.argv[1])), calib, sys.argv[4], tokenizer=tok, progress=False,
                    cache=None)
"""

COMPARE = """
import sys, torch, rankwise
from transformers import AutoModelForCausalLM
x = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()(x).logits
    b = rankwise.load(sys.argv[1]).model(x).logits
print(float((a.float() - b.float()).abs().max()))
"""

DENSE = """
import sys, torch
from rankwise.io.models import load_model
m = load_model("smollm2").model.to(torch.bfloat16)
m.save_pretrained(sys.argv[1])
"""


def _run(cmd: list[str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return time.perf_counter() - start, peak_kb * 1024, proc.stdout


def _weights(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in [*sorted(path.glob("*.safetensors")), path / "config.json"]:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", default="0.2,0.4")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    py = sys.executable
    cli = str(Path(py).with_name("rankwise"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _run([py, "-c", DENSE, str(root / "dense")])
        dense = _weights(root / "dense")
        rows = [("dense bf16 (save_pretrained)", dense, 1.0, "", "", "")]
        ratios = [float(r) for r in args.ratios.split(",")]
        for ratio in ratios:
            out = root / f"cli-{ratio}"
            secs, peak, _ = _run([cli, "compress", "--method", "svd_llm", "--ratio", str(ratio), "--calib-samples",
                                  str(args.calib_samples), "--seq-len", str(args.seq_len), "--no-cache", "--out",
                                  str(out)])
            diff = _run([py, "-c", COMPARE, str(out)])[2].strip()
            rows.append((f"svd_llm {ratio} (rankwise compress)", _weights(out), _weights(out) / dense,
                         f"{secs:.0f} s / {peak / 2**30:.2f} GiB", diff, _digest(out)))
        lib = root / "lib"
        secs, peak, _ = _run([py, "-c", LIBRARY, str(ratios[-1]), str(args.calib_samples), str(args.seq_len),
                              str(lib)])
        rows.append((f"svd_llm {ratios[-1]} (compress_checkpoint)", _weights(lib), _weights(lib) / dense,
                     f"{secs:.0f} s / {peak / 2**30:.2f} GiB", "", _digest(lib)))
    print("| model | weights on disk | vs dense bf16 | compress time / peak RSS | max abs logit diff "
          "from_pretrained vs rankwise.load | sha256 of shards + config |")
    print("|---|---|---|---|---|---|")
    for name, size, rel, cost, diff, digest in rows:
        print(f"| {name} | {size / 1e6:,.1f} MB | {rel:.3f}x | {cost} | {diff} | {digest} |")


if __name__ == "__main__":
    main()
