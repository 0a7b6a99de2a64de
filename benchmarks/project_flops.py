"""A projection on paper of ``rankwise compress --method svd_llm`` for Llama-3-8B / 70B on this CPU and on one H100,
from a FLOP count per decoder block calibrated against a measured run (``benchmarks/scale.py``'s JSON report).

Nothing here is measured on a GPU: the H100 rows assume a sustained rate (``--gpu-tflops``, default 25, about 40 %
of an H100 SXM's 67 TFLOP/s float64/float32 tensor-core peak) and a disk read rate for streaming the bf16 weights
(``--disk-gbps``, default 2). The CPU rate is the measured one: the basis run's FLOPs per block / its seconds per
block.

    .venv/bin/python benchmarks/project_flops.py --report /tmp/rankwise-scale/report-3b.json --basis 3b
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from make_synthetic_llama import PRESETS, LlamaShape
from scale import TARGETS

TOKENS = 16 * 256


def block_flops(shape: LlamaShape, tokens: int = TOKENS) -> dict[str, float]:
    """FLOPs of one block's compression with ``svd_llm``, by phase (dense matmul counts, no triangular savings)."""
    head = shape.hidden // shape.heads
    q, kv = shape.heads * head, shape.kv_heads * head
    mats = [(q, shape.hidden), (kv, shape.hidden), (kv, shape.hidden), (shape.hidden, q),
            (shape.intermediate, shape.hidden), (shape.intermediate, shape.hidden), (shape.hidden, shape.intermediate)]
    inputs = [shape.hidden, q, shape.hidden, shape.intermediate]  # q/k/v share one input, gate/up share one
    forward = 2 * tokens * sum(m * n for m, n in mats)
    covariance = sum(2 * tokens * n * n for n in inputs)
    cholesky = sum(n**3 / 3 for n in inputs)
    whitened = sum(2 * m * n * n for m, n in mats)  # W S
    svd = sum(2 * m * n * min(m, n) + 9 * min(m, n) ** 3 for m, n in mats)  # Gram matrix + its eigendecomposition
    errors = sum(4 * m * n * n for m, n in mats)  # the report's ||(W - W')X|| and ||W X|| from the covariance
    return {"forward": forward, "covariance": covariance, "cholesky": cholesky, "W S": whitened, "svd": svd,
            "error": errors}


def block_bytes(shape: LlamaShape) -> float:
    """bf16 bytes of one block's weights (read from disk once)."""
    head = shape.hidden // shape.heads
    q, kv = shape.heads * head, shape.kv_heads * head
    return 2 * (shape.hidden * (2 * q + 2 * kv) + 3 * shape.hidden * shape.intermediate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, required=True, help="the basis run's --json-report")
    parser.add_argument("--basis", default="3b", choices=sorted(PRESETS))
    parser.add_argument("--gpu-tflops", type=float, default=25.0)
    parser.add_argument("--disk-gbps", type=float, default=2.0)
    args = parser.parse_args()
    blocks = json.loads(args.report.read_text())["block_seconds"]
    per_block = sorted(blocks)[len(blocks) // 2]  # median: robust to a block slowed by other work on the machine
    basis = PRESETS[args.basis]
    cpu_rate = sum(block_flops(basis).values()) / per_block
    print(f"# basis {args.basis}: median {per_block:.1f} s per block over {len(blocks)} blocks -> "
          f"{cpu_rate / 1e9:.0f} GFLOP/s effective on this CPU; H100 assumed {args.gpu_tflops:.0f} TFLOP/s sustained, "
          f"weights streamed at {args.disk_gbps:.0f} GB/s; {TOKENS} calibration tokens")
    print("| model | blocks | TFLOP / block | CPU s / block | CPU total | H100 s / block (compute + read) "
          "| H100 total |")
    print("|---|---|---|---|---|---|---|")
    rows = [(args.basis + " (basis)", basis)] + [(name, shape) for name, (shape, _) in TARGETS.items()]
    for name, shape in rows:
        flops = sum(block_flops(shape).values())
        cpu = flops / cpu_rate
        gpu = flops / (args.gpu_tflops * 1e12) + block_bytes(shape) / (args.disk_gbps * 1e9)
        print(f"| {name} | {shape.layers} | {flops / 1e12:.2f} | {cpu:.0f} | {cpu * shape.layers / 3600:.1f} h "
              f"| {gpu:.2f} | {gpu * shape.layers / 60:.1f} min |")


if __name__ == "__main__":
    main()
