"""Heal steps with glibc's default allocator settings against rankwise's for training (``reuse_freed_memory``),
with heal's fused distillation loss and with the unfused autograd loss it replaced (``--losses``).

Each setting is process-wide, so each (setting, loss) runs in a child process of its own: load the compressed student
and the dense teacher, then ``--steps`` whole heal steps (teacher forward, student forward and backward, AdamW step)
of 4 x 256 tokens after one warm-up step. The table gives each child's median step, the ratio to glibc's default
with the first loss, and the child's peak RSS (``wait4``'s ``ru_maxrss``). ``rankwise heal`` and ``rankwise adapt``
apply the second setting; ``rankwise heal`` uses the fused loss.

    .venv/bin/python benchmarks/heal_allocator.py --student best-0.4 --teacher smollm2
    .venv/bin/python benchmarks/heal_allocator.py --student best-0.4 --losses fused   # the allocator alone
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, statistics, sys, time, torch
from rankwise._memory import reuse_freed_memory
from rankwise.adapt.heal import distillation_loss, mark_trainable
from rankwise.io.models import load_model
student_dir, teacher_name, steps, mode, which = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
sys.path.insert(0, sys.argv[6])
from distill_step import unfused_distillation_loss
applied = reuse_freed_memory() if mode == "reuse" else None
student = load_model(student_dir).model.float().train()
teacher = load_model(teacher_name).model.float().eval().requires_grad_(False)
mark_trainable(student, "factors")
params = [p for p in student.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-9)  # a real step's work; the weights barely move
loss_fn = distillation_loss(teacher, 1.0, 1.0) if which == "fused" else unfused_distillation_loss(teacher)
vocab = student.get_output_embeddings().weight.shape[0]
times = []
for i in range(steps + 1):
    ids = torch.randint(0, vocab, (4, 256), generator=torch.Generator().manual_seed(i))
    start = time.perf_counter()
    loss_fn(student, ids, None).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - start)
print(json.dumps({"applied": applied, "median": statistics.median(times[1:]), "steps": times}))
"""

MODES = {"default": "glibc's default (dynamic mmap threshold)", "reuse": "rankwise heal / adapt (heap kept)"}
LOSSES = {"fused": "fused (heal's)", "autograd": "unfused autograd (heal's until 2026-12-03)"}


def run_child(args: argparse.Namespace, mode: str, loss: str) -> tuple[dict, float]:
    """The child's JSON line and its peak RSS in GB (``ru_maxrss`` in KB / 1e6, as RESULTS.md reports sizes)."""
    here = os.path.dirname(os.path.abspath(__file__))
    with subprocess.Popen([sys.executable, "-c", CHILD, args.student, args.teacher, str(args.steps), mode, loss, here],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        out, err = proc.stdout.read(), proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for wait4's usage of this child alone
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} / {loss} child failed (exit {proc.returncode}):\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="a compressed directory (rankwise compress)")
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per child, after one warm-up step")
    parser.add_argument("--losses", default="autograd,fused", help=f"comma-separated, of {', '.join(LOSSES)}")
    args = parser.parse_args()
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    if not losses or any(name not in LOSSES for name in losses):
        raise SystemExit(f"--losses takes a comma-separated list of {', '.join(LOSSES)}, got {args.losses!r}")
    first = run_child(args, "reuse", losses[0])
    if not first[0]["applied"]:
        raise SystemExit("reuse_freed_memory() did not apply here (it needs glibc's malloc): nothing to compare")
    rows = {(mode, loss): first if (mode, loss) == ("reuse", losses[0]) else run_child(args, mode, loss)
            for loss in losses for mode in MODES}
    anchor = rows[("default", losses[0])][0]["median"]
    print(f"| allocator settings | loss | median step (s) | / default, {losses[0]} | steps (s) | peak RSS (GB) |")
    print("|---|---|---|---|---|---|")
    for (mode, loss), (result, rss) in rows.items():
        steps = " ".join(f"{t:.1f}" for t in result["steps"])
        print(f"| {MODES[mode]} | {LOSSES[loss]} | {result['median']:.2f} | {result['median'] / anchor:.2f}x | {steps} "
              f"| {rss:.2f} |")


if __name__ == "__main__":
    main()
