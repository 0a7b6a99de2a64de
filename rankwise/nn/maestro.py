"""Maestro: a factorised linear layer trained with low-rank ordered dropout, so that its factor pairs order themselves
by importance and the trailing ones can be cut.

Maestro (Horváth et al., ICML 2024, https://arxiv.org/abs/2308.14929) writes a layer as ``W = U V^T`` (``U``:
``out x r``, ``V``: ``in x r``, ``r`` up to ``min(in, out)``) and trains it with LOD, ordered dropout over the factor
pairs: a training pass samples a rank ``b`` and uses only the first ``b`` columns of ``U`` and ``V``, so the first
pairs must carry the most (for a linear map on uniformly distributed data this recovers the SVD). A hierarchical group
lasso on the pairs pushes the trailing ones to zero, and progressive shrinking drops the pairs whose importance fell
below a threshold, which gives each layer its learned rank. At evaluation the full (shrunk) rank is used.

What follows the authors' code (github.com/SamuelHorvath/Maestro-LoD, ``maestro/layers/linear.py``,
``maestro/samplers``, ``cifar_mnist_main.py``) rather than only the paper's text:

* initialisation: the SVD of the layer's dense weight split as ``U = U_r sqrt(s)``, ``V = V_r sqrt(s)`` (their
  ``decompose_linear``, applied to the freshly initialised model when training from scratch);
* the hierarchical group lasso of pair ``b``: ``sqrt(sum_{j >= b} ||v_j||^2) + sqrt(sum_{j >= b} ||u_j||^2)``
  (norms of the tails), summed over pairs and layers, times ``lasso`` (their default ``5e-3``);
* importance of pair ``b``: the product of the two tail norms; it never increases with ``b``, so shrinking at a
  threshold (their default ``1e-5``, once per epoch) always keeps a prefix of the pairs;
* sampling (:class:`MaestroSchedule`): ``"layer"`` (the one their paper uses) picks one (layer, rank) pair uniformly
  among all layers' ranks and truncates that layer only; ``"independent"`` draws every layer's rank uniformly in
  ``[1, r]``. Their training step adds the loss of a full pass and of a sampled pass (the sampled pass fitted to the
  full pass's detached predictions) and the penalty: :meth:`MaestroSchedule.sample` / :meth:`MaestroSchedule.full`
  switch between the two passes.

Their reference samples the (layer, rank) pairs by shuffling the whole list once per sweep; here each pass draws one
uniformly (the same distribution per pass, drawn with replacement).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.linalg import svd_flip

SAMPLERS = ("layer", "independent")


def _check_count(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


class MaestroLinear(nn.Module):
    """``y = x V_b U_b^T + bias``: a factorised linear layer with ordered dropout over its factor pairs.

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: the number of factor pairs ``r`` (default and most ``min(in, out)``: full rank).
        bias: add a bias.
        seed: draws the random dense weight the layer is initialised from (``nn.Linear``'s default distribution,
            uniform in ``+-1/sqrt(in)``), whose top ``r`` singular pairs become ``U`` and ``V``.

    ``active_rank`` (set by :class:`MaestroSchedule`) makes the next training passes use only the first
    ``active_rank`` pairs; ``None``, or evaluation mode, uses all ``rank`` pairs. Build one from an existing layer with
    :meth:`from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, *, bias: bool = True,
                 seed: int = 0) -> None:
        super().__init__()
        top = min(in_features, out_features)
        rank = top if rank is None else _check_count(rank, "rank", 1, top)
        self.in_features, self.out_features = in_features, out_features
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(in_features)
        W = (torch.rand(out_features, in_features, generator=g, dtype=torch.float64) * 2 - 1) * bound
        U, V = _split_svd(W, rank)
        self.U = nn.Parameter(U.float())  # (out, r)
        self.V = nn.Parameter(V.float())  # (in, r)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.active_rank: int | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None) -> MaestroLinear:
        """The layer whose ``U V^T`` is the rank-``rank`` truncated SVD of ``linear.weight`` (exact at full rank),
        with its bias, dtype and device."""
        top = min(linear.in_features, linear.out_features)
        rank = top if rank is None else _check_count(rank, "rank", 1, top)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.active_rank = linear.in_features, linear.out_features, None
        U, V = _split_svd(linear.weight.detach().double(), rank)
        dtype, device = linear.weight.dtype, linear.weight.device
        layer.U = nn.Parameter(U.to(device=device, dtype=dtype))  # (out, r)
        layer.V = nn.Parameter(V.to(device=device, dtype=dtype))  # (in, r)
        layer.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        return layer

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def num_params(self) -> int:
        """Values stored: ``rank (in + out)`` plus the bias."""
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.bias is not None else 0)

    def dense_weight(self) -> torch.Tensor:
        return self.U @ self.V.mT  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.rank if self.active_rank is None or not self.training else min(self.active_rank, self.rank)
        h = x @ self.V[:, :b].to(x.dtype)  # (..., b)
        return F.linear(h, self.U[:, :b].to(x.dtype), self.bias)

    # the group lasso and the importance of each pair
    def group_lasso(self, hierarchical: bool = True) -> torch.Tensor:
        """``(rank,)``: per pair, the norm of ``v_b`` plus that of ``u_b`` (``hierarchical``: of the tails
        ``v_b..v_r`` and ``u_b..u_r``); differentiable."""
        v2, u2 = self.V.pow(2).sum(0), self.U.pow(2).sum(0)  # (r,) each
        if hierarchical:
            v2, u2 = v2.flip(0).cumsum(0).flip(0), u2.flip(0).cumsum(0).flip(0)
        return v2.sqrt() + u2.sqrt()

    @torch.no_grad()
    def importance(self, hierarchical: bool = True) -> torch.Tensor:
        """``(rank,)``: per pair, the product of the two norms of :meth:`group_lasso` (non-increasing when
        ``hierarchical``)."""
        v2, u2 = self.V.pow(2).sum(0), self.U.pow(2).sum(0)
        if hierarchical:
            v2, u2 = v2.flip(0).cumsum(0).flip(0), u2.flip(0).cumsum(0).flip(0)
        return (v2.sqrt() * u2.sqrt()).float()

    # cutting pairs
    @torch.no_grad()
    def truncate(self, rank: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep the first ``rank`` pairs (``0 <= rank <= self.rank``). ``U`` and ``V`` become new parameters (a
        parameter's autograd bookkeeping keeps its old shape while a previous graph is alive); with ``optimizer``
        they replace the old ones in its groups, and every state tensor shaped like the old one (Adam's moments) is
        cut to match."""
        rank = _check_count(rank, "rank", 0, self.rank)
        for name in ("U", "V"):
            old = getattr(self, name)
            new = nn.Parameter(old.detach()[:, :rank].clone(), requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = old.grad[:, :rank].clone()
            setattr(self, name, new)
            if optimizer is None:
                continue
            for group in optimizer.param_groups:
                group["params"] = [new if q is old else q for q in group["params"]]
            if old in optimizer.state:
                state = optimizer.state.pop(old)
                optimizer.state[new] = {k: v[:, :rank].clone() if isinstance(v, torch.Tensor) and v.shape == old.shape
                                        else v for k, v in state.items()}
        if self.active_rank is not None:
            self.active_rank = min(self.active_rank, rank)

    def shrink(self, threshold: float, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Progressive shrinking: drop the trailing pairs whose hierarchical importance is below ``threshold``;
        return the rank kept."""
        if not (isinstance(threshold, numbers.Real) and math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite importance >= 0, got {threshold!r}")
        keep = int((self.importance(hierarchical=True) >= threshold).sum())  # a prefix: importance never increases
        self.truncate(keep, optimizer)
        return keep

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding ``U V^T`` (and the bias), for dense export or compression."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def _split_svd(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r sqrt(s_r), V_r sqrt(s_r))`` of ``W``'s SVD, signs fixed by :func:`svd_flip`."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, Vh = svd_flip(U, Vh)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, Vh[:rank].mT * root


class MaestroSchedule:
    """Ordered-dropout sampling, the group-lasso penalty and progressive shrinking for every :class:`MaestroLinear`
    of a model.

    Args:
        model: the model (its ``MaestroLinear`` modules are found by name, in model order).
        optimizer: the optimizer over the model's parameters; given, shrinking cuts its state too.
        sampler: ``"layer"`` (one layer truncated per sampled pass, (layer, rank) uniform over all pairs: the
            paper's choice) or ``"independent"`` (every layer's rank uniform in ``[1, r]``).
        lasso: the weight of the hierarchical group lasso in :meth:`penalty` (the authors' default ``5e-3``).
        threshold: the importance below which :meth:`shrink` drops trailing pairs (their default ``1e-5``).
        shrink_every: shrink every this many :meth:`step` calls (``None``: never automatically; the authors shrink
            once per epoch).
        seed: seeds the rank draws (the same seed, the same draws).

    A training step, as the authors' code::

        schedule.full();  full = model(x)                      # all pairs
        schedule.sample(); part = model(x)                     # a sampled prefix
        schedule.full()
        loss = ce(full, y) + ce(part, softmax(full).detach()) + schedule.penalty()
        loss.backward(); optimizer.step(); schedule.step()
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, sampler: str = "layer",
                 lasso: float = 5e-3, threshold: float = 1e-5, shrink_every: int | None = None,
                 seed: int = 0) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        for name, value in (("lasso", lasso), ("threshold", threshold)):
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite value >= 0, got {value!r}")
        if shrink_every is not None and (isinstance(shrink_every, bool) or not isinstance(shrink_every, int)
                                         or shrink_every < 1):
            raise ValueError(f"shrink_every must be None or a step count >= 1, got {shrink_every!r}")
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, MaestroLinear)}
        if not self.layers:
            raise ValueError("model has no MaestroLinear layers (put them in with replace_linears)")
        self.optimizer, self.sampler = optimizer, sampler
        self.lasso, self.threshold, self.shrink_every = float(lasso), float(threshold), shrink_every
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0

    def __iter__(self) -> Iterator[tuple[str, MaestroLinear]]:
        return iter(self.layers.items())

    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.layers.items()}

    def full(self) -> None:
        """Every layer uses all its pairs in the next passes."""
        for m in self.layers.values():
            m.active_rank = None

    def sample(self) -> dict[str, int]:
        """Draw the ranks of the next (sampled) pass and set them; return ``{name: rank}`` of the truncated layers."""
        self.full()
        layers = [(n, m) for n, m in self.layers.items() if m.rank > 0]
        if not layers:
            return {}
        if self.sampler == "independent":
            drawn = {n: int(torch.randint(1, m.rank + 1, (1,), generator=self.generator)) for n, m in layers}
        else:
            widths = torch.tensor([m.rank for _, m in layers])
            k = int(torch.randint(int(widths.sum()), (1,), generator=self.generator))
            i = int(torch.searchsorted(widths.cumsum(0), torch.tensor(k), right=True))
            drawn = {layers[i][0]: k - int(widths[:i].sum()) + 1}
        for name, b in drawn.items():
            self.layers[name].active_rank = b
        return drawn

    def penalty(self) -> torch.Tensor:
        """``lasso`` times the hierarchical group lasso summed over every pair of every layer (add it to the loss)."""
        total = sum(m.group_lasso(hierarchical=True).sum() for m in self.layers.values())
        return self.lasso * total

    def shrink(self) -> dict[str, int]:
        """Drop, in every layer, the trailing pairs whose importance is below ``threshold``; return the ranks."""
        return {name: m.shrink(self.threshold, self.optimizer) for name, m in self.layers.items()}

    def step(self) -> dict[str, int] | None:
        """Count one optimizer step; shrink every ``shrink_every`` steps (returning the ranks, else ``None``)."""
        self.steps += 1
        if self.shrink_every is not None and self.steps % self.shrink_every == 0:
            return self.shrink()
        return None

    def state_dict(self) -> dict:
        return {"steps": self.steps, "generator": self.generator.get_state(), "ranks": self.ranks()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the step count and the draws; every layer must already hold the saved rank (truncate a fresh
        model to ``state["ranks"]`` before loading its weights)."""
        wrong = {n: r for n, r in state.get("ranks", {}).items() if n in self.layers and self.layers[n].rank != r}
        if wrong:
            raise ValueError(f"layers have other ranks than the saved state: {wrong} (truncate them first)")
        self.steps = int(state["steps"])
        self.generator.set_state(state["generator"])
