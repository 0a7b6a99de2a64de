"""Tucker decomposition (HOSVD and HOOI) on tensorly's PyTorch backend.

``T ~= core x_1 U_1 x_2 U_2 ... x_N U_N`` with orthonormal ``(I_n, r_n)`` factors ``U_n`` and an
``(r_1, ..., r_N)`` core:

* ``"hosvd"``: the truncated higher-order SVD of De Lathauwer, De Moor and Vandewalle (2000),
  https://doi.org/10.1137/S0895479896305696: ``U_n`` = leading left singular vectors of the mode-``n`` unfolding,
  ``core = T x_n U_n^T``. Its error obeys ``||T - T'||^2 <= sum_n sum_{i > r_n} sigma_i(T_(n))^2``.
* ``"hooi"``: higher-order orthogonal iteration (De Lathauwer, De Moor and Vandewalle 2000,
  https://doi.org/10.1137/S0895479898346995), started from the HOSVD: each mode's factor is re-fitted to the tensor
  projected on the other modes' factors. Each update can only grow ``||core||``, so its error never exceeds HOSVD's.

The work is done by :func:`tensorly.decomposition.tucker` inside ``tensorly.backend_context("pytorch")`` (thread
local; the global backend is never changed). Computes in float32/float64 and returns the input dtype.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rankwise.linalg._checks import FLOAT_DTYPES, all_finite, check_positive_int, compute_dtype, make_generator

METHODS = ("hooi", "hosvd")

TuckerRanks = int | float | Sequence[int | None]


@dataclass(frozen=True)
class TuckerFactors:
    """A Tucker decomposition ``core x_1 factors[0] ... x_N factors[N-1]``.

    Attributes:
        core: ``(r_1, ..., r_N)`` core tensor.
        factors: ``N`` matrices, the ``n``-th of shape ``(I_n, r_n)`` with orthonormal columns.
        info: what the routine did (method, iterations, relative error history); for reports, never for logic.
    """

    core: torch.Tensor
    factors: tuple[torch.Tensor, ...]
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.factors) != self.core.ndim or any(
                f.ndim != 2 or f.shape[1] != r for f, r in zip(self.factors, self.core.shape, strict=False)):
            raise ValueError(f"TuckerFactors needs one (I_n, r_n) factor per core mode; got core "
                             f"{tuple(self.core.shape)} and factors {[tuple(f.shape) for f in self.factors]}")

    @property
    def ranks(self) -> tuple[int, ...]:
        """Multilinear rank ``(r_1, ..., r_N)``."""
        return tuple(self.core.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape ``(I_1, ..., I_N)`` of the approximated tensor."""
        return tuple(f.shape[0] for f in self.factors)

    @property
    def num_params(self) -> int:
        """Stored numbers: ``prod(r_n) + sum(I_n r_n)``."""
        return self.core.numel() + sum(f.numel() for f in self.factors)

    @property
    def dtype(self) -> torch.dtype:
        return self.core.dtype

    def to_dense(self) -> torch.Tensor:
        """The full ``(I_1, ..., I_N)`` tensor in the factors' dtype."""
        out = self.core
        for mode, factor in enumerate(self.factors):
            out = torch.movedim(torch.tensordot(factor, out, dims=([1], [mode])), 0, mode)  # mode n: r_n -> I_n
        return out


