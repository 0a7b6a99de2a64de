"""Loss-aware allocation scores from the M-FAC empirical Fisher of each layer's per-window weight gradients.

Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information", NeurIPS 2021,
https://arxiv.org/abs/2107.03356: with ``m`` calibration windows' gradients ``G_j`` of a weight ``W`` (``m x out x
in``), the damped empirical Fisher is ``F = lambda I + (1/m) sum_j vec(G_j) vec(G_j)^T``
(:class:`rankwise.optim.mfac.MFAC`). Truncating the whitened SVD ``W S = sum_i s_i u_i v_i^T`` to rank ``r`` removes
``D_r = sum_{i > r} x_i`` with ``x_i = s_i u_i v_i^T S^-1``, and the second-order loss increase is

    ``L(r) = 1/2 vec(D_r)^T F vec(D_r) = 1/2 [lambda sum_{i > r} ||x_i||^2 + (1/m) sum_j (sum_{i > r} <G_j, x_i>)^2]``

(the ``x_i`` are Frobenius-orthogonal: ``u_i`` are). Only the ``m x k`` products ``<G_j, x_i> = s_i u_i^T G_j
S^-T v_i`` are needed, never a ``d``-vector per component. The score of component ``r`` is its marginal gain
``L(r - 1) - L(r)``, made non-increasing (the slopes of the least concave majorant of the cumulative gain, by pool
adjacent violators, so the global threshold stays a greedy exchange) and divided by the ``out + in`` parameters it
costs, as :func:`rankwise.allocate.budget.loss_scores`.

This is the uncompensated (forward) quadratic form: the truncating methods do not apply the optimal-brain-surgeon
update ``-F^-1 ...`` to the kept weights, so the OBS form ``(x^T x)^2 / x^T F^-1 x`` (a lower bound reached only with
that update) would underestimate what they lose. ``lambda`` is ``damp`` times the mean diagonal of the window's
Fisher ``trace(G^T G) / (m d)``, so the score does not depend on the loss scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rankwise.linalg import Whitening


def nonincreasing_fit(x: torch.Tensor) -> torch.Tensor:
    """The least-squares non-increasing sequence closest to ``x`` (pool adjacent violators), float64.

    Its partial sums are the least concave majorant of ``x``'s partial sums: same total, equal to ``x`` when ``x``
    is already non-increasing."""
    values: list[float] = []
    counts: list[int] = []
    for v in x.double().tolist():
        values.append(v)
        counts.append(1)
        while len(values) > 1 and values[-2] < values[-1]:  # a violator: pool it with its left block
            v2, c2 = values.pop(), counts.pop()
            values[-1] = (values[-1] * counts[-1] + v2 * c2) / (counts[-1] + c2)
            counts[-1] += c2
    return torch.tensor(values, dtype=torch.float64).repeat_interleave(torch.tensor(counts))


def _components(weight: torch.Tensor, whitening: Whitening) -> tuple[torch.Tensor, torch.Tensor]:
    """The whitened truncation's components ``x_i = b_i r_i^T`` as ``B`` (``out x k``) and ``R`` (``k x in``),
    largest first, float64, from the eigen-decomposition of the smaller Gram matrix of ``A = W S`` (no division by
    small singular values, and far faster than LAPACK's SVD here).

    ``out >= in``: ``A^T A = V diag(s^2) V^T``, ``b_i = A v_i = s_i u_i``, ``r_i = S^-T v_i``. ``out < in``:
    ``A A^T = U diag(s^2) U^T``, ``x_i = s_i u_i v_i^T S^-1 = u_i u_i^T W`` (``v_i = A^T u_i / s_i``), so
    ``b_i = u_i``, ``r_i = W^T u_i``."""
    W = weight.detach().double()
    A = whitening.right_multiply(W)  # (out, in)
    if W.shape[0] >= W.shape[1]:
        V = torch.linalg.eigh(A.mT @ A)[1].flip(-1)  # (in, in), descending eigenvalues
        return A @ V, whitening.right_solve(V.mT).to(W.dtype)
    U = torch.linalg.eigh(A @ A.mT)[1].flip(-1)  # (out, out)
    return U, U.mT @ W


def truncation_losses(weight: torch.Tensor, whitening: Whitening, windows: torch.Tensor | Sequence[torch.Tensor],
                      damp: float = 1e-3) -> torch.Tensor:
    """``L(r)`` for ``r = 0 .. k`` (``k = min(out, in)``): the M-FAC Fisher quadratic form of the part a rank-``r``
    whitened truncation removes (see the module docstring), float64 ``(k + 1,)``, non-increasing to ``L(k) = 0``.

    Args:
        weight: ``(out, in)`` the layer's weight.
        whitening: the square root ``S`` of its input covariance.
        windows: ``(m, out, in)`` per-window weight gradients, or a list of such chunks (as collected).
        damp: ``lambda`` relative to the mean diagonal of the window's Fisher; ``> 0``.

    Raises:
        ValueError: ``damp <= 0``, no windows, a shape mismatch, or NaN/Inf gradients.
    """
    if not damp > 0:
        raise ValueError(f"damp must be > 0, got {damp!r}")
    G = windows if isinstance(windows, torch.Tensor) else torch.cat(list(windows)) if windows else None
    out_f, in_f = weight.shape
    if G is None or G.ndim != 3 or G.shape[0] < 1 or tuple(G.shape[1:]) != (out_f, in_f):
        raise ValueError(f"windows must be (m >= 1, {out_f}, {in_f}) per-window gradients, got "
                         f"{None if G is None else tuple(G.shape)}")
    if not bool(torch.isfinite(G).all()):
        raise ValueError("the per-window gradients hold NaN or Inf")
    G = G.float()
    m = G.shape[0]
    B, R = _components(weight, whitening)
    c = ((B.mT.to(G.dtype) @ G) * R.to(G.dtype)).sum(-1).double()  # (m, k): <G_j, x_i> = b_i^T G_j r_i
    a = B.pow(2).sum(0) * R.pow(2).sum(-1)  # (k,): ||x_i||_F^2
    lam = damp * float(G.pow(2).sum(dtype=torch.float64)) / (m * out_f * in_f)  # no float64 copy of G
    zero = c.new_zeros(m, 1)
    tail_c = torch.cat([c.flip(-1).cumsum(-1).flip(-1), zero], dim=1)  # (m, k + 1): sum_{i > r} c_ji
    tail_a = torch.cat([a.flip(0).cumsum(0).flip(0), a.new_zeros(1)])  # (k + 1,)
    return 0.5 * (lam * tail_a + tail_c.pow(2).sum(0) / m)


def fisher_loss_scores(weight: torch.Tensor, whitening: Whitening, windows: torch.Tensor | Sequence[torch.Tensor],
                       damp: float = 1e-3) -> torch.Tensor:
    """Per-component scores (non-increasing, float64 ``(k,)``): the loss each whitened component prevents under
    the M-FAC empirical Fisher, per parameter it costs (arguments as :func:`truncation_losses`)."""
    losses = truncation_losses(weight, whitening, windows, damp)
    out_f, in_f = weight.shape
    return nonincreasing_fit(losses[:-1] - losses[1:]) / (out_f + in_f)
