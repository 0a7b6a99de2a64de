"""Row sampling of tall matrices: leverage scores, l_p Lewis weights, volume (determinantal) sampling.

Each sampler picks ``k`` rows of an ``(n, d)`` matrix ``A`` and returns their indices with *row scales*: multiply the
picked rows (and right-hand sides) by the scales and the small problem stands in for the large one.

* :func:`leverage_scores`: ``diag(A (A^T A + lam I)^+ A^T)`` exactly (SVD, or from a given Gram) or approximately
  in ``O(nd log n)`` (Drineas, Magdon-Ismail, Mahoney, Woodruff 2012, https://arxiv.org/abs/1109.3843).
* :func:`lewis_weights` and :func:`sensitivity_sample`: l_p Lewis weights by the Cohen-Peng fixed-point iteration
  (https://arxiv.org/abs/1412.0588), the sensitivity upper bounds that l_p sampling draws from (Woodruff and Yasuda
  2023, https://arxiv.org/abs/2306.00732); at ``p = 2`` they are the leverage scores.
* :func:`volume_sample`: ``k = d`` rows with probability ``det(A_S)^2 / det(A^T A)`` (a projection DPP), and for
  ``k > d`` volume-rescaled sampling, that DPP joined with ``k - d`` i.i.d. leverage draws, whose weighted
  least-squares estimator is unbiased (Derezinski and Warmuth 2017, https://arxiv.org/abs/1705.06908; Nouy and
  Michel 2023, https://arxiv.org/abs/2312.14057); or greedy maximum volume (deterministic).

Everything computes in float64 on the input's device and takes a seed or ``torch.Generator`` where it draws.
"""

from __future__ import annotations

import math
import numbers

import torch

from rankwise.linalg._checks import check_matrix, check_positive_int, make_generator
from rankwise.linalg.sketch import make_sketch

VOLUME_METHODS = ("dpp", "greedy")


def _tall(A: object, name: str = "A") -> torch.Tensor:
    return check_matrix(A, name).to(torch.float64)


def _check_k(k: object, n: int, minimum: int = 1) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) < minimum:
        raise ValueError(f"k must be an integer >= {minimum}, got {k!r}")
    if int(k) > n:
        raise ValueError(f"k={int(k)} exceeds the pool of {n} rows; pick at most {n}")
    return int(k)