def validate_ranks(shape: Sequence[int], ranks: TuckerRanks) -> tuple[int, ...]:
    """Turn a Tucker rank specification into one rank per mode (tensorly's ``validate_tucker_rank`` vocabulary).

    Args:
        shape: the tensor's shape ``(I_1, ..., I_N)``.
        ranks: a sequence with one ``int`` per mode (``None`` keeps that mode whole); one ``int`` for every mode; or a
            float in ``(0, 1]``, the fraction of the tensor's parameters kept, spread as ``r_n ~= c I_n`` (tensorly's
            rule, rounded down, at least 1).

    Returns:
        One rank per mode, each in ``[1, I_n]``.

    Raises:
        ValueError: a rank outside ``[1, I_n]`` (naming the mode and its size), a sequence of the wrong length, or a
            fraction outside ``(0, 1]``.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(ranks, bool):
        raise ValueError(f"ranks must be an int, a float in (0, 1] or one int per mode, got {ranks!r}")
    if isinstance(ranks, numbers.Integral):
        ranks = [int(ranks)] * len(shape)
    elif isinstance(ranks, numbers.Real):
        if not 0.0 < float(ranks) <= 1.0:
            raise ValueError(f"ranks as a float is the fraction of parameters kept, in (0, 1]; got {ranks!r}")
        from tensorly.tucker_tensor import validate_tucker_rank

        ranks = [min(int(r), s) for r, s in zip(validate_tucker_rank(shape, float(ranks), rounding="floor"), shape,
                                                strict=True)]
    elif isinstance(ranks, Sequence) and not isinstance(ranks, str):
        if len(ranks) != len(shape):
            raise ValueError(f"ranks must give one rank per mode ({len(shape)} for shape {shape}), got {len(ranks)}")
        ranks = [s if r is None else r for r, s in zip(ranks, shape, strict=True)]
    else:
        raise ValueError(f"ranks must be an int, a float in (0, 1] or one int per mode, got {ranks!r}")
    for mode, (r, size) in enumerate(zip(ranks, shape, strict=True)):
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 1 <= int(r) <= size:
            raise ValueError(f"ranks[{mode}]={r!r} must be an integer in [1, {size}] (mode {mode} has size {size})")
    return tuple(int(r) for r in ranks)


def _check_tensor(T: object) -> torch.Tensor:
    if not isinstance(T, torch.Tensor) or T.ndim < 2 or T.numel() == 0:
        got = tuple(T.shape) if isinstance(T, torch.Tensor) else type(T).__name__
        raise ValueError(f"T must be a non-empty torch.Tensor with at least 2 modes, got {got}")
    if T.dtype not in FLOAT_DTYPES:
        raise ValueError(f"T must have dtype float16, bfloat16, float32 or float64, got {T.dtype}")
    if not all_finite(T):
        raise ValueError("T contains NaN or Inf; all entries must be finite")
    return T


def tucker(
    T: torch.Tensor,
    ranks: TuckerRanks,
    *,
    method: str = "hooi",
    n_iter: int = 50,
    tol: float = 1e-10,
    generator: torch.Generator | int | None = None,
) -> TuckerFactors:
    """Tucker decomposition of ``T`` with multilinear rank ``ranks`` by HOSVD or HOOI.

    Args:
        T: tensor with at least 2 modes, float16/bfloat16/float32/float64, on any device (e.g. a Conv2d weight
            ``(out, in, kh, kw)``).
        ranks: see :func:`validate_ranks`: one int per mode (``None`` keeps a mode), one int for all, or a fraction
            of parameters kept.
        method: ``"hooi"`` (default; HOSVD start, then orthogonal iteration) or ``"hosvd"``.
        n_iter: most HOOI sweeps (ignored by HOSVD).
        tol: HOOI stops when the relative error changes by less than ``tol`` between sweeps.
        generator: a ``torch.Generator`` or integer seed (``None`` means seed 0); only used by tensorly to pad a
            factor when an unfolding has fewer columns than the requested rank.

    Returns:
        :class:`TuckerFactors` in ``T``'s dtype and device; ``info`` holds the method, the sweeps run and HOOI's
        relative error history.

    Raises:
        ValueError: ``T`` not a finite float tensor with at least 2 modes, a rank outside ``[1, I_n]`` (naming the
            mode), an unknown ``method`` or a bad option.

    References:
        De Lathauwer, De Moor, Vandewalle (2000), HOSVD: https://doi.org/10.1137/S0895479896305696;
        HOOI: https://doi.org/10.1137/S0895479898346995; Kolda and Bader (2009), https://doi.org/10.1137/07070111X.
    """
    T = _check_tensor(T)
    ranks = validate_ranks(T.shape, ranks)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    n_iter = check_positive_int(n_iter, "n_iter")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=make_generator(generator)))
    import tensorly as tl
    from tensorly.decomposition import tucker as tl_tucker

    work = T.to(compute_dtype(T.dtype))
    sweeps = 0 if method == "hosvd" else n_iter
    with tl.backend_context("pytorch", local_threadsafe=True):
        (core, factors), errors = tl_tucker(work, list(ranks), n_iter_max=sweeps, init="svd", svd="truncated_svd",
                                            tol=tol, random_state=seed, return_errors=True)
    info = {"method": method, "iterations": len(errors), "errors": [float(e) for e in errors]}
    return TuckerFactors(core.to(T.dtype), tuple(f.to(T.dtype) for f in factors), info)
