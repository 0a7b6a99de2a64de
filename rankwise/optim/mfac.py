"""M-FAC: matrix-free inverse empirical-Fisher products from a window of gradients, and the M-FAC optimizer.

Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information", NeurIPS 2021,
https://arxiv.org/abs/2107.03356 (reference code: IST-DASLab/M-FAC).

Given ``m`` gradients ``g_1 .. g_m`` (the rows of ``G``, ``m x d``) and a damping ``lambda``, the empirical Fisher is

    ``F = lambda I + (1/m) sum_i g_i g_i^T = lambda I + G^T G / m``.

It is never formed. By Woodbury, ``F^-1 = (I - G^T A^-1 G) / lambda`` with the ``m x m`` matrix
``A = m lambda I + G G^T``: the paper's dynamic algorithm keeps ``G`` and the Gram matrix ``G G^T``, factorises
``A`` once per window change (``O(m^3)``; the paper uses an unpivoted LU of ``A / lambda``, here its Cholesky factor,
the same triangle for this positive definite matrix) and answers every product ``F^-1 x`` in ``O(d m)``. Replacing
the oldest gradient costs one product ``G g`` (``O(d m)``) for the new Gram row, so a sliding window never recomputes
``G G^T``; the static setup costs ``O(d m^2)`` for the Gram matrix. The ``m x m`` algebra is done in float64 (it is
tiny); the ``m x d`` window is stored in the dtype asked for (float64 for exactness, float32 for memory, as the
reference code).

Block-wise M-FAC splits the ``d`` coordinates into consecutive blocks of ``block_size`` and uses a separate
empirical Fisher per block (a block-diagonal ``F``, each block ``lambda I + G_b^T G_b / m``): the same ``O(d m)``
products and ``O(d m^2)`` setup, plus one ``m x m`` factor per block, and each block's curvature is estimated in its
own ``m``-dimensional span instead of one span for all ``d`` coordinates.

:class:`MFAC` answers ``F^-1 x`` (:meth:`MFAC.ifvp`), ``F x``, the quadratic forms ``x^T F x`` and ``x^T F^-1 x``
and the diagonal of ``F^-1`` (the optimal-brain-surgeon saliencies ``w_j^2 / (2 [F^-1]_jj)``).
:class:`MFACOptimizer` is the paper's optimizer: each step puts the new gradient into the window (replacing the
oldest), and steps along ``-lr F^-1 g`` (with optional momentum and coupled weight decay, as the reference code).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def _check_damp(damp: float) -> None:
    if not (isinstance(damp, int | float) and math.isfinite(damp) and damp > 0):
        raise ValueError(f"damp must be a finite float > 0, got {damp!r}")


def _check_m(m: int) -> None:
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"m (the gradient window size) must be an int >= 1, got {m!r}")


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} holds NaN or Inf; M-FAC needs finite gradients")


def _factor(gram: torch.Tensor, m: int, damp: float) -> torch.Tensor:
    """Cholesky factors of ``A = m lambda I + G G^T`` per block, ``(k, m, m)`` float64.

    A Gram matrix assembled from float32 rows can be slightly indefinite when the gradients are huge; it is then
    replaced by its nearest positive semi-definite matrix (eigenvalues clamped at zero) before factorising."""
    eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + (m * damp) * eye)
    if bool((info != 0).any()):
        vals, vecs = torch.linalg.eigh((gram + gram.mT) / 2)
        psd = (vecs * vals.clamp_min(0).unsqueeze(-2)) @ vecs.mT
        chol = torch.linalg.cholesky(psd + (m * damp) * eye + 1e-12 * vals.abs().amax(-1, keepdim=True)[..., None]
                                     * eye)
    return chol


class MFAC:
    """Inverse empirical-Fisher products from a gradient window, dense or block-wise (see the module docstring).

    Args:
        grads: ``(m, d)`` the window of gradients (each row one gradient, flattened).
        damp: ``lambda > 0``, added to the diagonal of the empirical Fisher (absolute, as in the paper).
        block_size: coordinates per block for block-wise M-FAC; ``None``: one dense block over all ``d``.
        dtype: storage dtype of the window (float64 or float32); products return the input's dtype.

    Raises:
        ValueError: ``grads`` is not ``(m, d)`` with ``m >= 1``, holds NaN/Inf; ``damp <= 0``; ``block_size < 1``.
    """

    def __init__(self, grads: torch.Tensor, damp: float, *, block_size: int | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        if not isinstance(grads, torch.Tensor) or grads.ndim != 2 or grads.shape[0] < 1 or grads.shape[1] < 1:
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads).__name__
            raise ValueError(f"grads must be an (m, d) tensor with m >= 1 gradients, got {shape}")
        _check_damp(damp)
        _check_finite(grads, "grads")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        m, d = grads.shape
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be an int >= 1 or None, got {block_size!r}")
        self.m, self.d, self.damp = m, d, float(damp)
        self.block_size = d if block_size is None else min(block_size, d)
        self.blocks = -(-d // self.block_size)
        pad = self.blocks * self.block_size - d
        padded = torch.nn.functional.pad(grads.to(dtype), (0, pad))  # zero coordinates: F = lambda I there
        self.grads = padded.reshape(m, self.blocks, self.block_size).transpose(0, 1).contiguous()  # (k, m, B)
        self.gram = (self.grads @ self.grads.mT).double()  # (k, m, m): G G^T per block, the O(d m^2) setup
        self.next = 0  # the ring-buffer slot the next update replaces (the oldest gradient)
        self._chol: torch.Tensor | None = None

    @property
    def chol(self) -> torch.Tensor:
        """Cholesky factors of ``m lambda I + G G^T`` per block (recomputed after a window change)."""
        if self._chol is None:
            self._chol = _factor(self.gram, self.m, self.damp)
        return self._chol

    def update(self, g: torch.Tensor) -> None:
        """Slide the window: ``g`` (``(d,)``) replaces the oldest gradient (the dynamic algorithm, ``O(d m)``)."""
        if g.numel() != self.d:
            raise ValueError(f"gradient must have d = {self.d} entries, got {g.numel()}")
        _check_finite(g, "gradient")
        blocks = self._blocks(g.reshape(1, -1))[:, 0]  # (k, B)
        self.grads[:, self.next] = blocks
        row = (self.grads @ blocks.unsqueeze(-1)).squeeze(-1).double()  # (k, m): G g per block
        self.gram[:, self.next, :] = row
        self.gram[:, :, self.next] = row
        self.next = (self.next + 1) % self.m
        self._chol = None

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` -> ``(k, n, B)`` in the window's dtype (zero padded)."""
        pad = self.blocks * self.block_size - self.d
        x = torch.nn.functional.pad(x.to(self.grads.dtype), (0, pad))
        return x.reshape(x.shape[0], self.blocks, self.block_size).transpose(0, 1)

    def _unblock(self, y: torch.Tensor, n: int) -> torch.Tensor:
        """``(k, n, B)`` -> ``(n, d)``."""
        return y.transpose(0, 1).reshape(n, -1)[:, :self.d]

    def _vectors(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if x.shape[-1] != self.d or x.ndim not in (1, 2):
            raise ValueError(f"x must be (d,) or (n, d) with d = {self.d}, got {tuple(x.shape)}")
        _check_finite(x, "x")
        return (x.reshape(1, -1), True) if x.ndim == 1 else (x, False)

    def _whitened_products(self, xb: torch.Tensor) -> torch.Tensor:
        """``L^-1 G x`` per block, ``(k, m, n)`` float64, with ``L L^T = m lambda I + G G^T``."""
        gx = (self.grads @ xb.mT).double()  # (k, m, n)
        return torch.linalg.solve_triangular(self.chol, gx, upper=False)

    def ifvp(self, x: torch.Tensor) -> torch.Tensor:
        """``F^-1 x`` for ``x`` of shape ``(d,)`` or ``(n, d)`` (each row a vector), in ``x``'s dtype."""
        v, single = self._vectors(x)
        xb = self._blocks(v)  # (k, n, B)
        y = torch.cholesky_solve((self.grads @ xb.mT).double(), self.chol)  # (k, m, n): A^-1 G x
        out = (xb - (y.mT.to(self.grads.dtype) @ self.grads)) / self.damp  # (k, n, B)
        out = self._unblock(out, v.shape[0]).to(x.dtype)
        return out[0] if single else out

    def fvp(self, x: torch.Tensor) -> torch.Tensor:
        """``F x = lambda x + G^T G x / m`` (per block), same shapes as :meth:`ifvp`."""
        v, single = self._vectors(x)
        xb = self._blocks(v)
        gx = self.grads @ xb.mT  # (k, m, n)
        out = self._unblock(self.damp * xb + (gx.mT @ self.grads) / self.m, v.shape[0]).to(x.dtype)
        return out[0] if single else out

    def quad(self, x: torch.Tensor) -> torch.Tensor:
        """``x^T F x = lambda ||x||^2 + ||G x||^2 / m`` (summed over blocks), float64, one per row of ``x``."""
        v, single = self._vectors(x)
        xb = self._blocks(v)
        gx = (self.grads @ xb.mT).double()  # (k, m, n)
        out = self.damp * v.double().pow(2).sum(-1) + gx.pow(2).sum((0, 1)) / self.m
        return out[0] if single else out

    def quad_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """``x^T F^-1 x = (||x||^2 - ||L^-1 G x||^2) / lambda`` (summed over blocks), float64, one per row."""
        v, single = self._vectors(x)
        z = self._whitened_products(self._blocks(v))  # (k, m, n)
        out = (v.double().pow(2).sum(-1) - z.pow(2).sum((0, 1))) / self.damp
        return out[0] if single else out

    def diag_inverse(self) -> torch.Tensor:
        """The diagonal of ``F^-1``, ``(d,)`` float64: ``(1 - ||(L^-1 G)_{:, j}||^2) / lambda`` per coordinate."""
        z = torch.linalg.solve_triangular(self.chol, self.grads.double(), upper=False)  # (k, m, B)
        diag = (1.0 - z.pow(2).sum(1)) / self.damp  # (k, B)
        return diag.reshape(-1)[:self.d]


class MFACOptimizer(torch.optim.Optimizer):
    """The M-FAC optimizer: steps along ``-lr F^-1 g`` with ``F`` the damped empirical Fisher of the last ``m``
    gradients (https://arxiv.org/abs/2107.03356, Section 5; the dynamic algorithm of the module docstring).

    Each step flattens a parameter group's gradients (plus ``weight_decay * p``, coupled as in the reference code)
    into ``g``, puts ``g`` into the group's window in place of the oldest gradient, and preconditions it. The window
    starts as ``m`` zero gradients (they add nothing to ``F``; ``1/m`` stays fixed), as the reference code. With
    ``momentum > 0`` the step uses ``v <- momentum v + (1 - momentum) F^-1 g``. Each group keeps its own window of
    ``m`` float32 gradients over all its parameters (``m d`` numbers): group parameters to bound it. A parameter
    without a gradient counts as a zero gradient.

    Args:
        params: parameters or parameter groups (a group may set any option below).
        lr: step size.
        m: gradient window size (the reference's ``ngrads``, default 1024 there too).
        damp: ``lambda > 0`` (absolute; the reference's default ``1e-5``).
        momentum: in ``[0, 1)``.
        weight_decay: ``>= 0``, added to the gradient before preconditioning.

    Raises:
        ValueError: an option out of range (at construction), or a NaN/Inf gradient (at :meth:`step`).
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float = 1e-3, m: int = 1024,
                 damp: float = 1e-5, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        defaults = {"lr": lr, "m": m, "damp": damp, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_m(group["m"])
            _check_damp(group["damp"])
            if not (isinstance(group["lr"], int | float) and math.isfinite(group["lr"]) and group["lr"] >= 0):
                raise ValueError(f"lr must be a finite float >= 0, got {group['lr']!r}")
            if not 0.0 <= group["momentum"] < 1.0:
                raise ValueError(f"momentum must be in [0, 1), got {group['momentum']!r}")
            if not group["weight_decay"] >= 0.0:
                raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")

    @torch.no_grad()
    def step(self, closure=None):
        """One M-FAC step per parameter group; returns the closure's loss if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            g = torch.cat([(p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                           .reshape(-1) + group["weight_decay"] * p.float().reshape(-1) for p in params])
            _check_finite(g, "gradient")
            state = self.state[params[0]]  # the group's window lives with its first parameter
            if "window" not in state:
                state["window"] = g.new_zeros(group["m"], g.numel())  # (m, d)
                state["gram"] = torch.zeros(group["m"], group["m"], dtype=torch.float64, device=g.device)
                state["next"] = 0
                if group["momentum"] > 0:
                    state["momentum_buffer"] = torch.zeros_like(g)
            window, gram, slot = state["window"], state["gram"], state["next"]
            window[slot] = g
            row = (window @ g).double()  # (m,): G g, the new Gram row
            if not bool(torch.isfinite(row).all()):
                raise ValueError("gradient products overflow float32 (the run diverged): lower lr or raise damp")
            gram[slot, :] = row
            gram[:, slot] = row
            state["next"] = (slot + 1) % group["m"]
            chol = _factor(gram, group["m"], group["damp"])
            y = torch.cholesky_solve(row.unsqueeze(-1), chol).squeeze(-1)  # (m,): A^-1 G g
            direction = (g - y.to(window.dtype) @ window) / group["damp"]  # F^-1 g
            if group["momentum"] > 0:
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(direction, alpha=1.0 - group["momentum"])
                direction = buf
            offset = 0
            for p in params:
                n = p.numel()
                p.add_(direction[offset:offset + n].reshape(p.shape).to(p.dtype), alpha=-group["lr"])
                offset += n
        return loss
