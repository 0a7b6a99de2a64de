"""AdamW with low-rank gradient statistics: GaLore (projected moments) and APOLLO (channel-wise scaling).

Both keep Adam's two moments for a matrix parameter in an ``r``-dimensional projection of its gradient instead of at
full size, so a ``m x n`` matrix costs ``2 r max(m, n)`` state numbers instead of ``2 m n``:

* :class:`GaLoreAdamW` (Zhao et al. 2024, https://arxiv.org/abs/2403.03507) maps the projected Adam direction back
  (``P N`` or ``N P^T``) and applies it, times ``scale``. ``projection="svd"`` refreshes the basis every
  ``update_gap`` steps by randomized subspace iteration warm-started from the previous basis; ``projection="dct"``
  picks DCT columns (SVD-free, https://arxiv.org/abs/2505.17967).
* :class:`APOLLOAdamW` (Zhu et al. 2024, https://arxiv.org/abs/2412.05270) runs Adam on a random projection only to
  estimate, per channel (``scaling="channel"``) or for the whole tensor (``"tensor"``, the rank-1 APOLLO-Mini form),
  how much Adam would rescale the raw gradient, then applies the raw gradient scaled by that ratio, with APOLLO's
  norm-growth limiter.

Everything else is ordinary ``torch.optim``: parameter groups choose what is projected (``rank=None`` is plain AdamW)
and with which ``rank``, ``update_gap``, ``scale`` and projection; ``state_dict``/``load_state_dict`` round-trip
(loading another model's state is an error naming the mismatch); the optimizer works as
``Trainer(optimizers=(opt, scheduler))``. Parameters that are not matrices (biases, norms) in a projected group fall
back to AdamW and are listed by :meth:`LowRankAdamW.describe`; convolutions are projected as ``(out, in * k...)``.
A step whose gradients hold NaN or Inf is skipped whole and counted (:attr:`LowRankAdamW.skipped_steps`).
:meth:`LowRankAdamW.attach_per_layer` updates each parameter during the backward pass and frees its gradient (the
per-layer update of GaLore's paper), so full-size gradients never all exist at once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from rankwise._errors import RankwiseWarning
from rankwise.optim.projection import (
    PROJECTIONS,
    basis,
    matrix_view,
    max_rank,
    project,
    project_back,
    projected_shape,
    refresh,
)

SCALINGS = ("none", "channel", "tensor")
_LIMIT = 1.01  # APOLLO's norm-growth limiter: the scaled gradient's norm grows at most 1 % per step


class LowRankAdamW(torch.optim.Optimizer):
    """The shared engine of :class:`GaLoreAdamW` and :class:`APOLLOAdamW` (see the module docstring).

    Args:
        params: parameters or parameter groups; a group may set any of the options below, and ``names`` (the
            parameters' names, used in messages; :func:`param_groups` fills it).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        rank: the projection rank of matrix parameters (``None``: plain AdamW for this group). A rank above a
            parameter's smaller dimension is clamped to it, with a warning.
        update_gap: steps between refreshes of the projection.
        scale: multiplies the low-rank update (GaLore's alpha, APOLLO's scale).
        projection: ``"svd"``, ``"dct"`` or ``"random"``.
        scaling: ``"none"`` (GaLore: apply the projected direction), ``"channel"`` or ``"tensor"`` (APOLLO).
        seed: seeds the random sketches and projections; the same seed gives the same bytes.
        power_iters: subspace iterations per ``"svd"`` refresh (each costs two products with the gradient; the
            refresh starts from the previous basis, so 1-2 suffice where the spectrum has a gap).
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 rank: int | None = 128, update_gap: int = 200, scale: float = 0.25, projection: str = "svd",
                 scaling: str = "none", seed: int = 0, power_iters: int = 2) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_gap": update_gap, "scale": scale, "projection": projection, "scaling": scaling,
                    "seed": seed, "power_iters": power_iters}
        super().__init__(params, defaults)
        for g, group in enumerate(self.param_groups):
            _check_group(group, g)
        self.skipped_steps = 0
        self._hooks: list[Any] = []
        self._index = {id(p): (g, i) for g, group in enumerate(self.param_groups)
                       for i, p in enumerate(group["params"])}
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                rank = group["rank"]
                if rank is not None and p.ndim >= 2 and rank > max_rank(tuple(p.shape)):
                    warnings.warn(f"rank {rank} is larger than {self._name(g, i)} {tuple(p.shape)} allows; "
                                  f"clamped to {max_rank(tuple(p.shape))}", RankwiseWarning, stacklevel=2)

    # what is projected
    def _name(self, g: int, i: int) -> str:
        names = self.param_groups[g].get("names")
        return f"parameter {names[i]!r}" if names and i < len(names) else f"parameter {i} of group {g}"

    def _rank(self, group: dict, p: torch.Tensor) -> int | None:
        """The projection rank of ``p`` in ``group``, or ``None`` when ``p`` gets plain AdamW."""
        if group["rank"] is None or p.ndim < 2:
            return None
        return min(group["rank"], max_rank(tuple(p.shape)))

    def describe(self) -> dict[str, list[str]]:
        """``{"projected": [...], "adamw": [...]}``: which parameters get low-rank state, which plain AdamW (named
        when the groups carry ``names``)."""
        out: dict[str, list[str]] = {"projected": [], "adamw": []}
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                rank = self._rank(group, p)
                label = self._name(g, i).removeprefix("parameter ").strip("'")
                out["projected" if rank is not None else "adamw"].append(
                    f"{label} {tuple(p.shape)}" + (f" rank {rank}" if rank is not None else ""))
        return out

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (moments, bases, indices)."""
        return sum(t.numel() * t.element_size() for state in self.state.values() for t in state.values()
                   if isinstance(t, torch.Tensor))

    # stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        _require_dense(grads)
        if grads and not _finite(grads):
            self.skipped_steps += 1
            warnings.warn(f"non-finite gradient: step skipped ({self.skipped_steps} so far)", RankwiseWarning,
                          stacklevel=2)
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        step = int(state["step"].item())
        rank = self._rank(group, p)
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        if group["weight_decay"]:
            p.mul_(1.0 - lr * group["weight_decay"])
        if rank is None:
            m, denom, step_size = self._adam(state, grad.float(), beta1, beta2, eps, step)
            if p.dtype == torch.float32:
                p.addcdiv_(m, denom, value=-lr * step_size)
            else:
                p.add_((m / denom).to(p.dtype), alpha=-lr * step_size)
            state["step"] += 1
            return
        G = matrix_view(grad).float()  # (m, n)
        kind = group["projection"]
        if step % group["update_gap"] == 0 or not _has_projection(kind, state):
            g, i = self._index[id(p)]
            refresh(kind, G, rank, state, seed=_mix(group["seed"], g, i, step), power_iters=group["power_iters"])
        P = basis(kind, G, rank, state)  # (rows, r)
        R = project(G, P)  # (r, n) or (m, r)
        m, denom, step_size = self._adam(state, R, beta1, beta2, eps, step)
        N = m.div(denom)  # the projected Adam direction, times c1
        target = matrix_view(p)
        fused = p.dtype == torch.float32 and target.data_ptr() == p.data_ptr() and target.is_contiguous()
        if group["scaling"] == "none":  # GaLore: P N or N P^T, added straight into the weight where possible
            alpha = -lr * group["scale"] * step_size
            if fused and G.shape[0] <= G.shape[1]:
                target.addmm_(P, N, alpha=alpha)
            elif fused:
                target.addmm_(N, P.mT, alpha=alpha)
            else:
                p.add_(project_back(N, P, tuple(G.shape)).reshape(p.shape).to(p.dtype), alpha=alpha)
        else:  # APOLLO: the raw gradient, scaled
            factor = _apollo_factor(G, R, N.mul_(step_size), group["scaling"], state)
            if fused:
                target.addcmul_(G, factor, value=-lr * group["scale"])
            else:
                p.add_((G * factor).reshape(p.shape).to(p.dtype), alpha=-lr * group["scale"])
        state["step"] += 1

    @staticmethod
    def _adam(state: dict, g: torch.Tensor, beta1: float, beta2: float, eps: float,
              step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Update the moments with ``g``; return ``(m, denom, step_size)`` whose ``step_size * m / denom`` is the
        bias-corrected Adam direction (``denom = sqrt(v / c2) + eps``, ``step_size = 1 / c1``)."""
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        t = step + 1
        c1, c2 = 1.0 - beta1**t, 1.0 - beta2**t
        denom = v.sqrt().div_(math.sqrt(c2)).add_(eps)
        return m, denom, 1.0 / c1

    # per-layer updates
    def attach_per_layer(self) -> None:
        """Update each parameter as soon as its gradient is complete during ``backward()`` and free that gradient.

        Call once; then ``loss.backward()`` does the update and :meth:`step` has nothing left to do. Gradient
        accumulation over several backward passes and global gradient clipping are not possible in this mode (each
        gradient is consumed as it arrives). A parameter whose gradient is not finite keeps its value; the backward
        pass counts one skipped step however many such parameters it met.
        """
        if self._hooks:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._per_layer_hook(group)))

    def detach_per_layer(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _per_layer_hook(self, group: dict) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            _require_dense([p.grad])
            with torch.no_grad():
                if bool(torch.isfinite(p.grad).all()):
                    self._update(p, p.grad, group)
                else:
                    self.skipped_steps += 1
                    warnings.warn(f"non-finite gradient in a per-layer update: {self._name(*self._index[id(p)])} "
                                  "left unchanged", RankwiseWarning, stacklevel=2)
            p.grad = None

        return hook

    # saving and resuming
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["rankwise"] = {"skipped_steps": self.skipped_steps,
                           "shapes": [[list(p.shape) for p in group["params"]] for group in self.param_groups]}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("rankwise", None)
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}: it belongs to another model or setup")
        if extra is not None:
            for g, (shapes, group) in enumerate(zip(extra["shapes"], self.param_groups, strict=True)):
                if len(shapes) != len(group["params"]):
                    raise ValueError(f"optimizer state's group {g} has {len(shapes)} parameters, this optimizer's has "
                                     f"{len(group['params'])}: it belongs to another model")
                for i, (shape, p) in enumerate(zip(shapes, group["params"], strict=True)):
                    if tuple(shape) != tuple(p.shape):
                        raise ValueError(f"optimizer state for {self._name(g, i)} was saved for shape {tuple(shape)}, "
                                         f"the parameter has {tuple(p.shape)}: it belongs to another model")
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            for key in ("rank", "projection", "scaling"):
                if saved.get(key) != group[key]:
                    raise ValueError(f"optimizer state's group {g} has {key}={saved.get(key)!r}, this optimizer has "
                                     f"{group[key]!r}")
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts state to each parameter's dtype; ours is float32 / indices
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.long() if key == "indices" else value.float()
        self._check_loaded_state()
        self.skipped_steps = int(extra["skipped_steps"]) if extra is not None else 0

    def _check_loaded_state(self) -> None:
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                state = self.state.get(p)
                if not state or "exp_avg" not in state:
                    continue
                rank = self._rank(group, p)
                want = tuple(p.shape) if rank is None else projected_shape(tuple(p.shape), rank)
                got = tuple(state["exp_avg"].shape)
                if got != want:
                    raise ValueError(f"optimizer state for {self._name(g, i)} {tuple(p.shape)} holds moments of "
                                     f"shape {got}, expected {want}: it belongs to another model or rank")