def _check_p(p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(float(p)) or float(p) < 1:
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    return float(p)


def _check_ridge(ridge: object) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not float(ridge) >= 0 \
            or not math.isfinite(float(ridge)):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return float(ridge)


def _rank_tol(s: torch.Tensor, shape: tuple[int, int]) -> float:
    """Singular values at or below this count as zero (numpy's matrix_rank default)."""
    return float(s.max()) * max(shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0


def leverage_scores(A: torch.Tensor, ridge: float = 0.0, *, gram: torch.Tensor | None = None,
                    sketch_size: int | None = None, jl_dim: int = 32,
                    generator: torch.Generator | int | None = None) -> torch.Tensor:
    """Ridge leverage scores of the rows of ``A``: ``l_i = a_i^T (A^T A + lam I)^+ a_i``.

    With ``ridge = 0`` these are the statistical leverage scores (in ``[0, 1]``, summing to ``rank(A)``): the
    diagonal of the projection onto ``A``'s column space. Exact scores come from a thin SVD of ``A`` (directions with
    a zero singular value are dropped, so a rank-deficient ``A`` is fine), or, with ``gram = A^T A`` given, from an
    eigen-decomposition of the ``(d, d)`` Gram (clamped at zero). With ``sketch_size`` they are approximated as in
    Drineas et al. (2012, Alg. 1), https://arxiv.org/abs/1109.3843: ``R`` from a QR of an SRHT sketch ``S1 A``
    (stacked on ``sqrt(lam) I`` for a ridge), then the row norms of ``A R^-1 G`` for a ``(d, jl_dim)`` Gaussian
    ``G``: each score within a factor ``1 +- eps`` with high probability for ``sketch_size ~ d log d / eps^2`` and
    ``jl_dim ~ log n / eps^2``.

    Args:
        A: ``(n, d)`` matrix whose rows are scored.
        ridge: ``lam >= 0`` (absolute, in the units of ``A^T A``).
        gram: ``A^T A`` if already at hand (exact path only).
        sketch_size: rows of the SRHT sketch, ``d <= sketch_size <= n``; ``None`` computes exact scores.
        jl_dim: columns of the Johnson-Lindenstrauss projection of the sketched path.
        generator: seed or generator of the sketched path.

    Returns:
        ``(n,)`` float64 scores.

    Raises:
        ValueError: a non-finite or non-matrix ``A`` or ``gram``, a negative ridge, a sketch size out of range.
    """
    A = _tall(A)
    ridge = _check_ridge(ridge)
    n, d = A.shape
    if sketch_size is not None:
        k = check_positive_int(sketch_size, "sketch_size", minimum=1)
        if not d <= k <= n:
            raise ValueError(f"sketch_size must be between d={d} and n={n}, got {k}")
        gen = make_generator(generator)
        SA = make_sketch("srht", k, n, generator=gen).apply(A)  # (k, d)
        if ridge > 0:
            SA = torch.cat((SA, math.sqrt(ridge) * torch.eye(d, dtype=torch.float64, device=A.device)))
        U, s, Vh = torch.linalg.svd(SA, full_matrices=False)  # R^-1 restricted to the range: V diag(1/s)
        keep = s > _rank_tol(s, tuple(SA.shape))
        jl = check_positive_int(jl_dim, "jl_dim", minimum=1)
        G = torch.randn((int(keep.sum()), jl), generator=gen, dtype=torch.float64).to(A.device) / math.sqrt(jl)
        Z = A @ (Vh[keep].mT / s[keep]) @ G  # (n, jl)
        return Z.pow(2).sum(1)
    if gram is not None:
        gram = check_matrix(gram, "gram").to(torch.float64)
        if gram.shape != (d, d):
            raise ValueError(f"gram must be ({d}, {d}) = A^T A, got shape {tuple(gram.shape)}")
        evals, Q = torch.linalg.eigh((gram + gram.mT) / 2)
        evals = evals.clamp_min(0.0) + ridge
        keep = evals > _rank_tol(evals.sqrt(), (n, d)) ** 2 if ridge == 0 else evals > 0
        Z = A @ Q[:, keep]  # (n, r)
        return (Z.pow(2) / evals[keep]).sum(1)
    U, s, _ = torch.linalg.svd(A, full_matrices=False)
    keep = s > _rank_tol(s, (n, d))
    shrink = s[keep].pow(2) / (s[keep].pow(2) + ridge)  # 1 without a ridge
    return (U[:, keep].pow(2) * shrink).sum(1)


def lewis_weights(A: torch.Tensor, p: float, iters: int = 100, *, tol: float = 1e-10) -> torch.Tensor:
    """The l_p Lewis weights of the rows of ``A``: the ``w > 0`` with ``w_i^(2/p) = a_i^T (A^T W^(1-2/p) A)^-1 a_i``.

    Cohen and Peng (2015, https://arxiv.org/abs/1412.0588) iterate ``w <- (a_i^T (A^T W^(1-2/p) A)^-1 a_i)^(p/2)``,
    a contraction for ``p < 4``; for ``p >= 4`` this damps the step geometrically, ``w <- w^(1-a) T(w)^a`` with
    ``a = 2/p`` (the log-space Jacobian then has eigenvalues in ``[0, 1 - 2/p]``), so it converges for every
    ``p >= 1``. The weights sum to ``rank(A)``, equal the leverage scores at ``p = 2``, and bound the l_p
    sensitivities ``sup_x |a_i^T x|^p / ||A x||_p^p`` up to ``d^max(0, p/2-1)`` (Woodruff and Yasuda 2023,
    https://arxiv.org/abs/2306.00732), which is what :func:`sensitivity_sample` draws from.

    Args:
        A: ``(n, d)`` matrix.
        p: ``>= 1``.
        iters: most iterations.
        tol: stop when the largest relative change of a weight is below this.

    Returns:
        ``(n,)`` float64 weights (zero for a zero row).
    """
    A = _tall(A)
    p = _check_p(p)
    iters = check_positive_int(iters, "iters", minimum=1)
    U, s, _ = torch.linalg.svd(A, full_matrices=False)
    r = int((s > _rank_tol(s, tuple(A.shape))).sum())
    B = U[:, :r] * s[:r]  # same row space geometry as A, full column rank r
    w = leverage_scores(B)
    if p == 2:
        return w
    step = min(1.0, 2.0 / p)
    live = w > 0
    for _ in range(iters):
        scale = w[live].pow(1.0 - 2.0 / p)  # W^(1-2/p)
        M = (B[live] * scale[:, None]).mT @ B[live]  # (r, r)
        tau = (B[live] * torch.linalg.solve(M, B[live].mT).mT).sum(1)  # a_i^T M^-1 a_i
        new = w.clone()
        new[live] = w[live].pow(1.0 - step) * tau.clamp_min(0.0).pow(p / 2 * step)
        change = float(((new - w).abs() / w.clamp_min(1e-300)).max())
        w = new
        if change < tol:
            break
    return w


def sensitivity_sample(A: torch.Tensor, k: int, p: float = 1.0, generator: torch.Generator | int | None = None, *,
                       iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``k`` rows i.i.d. with probability ``q_i = w_i / sum(w)`` (the l_p Lewis weights, upper bounds of the
    l_p sensitivities) and rescale each by ``(1 / (k q_i))^(1/p)``, so ``E ||S A x||_p^p = ||A x||_p^p`` for every
    ``x`` (Cohen and Peng 2015, https://arxiv.org/abs/1412.0588; Woodruff and Yasuda 2023,
    https://arxiv.org/abs/2306.00732: ``k ~ d^max(1, p/2) / eps^2`` up to logs gives an l_p subspace embedding).

    Args:
        A: ``(n, d)`` matrix.
        k: draws, ``1 <= k <= n`` (with replacement: an index may repeat).
        p: ``>= 1``.
        generator: seed or generator (same seed, same draws).
        iters: Lewis-weight iterations.

    Returns:
        ``(indices, scales)``: ``(k,)`` int64 row indices and ``(k,)`` float64 row scales.
    """
    A = _tall(A)
    k = _check_k(k, A.shape[0])
    p = _check_p(p)
    w = lewis_weights(A, p, iters)
    if not float(w.sum()) > 0:
        raise ValueError("A is all zeros: no row has a positive sensitivity to sample by")
    q = w / w.sum()
    idx = torch.multinomial(q.cpu(), k, replacement=True, generator=make_generator(generator)).to(A.device)
    return idx, (k * q[idx]).pow(-1.0 / p)


def _orthonormal_basis(A: torch.Tensor) -> torch.Tensor:
    U, s, _ = torch.linalg.svd(A, full_matrices=False)
    return U[:, s > _rank_tol(s, tuple(A.shape))]


def projection_dpp(U: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample the projection DPP with kernel ``U U^T`` (``U`` with ``d`` orthonormal columns): ``d`` distinct rows
    ``S`` with probability ``det(U_S)^2``, by the chain rule of Hough, Krishnapur, Peres and Virag (2006),
    https://arxiv.org/abs/math/0503110: pick ``i`` with probability ``||u_i||^2 / r``, project the columns onto the
    complement of ``u_i``, repeat."""
    V = U.to(torch.float64).clone()
    picked = []
    for r in range(V.shape[1], 0, -1):
        norms = V.pow(2).sum(1).clamp_min(0.0)
        i = int(torch.multinomial((norms / norms.sum()).cpu(), 1, generator=generator))
        picked.append(i)
        if r == 1:
            break
        v = V[i] / V[i].norm()  # (r,)
        Q = torch.linalg.qr(torch.cat((v[:, None], torch.eye(r, dtype=V.dtype, device=V.device)), 1)).Q  # (r, r)
        V = V @ Q[:, 1:r]  # columns orthogonal to row i's direction: the conditional kernel, (n, r - 1)
    return torch.tensor(picked, dtype=torch.long, device=U.device)


def greedy_volume(A: torch.Tensor, k: int, *, ridge: float = 1e-9) -> torch.Tensor:
    """``k`` rows chosen greedily to maximise ``det(A_S^T A_S + eps I)``: each step adds the row of largest
    ``a_i^T (A_S^T A_S + eps I)^-1 a_i`` (the factor by which it multiplies the determinant); the first ``d`` steps
    are the pivots of a column-pivoted QR of ``A^T`` (Businger and Golub 1965). Deterministic; ``eps`` is ``ridge``
    times the mean squared row norm."""
    A = _tall(A)
    n, d = A.shape
    k = _check_k(k, n)
    eps = ridge * float(A.pow(2).sum(1).mean().clamp_min(1e-300))
    Minv = torch.eye(d, dtype=torch.float64, device=A.device) / eps
    chosen = torch.zeros(n, dtype=torch.bool, device=A.device)
    picked = []
    for _ in range(k):
        gain = ((A @ Minv) * A).sum(1).masked_fill(chosen, -math.inf)
        i = int(gain.argmax())
        picked.append(i)
        chosen[i] = True
        u = Minv @ A[i]  # Sherman-Morrison rank-one update of (A_S^T A_S + eps I)^-1
        Minv = Minv - torch.outer(u, u) / (1.0 + A[i] @ u)
    return torch.tensor(picked, dtype=torch.long, device=A.device)


def volume_sample(A: torch.Tensor, k: int, generator: torch.Generator | int | None = None, *,
                  method: str = "dpp") -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k >= d`` rows of a full-column-rank ``A`` by volume.

    ``method="dpp"``: for ``k = d``, ``S`` with probability ``det(A_S)^2 / det(A^T A)`` (volume sampling, a
    projection DPP; Derezinski and Warmuth 2017, https://arxiv.org/abs/1705.06908), for which ``A_S^-1 b_S`` is an
    unbiased estimator of the least-squares solution. For ``k > d``, volume-rescaled sampling with the leverage
    distribution ``q_i = l_i / d``: that DPP joined with ``k - d`` i.i.d. draws from ``q`` (Derezinski, Warmuth and
    Hsu 2018, https://arxiv.org/abs/1802.06749; the generalised volume sampling of Nouy and Michel 2023,
    https://arxiv.org/abs/2312.14057), for which weighted least squares with weights ``1 / q_i`` (the returned row
    scales squared, up to one constant) is unbiased. ``method="greedy"``: :func:`greedy_volume`, deterministic.

    Args:
        A: ``(n, d)`` with rank ``d``.
        k: rows, ``d <= k <= n`` (``dpp``: the i.i.d. part may repeat a row).
        generator: seed or generator (``dpp``).
        method: ``dpp`` or ``greedy``.

    Returns:
        ``(indices, scales)``: ``(k,)`` int64 rows and ``(k,)`` float64 row scales ``(k q_i)^(-1/2)``.

    Raises:
        ValueError: ``k`` outside ``[d, n]``, a rank-deficient ``A``, an unknown method.
    """
    A = _tall(A)
    n, d = A.shape
    if method not in VOLUME_METHODS:
        raise ValueError(f"method must be one of {', '.join(VOLUME_METHODS)}, got {method!r}")
    k = _check_k(k, n)
    U = _orthonormal_basis(A)
    if U.shape[1] < d:
        raise ValueError(f"A must have full column rank for volume sampling: rank {U.shape[1]} < d={d}")
    if k < d:
        raise ValueError(f"k={k} is below d={d}: volume sampling picks at least as many rows as A has columns")
    q = U.pow(2).sum(1) / d  # leverage distribution
    if method == "greedy":
        idx = greedy_volume(A, k)
    else:
        gen = make_generator(generator)
        idx = projection_dpp(U, gen)
        if k > d:
            extra = torch.multinomial(q.cpu(), k - d, replacement=True, generator=gen).to(A.device)
            idx = torch.cat((idx, extra))
    return idx, (k * q[idx]).clamp_min(1e-300).rsqrt()


def _solve_size(eps: float, d: int, n: int, delta: float, constant: float) -> int:
    """``m = constant * eps^-2 d log^3(n / delta)`` (Song, Ye, Yin, Zhang 2023, Thm. 1.2)."""
    return math.ceil(constant * d * math.log(n / delta) ** 3 / eps**2)


def sketch_lstsq_linf(A: torch.Tensor, b: torch.Tensor, eps: float = 0.5, *, delta: float = 0.1,
                      constant: float = 1.0, sketch_size: int | None = None, kind: str = "gaussian",
                      generator: torch.Generator | int | None = None) -> tuple[torch.Tensor, int]:
    """Sketch-and-solve least squares with an l_inf guarantee on the solution.

    Song, Ye, Yin and Zhang (2023), https://arxiv.org/abs/2302.00248: a dense sketch with
    ``m = eps^-2 d log^3(n / delta)`` rows gives, with probability ``1 - delta``,
    ``||x' - x*||_inf <= eps / sqrt(d) * ||A x* - b||_2 * ||A^+||_2`` for ``x' = argmin ||S (A x - b)||``. The paper
    states ``m`` up to a constant (``constant`` here; 1 by default); when ``m >= n`` sketching saves nothing and the
    problem is solved exactly (then ``x' = x*``). ``kind="gaussian"`` is the paper's dense sketch; ``"srht"``
    (dense too, applied in ``O(nd log n)``) is the fast form it names.

    Args:
        A: ``(n, d)`` tall matrix.
        b: ``(n,)`` right-hand side.
        eps: accuracy in ``(0, 1]``.
        delta: failure probability in ``(0, 1)``.
        constant: factor on the paper's row count.
        sketch_size: rows ``m`` to use instead of the formula.
        kind: ``gaussian`` or ``srht`` (see :func:`~rankwise.linalg.sketch.make_sketch`).
        generator: seed or generator of the sketch.

    Returns:
        ``(x, m)``: the solution in ``A``'s dtype and the sketch size used (``n``: solved exactly).
    """
    from rankwise.linalg.sketch import sketch_lstsq

    A = check_matrix(A, "A")
    n, d = A.shape
    if not isinstance(b, torch.Tensor) or b.shape != (n,):
        got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise ValueError(f"b must have shape ({n},) to match A, got {got}")
    check_matrix(b[:, None], "b")
    for name, value, low, high in (("eps", eps, 0.0, 1.0), ("delta", delta, 0.0, 1.0 - 1e-12)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low < float(value) <= high:
            raise ValueError(f"{name} must be in ({low:g}, {high:g}], got {value!r}")
    if kind not in ("gaussian", "srht"):
        raise ValueError(f"kind must be 'gaussian' or 'srht' (a dense sketch, as the guarantee needs), got {kind!r}")
    if isinstance(constant, bool) or not isinstance(constant, numbers.Real) or not float(constant) > 0:
        raise ValueError(f"constant must be a number > 0, got {constant!r}")
    m = _solve_size(float(eps), d, n, float(delta), float(constant)) if sketch_size is None else \
        check_positive_int(sketch_size, "sketch_size", minimum=d)
    if m >= n:
        x = torch.linalg.lstsq(A.to(torch.float64), b.to(torch.float64)[:, None]).solution[:, 0]
        return x.to(A.dtype), n
    return sketch_lstsq(A, b, m, kind=kind, generator=generator), m
