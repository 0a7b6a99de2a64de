"""Peak memory and time of ``rankwise compress`` on models of growing size, with a projection to Llama-3 8B / 70B.

Usage:
    python benchmarks/scale.py [--sizes 135m,1b,3b] [--work-dir /tmp/rankwise-scale] [--out-md scale.md]
        [--plot scale.png] [--extra-args "--allocation loss --sequential"]

Each compression is one subprocess of the CLI; its peak RSS is that child's own ``ru_maxrss`` from ``os.wait4``, so
earlier (larger) runs never leak into later rows. ``135m`` is the default model (SmolLM2-135M, float32, 32
calibration windows); ``1b`` / ``3b`` are random Llama-3.2-shaped checkpoints (bfloat16, 16 windows) written by
``make_synthetic_llama.py`` under ``--work-dir`` when missing. Windows are 256 tokens. Per-block seconds come from
the CLI's ``--json-report`` (``block_seconds``); a missing key is recorded as ``None``. A single value in
``--extra-args`` that starts with ``--`` needs the ``=`` form: ``--extra-args=--sequential``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from make_synthetic_llama import PRESETS, LlamaShape

SEQ_LEN = 256
GB = 1e9
SMOLLM2 = LlamaShape(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152)
TARGETS = {  # projection targets: (shape, tied embeddings)
    "Llama-3-8B": (LlamaShape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8), False),
    "Llama-3-70B": (LlamaShape(hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8), False),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
RESULT_HEADER = ("| model | parameters | dtype | weights GB | peak RSS GB | RSS / weights | wall s | report s "
                 "| s / block | exit |\n|---|---|---|---|---|---|---|---|---|---|")


@dataclass(frozen=True)
class ModelSize:
    """One row of the benchmark.

    Attributes:
        key: the ``--sizes`` name.
        shape: the model's dimensions (for parameter counts and per-block work).
        dtype: ``--dtype`` passed to the CLI.
        calib_samples: ``--calib-samples`` passed to the CLI.
        preset: ``make_synthetic_llama.py`` preset, or ``None`` for the default model.
    """

    key: str
    shape: LlamaShape
    dtype: str
    calib_samples: int
    preset: str | None


SIZES = {
    "135m": ModelSize("135m", SMOLLM2, "float32", 32, None),
    "1b": ModelSize("1b", PRESETS["1b"], "bfloat16", 16, "1b"),
    "3b": ModelSize("3b", PRESETS["3b"], "bfloat16", 16, "3b"),
}


@dataclass(frozen=True)
class Measurement:
    """What one compression subprocess cost."""

    size: ModelSize
    command: str
    weight_bytes: int
    returncode: int
    peak_rss_bytes: int
    wall_seconds: float
    report_seconds: float | None
    block_seconds: list[float] | None

    @property
    def parameters(self) -> int:
        return parameters(self.size.shape, tied=True)

    @property
    def seconds_per_block(self) -> float | None:
        return sum(self.block_seconds) / len(self.block_seconds) if self.block_seconds else None

    @property
    def tokens(self) -> int:
        return self.size.calib_samples * SEQ_LEN


def block_linear_params(shape: LlamaShape) -> int:
    """Weights of one decoder block's seven linear layers."""
    attn = shape.heads * (shape.hidden // shape.heads)  # (heads * head_dim), the q / o width
    kv = shape.kv_heads * (shape.hidden // shape.heads)
    return shape.hidden * (2 * attn + 2 * kv) + 3 * shape.hidden * shape.intermediate


def block_factor_work(shape: LlamaShape) -> int:
    """Sum of ``d_in^3`` over a block's distinct inputs: q/k/v share one, gate/up share one; o and down."""
    attn = shape.heads * (shape.hidden // shape.heads)
    return 2 * shape.hidden**3 + attn**3 + shape.intermediate**3


def parameters(shape: LlamaShape, tied: bool) -> int:
    """All parameters of a ``LlamaForCausalLM`` with these dimensions."""
    embeddings = shape.vocab * shape.hidden * (1 if tied else 2)
    return embeddings + shape.layers * (block_linear_params(shape) + 2 * shape.hidden) + shape.hidden


def ensure_model(size: ModelSize, work_dir: Path) -> str:
    """The CLI's MODEL argument for ``size``; a synthetic checkpoint is generated once if missing."""
    if size.preset is None:
        return "smollm2"
    path = work_dir / f"llama-{size.preset}"
    if not (path / "config.json").is_file():
        script = Path(__file__).with_name("make_synthetic_llama.py")
        cmd = [sys.executable, str(script), "--preset", size.preset, "--out", str(path), "--overwrite"]
        print(f"# generating {path}: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    return str(path)


def weight_bytes(model: str, size: ModelSize) -> int:
    """Safetensors bytes of a checkpoint directory; for the default model, parameters x bytes of its dtype."""
    path = Path(model)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return parameters(size.shape, tied=True) * DTYPE_BYTES[size.dtype]


def compress_command(rankwise: str, model: str, size: ModelSize, work_dir: Path, extra: str) -> list[str]:
    """The measured CLI call."""
    return [
        rankwise, "compress", model, "--method", "svd_llm", "--ratio", "0.2",
        "--calib-samples", str(size.calib_samples), "--seq-len", str(SEQ_LEN),
        "--out", str(work_dir / f"out-{size.key}"), "--overwrite", "--dtype", size.dtype,
        "--json-report", str(report_path(work_dir, size)), *shlex.split(extra),
    ]  # fmt: skip


def report_path(work_dir: Path, size: ModelSize) -> Path:
    return work_dir / f"report-{size.key}.json"


def run_child(cmd: list[str], log: Path) -> tuple[int, int, float]:
    """Run ``cmd`` with output to ``log``; return (exit code, the child's peak RSS in bytes, wall seconds)."""
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage only
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; stops Popen from waiting again
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return proc.returncode, usage.ru_maxrss * rss_unit, time.perf_counter() - start


def read_report(path: Path) -> tuple[float | None, list[float] | None]:
    """``(seconds, block_seconds)`` from the CLI's JSON report; ``None`` for what is missing or empty."""
    if not path.is_file():
        return None, None
    report = json.loads(path.read_text())
    return report.get("seconds"), report.get("block_seconds") or None


def measure(size: ModelSize, args: argparse.Namespace) -> Measurement:
    """Generate the model if needed, run one compression subprocess and collect its costs."""
    model = ensure_model(size, args.work_dir)
    cmd = compress_command(args.rankwise, model, size, args.work_dir, args.extra_args)
    log = args.work_dir / f"log-{size.key}.txt"
    report_path(args.work_dir, size).unlink(missing_ok=True)  # never read a previous run's report
    print(f"# {size.key}: {shlex.join(cmd)}\n#   log: {log}", flush=True)
    code, rss, wall = run_child(cmd, log)
    if code != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        print(f"#   FAILED (exit {code}); last lines of the log:\n" + "\n".join(f"#   | {t}" for t in tail))
    seconds, blocks = read_report(report_path(args.work_dir, size))
    return Measurement(size, shlex.join(cmd), weight_bytes(model, size), code, rss, wall, seconds, blocks)


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def fmt_params(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def result_row(m: Measurement) -> str:
    rss = m.peak_rss_bytes / GB
    return (f"| {m.size.key} | {fmt_params(m.parameters)} | {m.size.dtype} | {m.weight_bytes / GB:.2f} | {rss:.2f} "
            f"| {rss * GB / m.weight_bytes:.2f} | {m.wall_seconds:.1f} | {fmt(m.report_seconds, '.1f')} "
            f"| {fmt(m.seconds_per_block, '.2f')} | {m.returncode} |")


def projection_basis(measurements: list[Measurement]) -> Measurement | None:
    """The 3b run if it succeeded with block times, else the largest such run."""
    usable = [m for m in measurements if m.returncode == 0 and m.seconds_per_block is not None]
    return max(usable, key=lambda m: m.parameters, default=None)


def projection(basis: Measurement, per_block: float) -> str:
    """Markdown: minutes for each target, scaling the basis's ``per_block`` seconds by per-block work."""
    b_mat = 2 * basis.tokens * block_linear_params(basis.size.shape)
    b_fac = block_factor_work(basis.size.shape)
    rss_ratio = basis.peak_rss_bytes / basis.weight_bytes
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    lines = [
        "| model | parameters | blocks | matmul x | factorisation x | est. minutes (range) | weights GB | "
        "RSS GB if ratio holds |", "|---|---|---|---|---|---|---|---|",
    ]
    for name, (shape, tied) in TARGETS.items():
        mat = 2 * basis.tokens * block_linear_params(shape) / b_mat
        fac = block_factor_work(shape) / b_fac
        central = (mat * b_mat + fac * b_fac) / (b_mat + b_fac)
        minutes = [per_block * shape.layers * x / 60 for x in (central, min(mat, fac), max(mat, fac))]
        weights = parameters(shape, tied) * DTYPE_BYTES[basis.size.dtype] / GB
        lines.append(f"| {name} | {fmt_params(parameters(shape, tied))} | {shape.layers} | {mat:.2f} | {fac:.2f} "
                     f"| {minutes[0]:.0f} ({minutes[1]:.0f}-{minutes[2]:.0f}) | {weights:.1f} "
                     f"| {weights * rss_ratio:.1f} |")
    lines += ["", *projection_assumptions(basis, per_block, b_mat, b_fac, ram)]
    return "\n".join(lines)


def projection_assumptions(basis: Measurement, per_block: float, b_mat: int, b_fac: int, ram_gb: float
                           ) -> list[str]:
    return [
        f"Assumptions: basis is the {basis.size.key} run ({per_block:.2f} s per block, mean of "
        f"{len(basis.block_seconds or [])} blocks), {basis.size.dtype}, {torch.get_num_threads()} threads on this "
        f"CPU, the same CLI arguments (above) and {basis.tokens} calibration tokens "
        f"({basis.size.calib_samples} x {SEQ_LEN}).",
        "A block's time = matmul work (2 x tokens x the block's linear parameters: calibration forward passes) + "
        "factorisation work (sum of d_in^3 over the block's distinct inputs: q/k/v share one, gate/up share one, "
        "o and down have their own; stands for Cholesky/eigh and the truncated SVDs).",
        f"'x' columns: each work's ratio to the basis block. The estimate assumes both run at the same FLOP rate "
        f"(basis split {b_mat / (b_mat + b_fac):.0%} matmul / {b_fac / (b_mat + b_fac):.0%} factorisation); the "
        "range assumes all of the basis time is one kind or the other.",
        "Excluded: loading, embeddings / lm_head, saving, attention scores (seq^2), and any slow-down from memory "
        "pressure or swapping.",
        f"'RSS GB if ratio holds' = weights x the basis's peak RSS / weights "
        f"({basis.peak_rss_bytes / basis.weight_bytes:.2f}); this machine has {ram_gb:.0f} GB of RAM.",
    ]


def plot(measurements: list[Measurement], path: Path) -> None:
    """PNG: peak RSS and the weight size (GB) against parameters (billions, log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [m.parameters / 1e9 for m in measurements]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [m.peak_rss_bytes / GB for m in measurements], "o-", label="peak RSS of the compress subprocess")
    ax.plot(xs, [m.weight_bytes / GB for m in measurements], "s--", label="dense weights (run dtype)")
    for x, m in zip(xs, measurements, strict=True):
        ax.annotate(f"{m.size.key} {m.size.dtype}", (x, m.peak_rss_bytes / GB), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:.2g}" for x in xs])  # label the measured sizes only (no crowded minor ticks)
    ax.minorticks_off()
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("GB")
    ax.set_title("rankwise compress svd_llm, ratio 0.2")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,1b,3b", help=f"comma list of {', '.join(SIZES)}")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rankwise-scale"),
                        help="synthetic checkpoints, compressed outputs, reports and logs")
    parser.add_argument("--out-md", type=Path, default=None, help="also write the Markdown tables here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of peak RSS vs parameters")
    parser.add_argument("--extra-args", default="", help="appended to every compress command (shell-split)")
    parser.add_argument("--rankwise", default=str(Path(sys.executable).with_name("rankwise")),
                        help="the rankwise executable (default: beside this Python)")
    args = parser.parse_args()
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; valid names are {', '.join(SIZES)}")
    args.sizes = [SIZES[s] for s in args.sizes.split(",")]
    return args


def main() -> None:
    args = parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"work dir {args.work_dir}", flush=True)
    measurements = []
    for size in args.sizes:
        measurements.append(measure(size, args))
        if len(measurements) == 1:
            print(RESULT_HEADER)
        print(result_row(measurements[-1]), flush=True)
    basis = projection_basis(measurements)
    projected = "No successful run reported block_seconds; no projection."
    if basis is not None and basis.seconds_per_block is not None:
        projected = projection(basis, basis.seconds_per_block)
    commands = [f"- {m.size.key}: `{m.command}`" for m in measurements]
    text = "\n".join([RESULT_HEADER, *map(result_row, measurements), "", "Commands:", *commands, "",
                      "## Projection", "", projected])
    print(f"\n{text}")
    if args.out_md:
        args.out_md.write_text(text + "\n")
    succeeded = [m for m in measurements if m.returncode == 0]
    if args.plot and succeeded:
        plot(succeeded, args.plot)
        print(f"plot: {args.plot}")
    elif args.plot:
        print("no successful run; no plot")


if __name__ == "__main__":
    main()