class GaLoreAdamW(LowRankAdamW):
    """GaLore: AdamW on gradients projected to rank ``r`` (Zhao et al. 2024, https://arxiv.org/abs/2403.03507).

    ``projection="svd"`` (default) refreshes the top-``r`` singular basis every ``update_gap`` steps with randomized
    subspace iteration warm-started from the previous basis; ``projection="dct"`` is the SVD-free variant (DCT
    columns best aligned with the gradient, only their indices stored; https://arxiv.org/abs/2505.17967). Defaults
    follow the paper: ``rank=128``, ``update_gap=200``, ``scale=0.25``.
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 rank: int | None = 128, update_gap: int = 200, scale: float = 0.25, projection: str = "svd",
                 seed: int = 0, power_iters: int = 2) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, update_gap=update_gap, scale=scale,
                         projection=projection, scaling="none", seed=seed, power_iters=power_iters)


class APOLLOAdamW(LowRankAdamW):
    """APOLLO: the raw gradient scaled per channel by the ratio Adam applies in a random rank-``r`` projection (Zhu
    et al. 2024, https://arxiv.org/abs/2412.05270). ``scaling="tensor"`` with ``rank=1`` is APOLLO-Mini.

    Defaults follow the paper: ``rank=256``, ``update_gap=200``, ``scale=1.0`` (APOLLO-Mini uses ``scale=128``).
    """

    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, *,
                 rank: int | None = 256, update_gap: int = 200, scale: float = 1.0, scaling: str = "channel",
                 seed: int = 0) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, update_gap=update_gap, scale=scale,
                         projection="random", scaling=scaling, seed=seed)


def param_groups(model: nn.Module, *, rank: int, include: Callable[[str, nn.Parameter], bool] | None = None,
                 **options: Any) -> list[dict[str, Any]]:
    """Two parameter groups for a model: its projected matrices and the rest (plain AdamW), each with ``names``.

    By default the matrices of linear and convolution layers are projected, except embeddings and the output layer
    (as in GaLore's experiments); ``include(name, param)`` decides instead when given. ``options`` (``update_gap``,
    ``scale`` ...) go to the projected group.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) or m is output for p in m.parameters()}
    low, rest = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        chosen = include(name, p) if include is not None else (p.ndim >= 2 and id(p) not in skip)
        target = low if chosen else rest
        target[0].append(p)
        target[1].append(name)
    groups = []
    if low[0]:
        groups.append({"params": low[0], "names": low[1], "rank": rank, **options})
    if rest[0]:
        groups.append({"params": rest[0], "names": rest[1], "rank": None})
    return groups


