"""Heal's distillation loss against ``torch.nn.functional.kl_div``, alone and inside a whole training step.

* the loss kernel: ``KL(p_teacher || softmax(z))`` and its gradient for ``--tokens`` x ``--vocab`` logits (the
  default model's one step: 4 windows of 256 tokens, a 49,152-token vocabulary), as ``kl_div`` under autograd, as
  the soft cross-entropy minus the teacher's entropy under autograd (heal's loss until 2026-12-03), and as heal's
  fused loss (:func:`rankwise.adapt.heal.distillation_loss`: loss and gradient together, a few rows at a time);
* with ``--student DIR`` (a compressed directory) and ``--teacher MODEL``: one whole heal step (teacher forward,
  student forward and backward) with each loss, after a warm-up step, best of ``--repeats``.

Same process, same inputs, so the ratios compare like with like; also checks that each agrees with ``kl_div``.

    .venv/bin/python benchmarks/distill_step.py
    .venv/bin/python benchmarks/distill_step.py --student best-0.2 --teacher smollm2
    .venv/bin/python benchmarks/distill_step.py --glibc-default   # as a Python caller of heal_ or macOS runs it
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from rankwise._memory import reuse_freed_memory
from rankwise.adapt.heal import _FusedDistillation, distillation_loss


def torch_kl(z: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    return nn.functional.kl_div(torch.log_softmax(z, -1), log_p, log_target=True, reduction="batchmean")


def soft_ce(z: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Heal's earlier formulation: ``-Σ p log q`` minus the teacher's entropy (a constant for the student)."""
    with torch.no_grad():
        p = log_p.exp()
        entropy = -(p * log_p).sum(-1)
    return (-(p * torch.log_softmax(z, -1)).sum(-1) - entropy).mean()


def unfused_distillation_loss(teacher: nn.Module) -> Callable[..., torch.Tensor]:
    """Heal's loss until 2026-12-03 (``distill=1``, ``T=1``, no mask) under autograd, for a whole step: the logits
    sliced to the scored positions, the teacher's probabilities and the student's log-probabilities kept."""

    def loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1]
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].reshape(-1, logits.shape[-1]), -1)
        return soft_ce(logits.reshape(-1, logits.shape[-1]), log_p)

    return loss


def fused(z: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Heal's fused loss on the same rows, every row weighted ``1 / rows`` (log-probabilities are valid logits)."""
    rows = z.shape[0]
    weights = torch.full((rows,), 1 / rows)
    return _FusedDistillation.apply(z, log_p, torch.zeros(rows, dtype=torch.long), weights, 1.0, 1.0, True)


# each takes the student's logits and the teacher's log-probabilities
KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "torch kl_div (autograd)": torch_kl, "soft cross-entropy - entropy (autograd, heal until 2026-12-03)": soft_ce,
    "rankwise heal (fused, loss and gradient together)": fused}


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def kernel_table(tokens: int, vocab: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(tokens, vocab, generator=gen) * 3
    t = torch.log_softmax(torch.randn(tokens, vocab, generator=gen) * 3, -1)
    ref_z = z0.clone().requires_grad_()
    torch_kl(ref_z, t).backward()
    anchor = None
    print(f"| loss and gradient, {tokens} x {vocab} | ms | / kl_div | max grad. difference |")
    print("|---|---|---|---|")
    for name, kernel in KERNELS.items():
        def step(kernel=kernel) -> torch.Tensor:
            z = z0.clone().requires_grad_()
            kernel(z, t).backward()
            return z.grad

        seconds = best_seconds(step, repeats)
        anchor = anchor or seconds
        diff = float((step() - ref_z.grad).abs().max())
        print(f"| {name} | {seconds * 1e3:.0f} | {seconds / anchor:.2f}x | {diff:.1e} |")


def step_table(student_dir: str, teacher_name: str, repeats: int, batch: int, seq_len: int) -> None:
    from rankwise.adapt.heal import mark_trainable
    from rankwise.io.models import load_model

    student = load_model(student_dir).model.float()
    teacher = load_model(teacher_name).model.float().eval().requires_grad_(False)
    mark_trainable(student, "factors")
    student.train()
    ids = torch.randint(0, student.get_output_embeddings().weight.shape[0], (batch, seq_len),
                        generator=torch.Generator().manual_seed(0))

    def with_kl_div(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        logits = model(input_ids=ids).logits[:, :-1]
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].reshape(-1, logits.shape[-1]), -1)
        return torch_kl(logits.reshape(-1, logits.shape[-1]), log_p)

    print(f"\n| whole heal step ({batch} x {seq_len} tokens, forward + backward) | s | / kl_div |")
    print("|---|---|---|")
    anchor = None
    for name, loss_fn in (("torch kl_div (autograd)", with_kl_div),
                          ("soft cross-entropy - entropy (autograd, heal until 2026-12-03)",
                           unfused_distillation_loss(teacher)),
                          ("rankwise heal (fused)", distillation_loss(teacher, 1.0, 1.0))):
        def step(loss_fn=loss_fn) -> None:
            student.zero_grad(set_to_none=True)
            loss_fn(student, ids, None).backward()

        seconds = best_seconds(step, repeats)
        anchor = anchor or seconds
        print(f"| {name} | {seconds:.2f} | {seconds / anchor:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1020)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--student", help="a compressed directory: also time whole heal steps")
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--glibc-default", action="store_true",
                        help="keep glibc's default allocator settings (as a Python caller of rankwise.adapt.heal_ "
                             "has, or any platform but glibc) instead of rankwise heal's")
    args = parser.parse_args()
    kept = not args.glibc_default and reuse_freed_memory()  # as rankwise heal runs: freed memory stays in the heap
    print(f"heap kept (rankwise heal's allocator setting): {kept}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    kernel_table(args.tokens, args.vocab, args.repeats)
    if args.student:
        step_table(args.student, args.teacher, max(1, args.repeats // 2), args.batch, args.seq_len)


if __name__ == "__main__":
    main()
