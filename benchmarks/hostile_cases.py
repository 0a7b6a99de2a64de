"""The hostile-user cases of issue 22, replayed through the real CLI on a tiny Llama saved to disk.

    python benchmarks/hostile_cases.py [--work /tmp/rankwise-hostile]

Each case runs ``rankwise`` in a child process and prints its exit code, the first stderr line (or what the
result was) and the seconds it took, beside what the issue reported on main before. A case passes when it ends in
exactly one ``error:`` line with exit code 2, or in the correct result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

SMALL = ["--seq-len", "16", "--calib-samples", "4"]
TRAIN = ["--rank", "4", "--steps", "4", "--seq-len", "16", "--eval-samples", "4", "--batch-size", "2"]
TEXT = " ".join(f"word{i % 37} and {i % 11}" for i in range(3000))


def cli(*args: object, env: dict | None = None, timeout: float = 300) -> tuple[int, list[str], float]:
    code = "import sys; from rankwise.cli import main; sys.argv[0] = 'rankwise'; main()"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code, *[a if isinstance(a, bytes) else str(a) for a in args]],
                         capture_output=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    lines = [line for line in run.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return run.returncode, lines, time.perf_counter() - start


def save_tiny(path: Path, seed: int = 0) -> Path:
    tiny_model("llama", seed=seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def poke(file: Path, tensor: str, value: float) -> None:
    """Write ``value`` into the middle of ``tensor`` inside a safetensors file (same size, same header)."""
    raw = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8:8 + header_len])[tensor]["data_offsets"]
    at = 8 + header_len + start + ((end - start) // 8) * 4
    raw[at:at + 4] = struct.pack("<f", value)
    file.write_bytes(bytes(raw))


def outcome(rc: int, lines: list[str]) -> str:
    if rc == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return lines[0][:150]
    return f"exit {rc}: " + (" / ".join(lines[-2:])[:150] if lines else "(no stderr)")


def interrupted_adapt(model: Path, out: Path, text: Path, method: str) -> None:
    """An adapt run stopped after its first training state (via the library, killed at the first save)."""
    code = f"""
import importlib, sys
sys.path.insert(0, {str(ROOT)!r})
train = importlib.import_module("rankwise.adapt.train")
save = train._save
def die(*a, **k):
    save(*a, **k)
    raise SystemExit(0)