def _check_group(group: dict, g: int) -> None:
    rank = group["rank"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None (group {g}), got {rank!r}")
    if isinstance(group["update_gap"], bool) or not isinstance(group["update_gap"], int) or group["update_gap"] < 1:
        raise ValueError(f"update_gap must be a positive integer (group {g}), got {group['update_gap']!r}")
    if isinstance(group["power_iters"], bool) or not isinstance(group["power_iters"], int) or group["power_iters"] < 0:
        raise ValueError(f"power_iters must be an integer >= 0 (group {g}), got {group['power_iters']!r}")
    if group["projection"] not in PROJECTIONS:
        raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)} (group {g}), got {group['projection']!r}")
    if group["scaling"] not in SCALINGS:
        raise ValueError(f"scaling must be one of {', '.join(SCALINGS)} (group {g}), got {group['scaling']!r}")
    for key, low in (("lr", 0.0), ("eps", 0.0), ("weight_decay", 0.0)):
        if not (isinstance(group[key], int | float) and math.isfinite(group[key]) and group[key] >= low):
            raise ValueError(f"{key} must be a finite number >= {low} (group {g}), got {group[key]!r}")
    if not all(0.0 <= b < 1.0 for b in group["betas"]):
        raise ValueError(f"betas must be in [0, 1) (group {g}), got {group['betas']!r}")
    if not (math.isfinite(group["scale"]) and group["scale"] > 0):
        raise ValueError(f"scale must be a positive number (group {g}), got {group['scale']!r}")


