"""Trained Rank Pruning (TRP): periodic truncated SVD of the weights plus a nuclear-norm subgradient, usable with any
``torch.optim`` optimizer.

TRP (Xu et al., https://arxiv.org/abs/1812.02402; IJCAI 2020 version https://arxiv.org/abs/1910.04576) alternates
ordinary training steps with low-rank approximation: every ``period`` steps each targeted weight ``W`` is replaced by
its truncated SVD ``T(W) = U_k diag(s_k) V_k^T`` and training continues from it (the gradients of the next step are
taken at the low-rank weight and applied to it, the paper's Fig. 1b). The rank ``k`` is the smallest one keeping a
fraction ``energy`` of ``sum(s**2)`` (the reference code's ``EnergyThreshold``, squared singular values) or a fixed
``rank``. A nuclear-norm regulariser ``lambda ||W||_*`` is optimised by stochastic subgradient descent: its subgradient
``U V^T`` (over the non-zero singular values) is added to each targeted gradient.

Subgradient cost: the paper and its code reuse the truncated SVD's ``U_k V_k^T`` (the subgradient of the truncated
weight) instead of an SVD per step. Here the subgradient is cached and recomputed every ``refresh`` steps (default
``period``: it then comes free with each truncation); in between the cached one is applied. ``refresh=1`` is the
exact subgradient of the current weight every step.

Use::

    trp = TRP(dict(named_weights), period=20, energy=0.99, nuclear=1e-4)
    loss.backward()
    trp.regularize()      # grad += nuclear * U V^T for each targeted weight
    optimizer.step(); optimizer.zero_grad()
    trp.step()            # every ``period`` steps: W <- truncated SVD of W

Everything is deterministic (exact SVDs, no random draws); :meth:`TRP.state_dict` holds the step count and the cached
subgradients so that a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from rankwise.linalg.rank import rank_for_energy


def nuclear_subgradient(W: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
    """``U V^T`` over the singular values of ``W`` above ``rtol * s_max``: the gradient of ``||W||_*`` where ``W`` has
    full rank and distinct singular values, and the minimum-norm subgradient elsewhere.

    Args:
        W: an ``(m, n)`` matrix (computed in float32, or float64 for a float64 input; returned in ``W``'s dtype).
        rtol: singular values at or below ``rtol * s_max`` count as zero (default ``max(m, n) * eps`` of the
            compute dtype, LAPACK's numerical rank).

    Returns:
        ``U_r V_r^T`` of ``W``'s shape, ``r`` the numerical rank.
    """
    work = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return _subgradient(U, S, Vh, rtol).to(W.dtype)


def _subgradient(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rtol: float | None) -> torch.Tensor:
    if rtol is None:
        rtol = max(U.shape[0], Vh.shape[1]) * torch.finfo(S.dtype).eps
    floor = rtol * float(S[0]) if S.numel() else 0.0
    r = int(S.gt(floor).sum()) if S.numel() and float(S[0]) > 0 else 0
    return U[:, :r] @ Vh[:r]  # (m, n)


def _targets(params: Mapping[str, nn.Parameter | nn.Module] | Iterable[nn.Parameter | nn.Module]
             ) -> dict[str, nn.Parameter]:
    """``{name: 2-D weight}`` from parameters or modules with a ``weight`` (named by their keys or positions)."""
    items = params.items() if isinstance(params, Mapping) else ((str(i), p) for i, p in enumerate(params))
    out: dict[str, nn.Parameter] = {}
    for name, item in items:
        weight = item.weight if isinstance(item, nn.Module) else item
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(f"TRP targets 2-D weights; {name!r} is "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        out[name] = weight
    if not out:
        raise ValueError("params must name at least one 2-D weight")
    return out


class TRP:
    """Trained Rank Pruning on a set of 2-D weights (see the module docstring).

    Args:
        params: the targeted weights: a mapping ``{name: parameter or module with .weight}`` (names appear in
            errors) or an iterable of parameters/modules. Every other parameter is left untouched.
        period: steps between truncations (``>= 1``; the paper's ``m``).
        energy: keep the smallest rank whose squared singular values reach this fraction of the total, in
            ``(0, 1]`` (the reference code uses 0.9 and 0.99). Exactly one of ``energy`` and ``rank``.
        rank: a fixed rank in ``[1, min(m, n)]`` for every targeted weight instead.
        nuclear: ``lambda``, the nuclear-norm weight (``>= 0``; the reference code uses ``3e-4`` with SGD).
        refresh: steps between recomputations of the nuclear subgradient (default ``period``: reuse each
            truncation's SVD, as the paper does); ``1`` recomputes it every step.

    Raises:
        ValueError: a bad option (naming it and the allowed range) or a target that is not a 2-D weight.
    """

    def __init__(self, params: Mapping[str, nn.Parameter | nn.Module] | Iterable[nn.Parameter | nn.Module], *,
                 period: int = 20, energy: float | None = 0.99, rank: int | None = None, nuclear: float = 0.0,
                 refresh: int | None = None) -> None:
        if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 1:
            raise ValueError(f"period must be a step count >= 1, got {period!r}")
        if rank is not None:
            energy = None
        elif energy is None:
            raise ValueError("give energy (a fraction in (0, 1]) or rank (an integer): got neither")
        if energy is not None and not (isinstance(energy, numbers.Real) and not isinstance(energy, bool)
                                       and 0.0 < float(energy) <= 1.0):
            raise ValueError(f"energy must be a fraction of the squared singular values in (0, 1], got {energy!r}")
        if not (isinstance(nuclear, numbers.Real) and math.isfinite(nuclear) and nuclear >= 0.0):
            raise ValueError(f"nuclear must be a finite weight >= 0, got {nuclear!r}")
        refresh = period if refresh is None else refresh
        if isinstance(refresh, bool) or not isinstance(refresh, numbers.Integral) or refresh < 1:
            raise ValueError(f"refresh must be a step count >= 1, got {refresh!r}")
        self.weights = _targets(params)
        if rank is not None:
            for name, W in self.weights.items():
                top = min(W.shape)
                if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= top:
                    raise ValueError(f"rank must be an integer in [1, {top}] (min(m, n) of {name!r} "
                                     f"{tuple(W.shape)}), got {rank!r}")
        self.period, self.energy, self.rank = int(period), energy, rank
        self.nuclear, self.refresh = float(nuclear), int(refresh)
        self.steps = 0
        self.subgradients: dict[str, torch.Tensor] = {}
        self.computed_at = -1  # the step count when the cached subgradients were computed (-1: never)
        self.ranks: dict[str, int] = {}  # the rank each weight was truncated to at the last truncation

    # the nuclear-norm term
    @torch.no_grad()
    def regularize(self) -> None:
        """Add ``nuclear * U V^T`` to the gradient of each targeted weight that has one (call between
        ``backward()`` and ``optimizer.step()``). The subgradient is the cached one, recomputed from the current
        weight every ``refresh`` steps and at every truncation."""
        if self.nuclear == 0.0:
            return
        stale = self.computed_at < 0 or self.steps - self.computed_at >= self.refresh
        if stale:
            self.computed_at = self.steps
        for name, W in self.weights.items():
            if stale or name not in self.subgradients:
                self.subgradients[name] = nuclear_subgradient(W)
            if W.grad is not None:
                W.grad.add_(self.subgradients[name].to(W.grad.dtype), alpha=self.nuclear)

    # the truncation
    @torch.no_grad()
    def truncate(self) -> dict[str, int]:
        """Replace every targeted weight by its truncated SVD now; return the ranks kept."""
        for name, W in self.weights.items():
            work = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
            U, S, Vh = torch.linalg.svd(work, full_matrices=False)
            k = self.rank if self.rank is not None else max(1, rank_for_energy(S, float(self.energy)))
            W.copy_(((U[:, :k] * S[:k]) @ Vh[:k]).to(W.dtype))  # (m, n), rank k
            self.ranks[name] = k
            if self.nuclear:
                self.subgradients[name] = _subgradient(U[:, :k], S[:k], Vh[:k], None).to(W.dtype)
        if self.nuclear:
            self.computed_at = self.steps
        return dict(self.ranks)

    def step(self) -> dict[str, int] | None:
        """Count one optimizer step (call after ``optimizer.step()``); every ``period`` steps truncate, returning
        the ranks kept (``None`` on the other steps)."""
        self.steps += 1
        return self.truncate() if self.steps % self.period == 0 else None

    # checkpoints
    def state_dict(self) -> dict:
        return {"steps": self.steps, "computed_at": self.computed_at, "ranks": dict(self.ranks),
                "subgradients": {k: v.clone() for k, v in self.subgradients.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        unknown = set(state.get("subgradients", {})) - set(self.weights)
        if unknown:
            raise ValueError(f"state holds subgradients of weights this TRP does not target: {sorted(unknown)}")
        for name, sub in state.get("subgradients", {}).items():
            if tuple(sub.shape) != tuple(self.weights[name].shape):
                raise ValueError(f"subgradient of {name!r} has shape {tuple(sub.shape)}, the weight "
                                 f"{tuple(self.weights[name].shape)}")
        self.steps = int(state["steps"])
        self.computed_at = int(state.get("computed_at", -1))
        self.ranks = {k: int(v) for k, v in state.get("ranks", {}).items()}
        self.subgradients = {k: v.clone().to(self.weights[k].device)
                             for k, v in state.get("subgradients", {}).items()}