train._save = die
from rankwise.adapt.job import adapt_model
adapt_model({str(model)!r}, {method!r}, {str(out)!r}, config=train.TrainConfig(steps=4, batch_size=2, save_every=2),
            rank=4, text={str(text)!r}, seq_len=16, eval_samples=4, progress=False)
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/rankwise-hostile"))
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    text = work / "text.txt"
    text.write_text(TEXT)
    model = save_tiny(work / "model")
    rows = []

    def case(name: str, before: str, rc: int, lines: list[str], seconds: float, result: str | None = None) -> None:
        ok = result is not None or (rc == 2 and len(lines) == 1 and lines[0].startswith("error: "))
        rows.append((name, before, result or outcome(rc, lines), f"{seconds:.1f}", "yes" if ok else "NO"))

    # 1. stale statistics: an in-place edit keeping size, mtime and inode
    cache = {"RANKWISE_CALIBRATION_CACHE": str(work / "cache")}
    edited = work / "edited"
    shutil.copytree(model, edited)
    cli("compress", edited, "--allocation", "loss", "--out", work / "first", *SMALL, env=cache)
    weights = edited / "model.safetensors"
    stat = weights.stat()
    poke(weights, "model.layers.1.mlp.down_proj.weight", 0.5)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    start = time.perf_counter()
    cli("compress", edited, "--allocation", "loss", "--out", work / "cached", *SMALL, env=cache)
    seconds = time.perf_counter() - start
    cli("compress", edited, "--allocation", "loss", "--out", work / "fresh", "--no-cache", *SMALL)
    same = (work / "cached" / "model.safetensors").read_bytes() == (work / "fresh" / "model.safetensors").read_bytes()
    case("in-place edit, times kept, cache on", "stale hit: layers 20-29 = old model's", 0, [], seconds,
         "output identical to --no-cache" if same else "DIFFERS from --no-cache (stale)")

    # 2. resume onto other weights behind the same path
    swap = save_tiny(work / "swap")
    interrupted_adapt(swap, work / "ad", text, "lora")
    shutil.rmtree(swap)
    save_tiny(swap, seed=1)
    case("adapt --resume, model swapped at the same path", "resumed, exit 0, two models' losses",
         *cli("adapt", swap, "--method", "lora", "--text", text, *TRAIN, "--out", work / "ad", "--resume"))
    interrupted_adapt(model, work / "pi", text, "lora")
    case("adapt --resume with another method", "PiSSA's 136 s pre-pass, then refused",
         *cli("adapt", model, "--method", "pissa", "--text", text, *TRAIN, "--out", work / "pi", "--resume"))

    # 3. corrupted data
    cli("compress", model, "--out", work / "c", *SMALL)
    flipped = work / "c-flipped"
    shutil.copytree(work / "c", flipped)
    shard = flipped / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-12] ^= 0x01  # the lowest mantissa bit of one weight: still a valid, finite file
    shard.write_bytes(bytes(raw))
    case("one weight changed in a compressed directory (eval)", "loaded without notice",
         *cli("eval", flipped, "--seq-len", "16", "--eval-samples", "2"))
    case("the same, rankwise verify", "(no checksums, no verify command)", *cli("verify", flipped))
    nan = work / "nan"
    shutil.copytree(model, nan)
    poke(nan / "model.safetensors", "model.layers.1.input_layernorm.weight", float("nan"))
    case("NaN in an input shard (compress)", "130 s, then 'C contains NaN or Inf', no file or tensor",
         *cli("compress", nan, "--out", work / "nan-out", *SMALL))

    # 4. tracebacks and bounds
    case("non-UTF-8 --prompt", "TypeError traceback, exit 1",
         *cli("generate", model, "--prompt", b"ab\xffcd"))
    case("--max-new-tokens 100000000", "ran until killed",
         *cli("generate", model, "--prompt", "hello", "--max-new-tokens", "100000000"))
    case("compare --recipes svd_llm+loss+loss+seq+seq", "accepted, ran",
         *cli("compare", model, "--recipes", "svd_llm+loss+loss+seq+seq", "--out", work / "cmp", *SMALL))
    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken\ndataset_path: x\n  bad: : indent\n")
    case("task YAML with a syntax error", "'unknown task'",
         *cli("eval", model, "--tasks", "broken", "--task-dir", tasks, "--seq-len", "16", "--eval-samples", "2"))
    bad_info = work / "c-info"
    shutil.copytree(work / "c", bad_info)
    manifest = json.loads((bad_info / "rankwise.json").read_text())
    manifest["report"]["ratio"] = "0.2"
    (bad_info / "rankwise.json").write_text(json.dumps(manifest))
    case("info, report ratio a string", "Unknown format code 'g' for object of type 'str'", *cli("info", bad_info))

    small = work / "small-disk"  # a 64 KB tmpfs, where this process may mount one (root in a container)
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True
                      ).returncode == 0:
        try:
            rc, lines, seconds = cli("compress", model, "--out", small / "out", *SMALL)
            left = sorted(p.name for p in small.iterdir())
            case("full disk during compress (64 KB tmpfs)", "SafetensorError traceback, exit 1", rc, lines, seconds)
            rows[-1] = (*rows[-1][:2], rows[-1][2] + f" (left behind: {left or 'nothing'})", *rows[-1][3:])
        finally:
            subprocess.run(["umount", str(small)], check=False)

    print("| case | before (issue 22, on main) | after | s | one line / correct |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{sum(r[-1] == 'yes' for r in rows)} of {len(rows)} cases end in one error line or the correct result")


if __name__ == "__main__":
    main()