def _has_projection(kind: str, state: dict) -> bool:
    return {"svd": "basis", "dct": "indices", "random": "seed"}[kind] in state


def _require_dense(grads: list[torch.Tensor]) -> None:
    if any(g.is_sparse for g in grads):
        raise ValueError("sparse gradients are not supported; use torch.optim.SparseAdam")


def _finite(grads: list[torch.Tensor]) -> bool:
    """Whether every gradient is free of NaN and Inf: one fused norm pass per device, and the exact element check
    only when a norm is not finite (a norm can overflow on finite values near the float32 limit)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for same in by_device.values():
        norms = torch.stack([n.float() for n in torch._foreach_norm(same)])
        if not bool(torch.isfinite(norms).all()) and not all(bool(torch.isfinite(g).all()) for g in same):
            return False
    return True


def _mix(*values: int) -> int:
    """A seed from several integers (deterministic, unlike ``hash``)."""
    out = 0x9E3779B97F4A7C15
    for v in values:
        out = (out ^ (int(v) + 0x9E3779B97F4A7C15 + (out << 6) + (out >> 2))) & 0xFFFFFFFFFFFFFFFF
    return out


def _norms(X: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norms along ``dim`` (several times faster on CPU than ``norm(dim=0)`` of a row-major matrix)."""
    return X.square().sum(dim).sqrt_()


def _times(f: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``f * norms`` with ``0 * inf = 0`` (a zero factor on an overflowing norm scales the channel to zero)."""
    return torch.where(f == 0, torch.zeros_like(norms), f * norms)


def _apollo_factor(G: torch.Tensor, R: torch.Tensor, N: torch.Tensor, scaling: str, state: dict) -> torch.Tensor:
    """The factor APOLLO multiplies ``G`` by, shaped to broadcast against it: how much Adam scaled the projection
    ``R`` into ``N``, per channel or for the whole tensor, with the norm-growth limiter folded in. The scaled
    gradient's norm comes from the channel norms of ``G``, so the scaled gradient itself is never formed here."""
    if scaling == "tensor":
        f = N.norm() / (R.norm() + 1e-8)
        factor = f.reshape(1, 1)
        norm = _times(f, G.norm())
    else:
        dim = 0 if G.shape[0] <= G.shape[1] else 1  # the projected dimension: norms over it, one per channel
        f = _norms(N, dim) / (_norms(R, dim) + 1e-8)  # (n,) or (m,)
        factor = f[None, :] if dim == 0 else f[:, None]
        norm = torch.linalg.vector_norm(_times(f, _norms(G, dim)))
    if "scaled_norm" in state:
        limiter = torch.clamp(norm / (state["scaled_norm"] + 1e-8) / _LIMIT, min=1.0)
        factor = factor / limiter
        norm = norm / limiter
    state["scaled_norm"] = norm.reshape(())
    return factor
