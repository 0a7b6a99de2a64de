"""Measured matmul latency per shape and rank: the rank below which a factor pair is faster than the dense matrix.

A factor pair ``x -> up(down(x))`` of rank ``r`` stores fewer values than the dense ``m x n`` matrix below
``m n / (m + n)``, but it runs two matmuls instead of one: at decode (one token per step) each costs a call and a
pass over its weights, so a pair can be smaller and still slower. :func:`rank_limits` times, on the device and dtype
the model runs in, one token through the dense matrix and through pairs at a grid of ranks, with the weights
cycled through more copies than the last-level cache holds (in a model, the next layer's weights have evicted this
one's), and returns per shape the rank where the pair stops being faster. Compression with ``objective="speed"``
keeps a matrix dense rather than factorise it at or above that rank, and spends its budget elsewhere
(:func:`rankwise.allocate.budget.threshold_ranks`, :func:`rankwise.methods.base.choose_knobs`).

Timings are cached per machine (processor or GPU name, threads, torch version, dtype, tokens) in
``$RANKWISE_LATENCY_CACHE`` (default ``~/.cache/rankwise/latency``): measured once, read afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from rankwise.linalg import break_even_rank

COLD_BYTES = 64 * 2**20  # weights cycled per timing: more than a last-level cache holds
GRID = 12  # ranks timed per shape, evenly spaced up to the parameter break-even rank


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux: the platform's own name
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def cache_file(device: torch.device, dtype: torch.dtype, tokens: int) -> Path:
    """Where this machine's timings for ``dtype`` and ``tokens`` are kept."""
    from rankwise.io.models import cache_root

    key = json.dumps([_machine(device), device.type, torch.get_num_threads(), torch.__version__, str(dtype), tokens])
    root = Path(os.environ.get("RANKWISE_LATENCY_CACHE") or cache_root() / "latency").expanduser()
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _time(x: torch.Tensor, copies: list[list[torch.Tensor]], rounds: int = 5) -> float:
    """Microseconds per pass of ``x`` through one copy's chain of matrices (``F.linear`` each), cycling through
    the distinct ``copies``; the fastest of ``rounds``."""

    def once() -> None:
        for chain in copies:
            h = x
            for w in chain:
                h = F.linear(h, w)

    once()
    best = float("inf")
    for _ in range(rounds):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        once()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        best = min(best, (time.perf_counter() - start) / len(copies))
    return best * 1e6


@torch.no_grad()
def time_shape(m: int, n: int, *, device: torch.device, dtype: torch.dtype, tokens: int = 1, seed: int = 0
               ) -> dict:
    """Dense and factored timings of one ``m x n`` (out x in) matrix: ``{"dense_us", "ranks", "lowrank_us",
    "limit"}``, ``limit`` the (interpolated) rank from which the pair is no faster than dense."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen).to(device, dtype)
    size = torch.finfo(dtype).bits // 8
    copies = max(2, -(-COLD_BYTES // (m * n * size)))
    dense_us = _time(x, [[torch.randn(m, n, generator=gen).to(device, dtype)] for _ in range(copies)])
    top = max(1, break_even_rank(m, n))
    ranks = sorted({max(1, round(top * (i + 1) / GRID)) for i in range(GRID)})
    lowrank_us = []
    for r in ranks:
        pairs = max(2, -(-COLD_BYTES // (r * (m + n) * size)))
        lowrank_us.append(_time(x, [[torch.randn(r, n, generator=gen).to(device, dtype),  # down (r, in)
                                     torch.randn(m, r, generator=gen).to(device, dtype)]  # up (out, r)
                                    for _ in range(pairs)]))
    return {"dense_us": dense_us, "ranks": ranks, "lowrank_us": lowrank_us,
            "limit": crossing(ranks, lowrank_us, dense_us, top)}


def crossing(ranks: list[int], lowrank_us: list[float], dense_us: float, top: int) -> int:
    """The rank from which the pair is no faster than dense: ``0`` when even the smallest rank timed is not
    faster, ``top`` (the parameter break-even rank) when every rank timed is; else linearly interpolated between
    the last rank that is faster and the next."""
    faster = [t < dense_us for t in lowrank_us]
    if not faster[0]:
        return 0
    if all(faster):
        return top
    k = faster.index(False)  # first grid rank that is not faster
    r0, r1, t0, t1 = ranks[k - 1], ranks[k], lowrank_us[k - 1], lowrank_us[k]
    return max(r0 + 1, min(r1, r0 + math.ceil((dense_us - t0) / max(t1 - t0, 1e-12) * (r1 - r0))))


def rank_limits(shapes: Mapping[str, tuple[int, int]], *, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32, tokens: int = 1, cache: bool = True) -> dict[str, int]:
    """Per matrix name, the rank from which a factor pair is no faster than the dense matrix on this machine (ranks
    strictly below it are faster; ``0``: none is). Each distinct shape is timed once, and with ``cache`` the timings
    are read from and added to this machine's cache file."""
    device = torch.device(device)
    path = cache_file(device, dtype, tokens)
    table: dict[str, dict] = {}
    if cache and path.is_file():
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}  # unreadable: measured again and rewritten
    missing = sorted({f"{m}x{n}" for m, n in shapes.values()} - set(table))
    for key in missing:
        m, n = map(int, key.split("x"))
        table[key] = time_shape(m, n, device=device, dtype=dtype, tokens=tokens)
    if cache and missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1)
        os.replace(tmp, path)
    return {name: int(table[f"{m}x{n}"]["limit"]) for name, (m, n) in shapes.items()}
