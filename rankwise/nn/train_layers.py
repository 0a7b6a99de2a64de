"""Layers for training from scratch with fewer trainable numbers than ``nn.Linear``: SLTrain (low rank plus a fixed
random sparse support) and SST (sparse spectral training), and :func:`replace_linears` to put them into a model
built from a config.

* :class:`SLTrainLinear` (Han et al. 2024, https://arxiv.org/abs/2406.02214): ``W = (alpha / r) B A + S``; ``S`` has
  a random support of ``density * out * in`` entries drawn once from a seed and never changed; its values, ``B`` and
  ``A`` are trained. Parameters: ``r (in + out) + nnz``.
* :class:`SSTLinear` (Zhao et al. 2024, https://arxiv.org/abs/2405.15481): ``W = U diag(s) V^T`` at full rank; every
  singular value is trained, but only ``r`` singular vector pairs at a time, sampled with probability proportional to
  their singular values (:meth:`SSTLinear.resample`); the factors are re-orthogonalised by an SVD of ``W``
  periodically (:meth:`SSTLinear.reorthogonalize`). The optimizer holds state for ``s`` and the ``r`` active pairs
  only. :class:`SSTSchedule` calls both on a step schedule and clears the optimizer state of the swapped vectors.
* :class:`LOSTLinear` (Li et al. 2025, https://arxiv.org/abs/2508.02668): a low-rank path and a channel-wise sparse
  path mixed by a fixed ``gamma``, both initialised from one SVD of a random weight: the top ``r`` singular pairs
  become the low-rank factors, and the input channels (columns) that carry the most of the remaining spectrum
  become the sparse path, stored dense as those columns only. Parameters: ``r (in + out) + out * k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.linalg import svd_flip


def _check_rank(rank: int, in_features: int, out_features: int) -> None:
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(f"rank must be in [1, {min(in_features, out_features)}], got {rank}")


def _random_linear_svd(out_features: int, in_features: int, generator: torch.Generator,
                       dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``(W, U, S, Vh)``: a weight drawn as ``nn.Linear`` draws it (uniform in ``+-1/sqrt(in)``, its Kaiming-uniform
    default) and its SVD, signs fixed by :func:`svd_flip`."""
    bound = 1.0 / math.sqrt(in_features)
    W = (torch.rand(out_features, in_features, generator=generator, dtype=dtype) * 2 - 1) * bound
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, Vh = svd_flip(U, Vh)
    return W, U, S, Vh


class SLTrainLinear(nn.Module):
    """``y = x ((alpha / r) B A + S)^T + b`` with a fixed random sparse support for ``S``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: ``r``, the rank of the low-rank part.
        density: fraction of the ``out x in`` entries in the sparse support (the paper uses 0.03-0.05).
        alpha: the low-rank part's scale numerator (the paper's default is 32 for rank 128, i.e. ``alpha / r =
            0.25``).
        bias: add a bias.
        seed: draws the support and the initial values (the same seed, the same layer).

    Initialisation: ``A`` and ``B`` Kaiming-uniform as ``nn.Linear`` (fan-in ``in`` and ``r``), so that
    ``(alpha / r) B A`` starts near ``nn.Linear``'s scale; ``S``'s values uniform in ``+-1/sqrt(in)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, density: float = 0.03,
                 alpha: float = 32.0, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        _check_rank(rank, in_features, out_features)
        if not 0.0 <= density < 1.0:
            raise ValueError(f"density must be in [0, 1), got {density}")
        self.in_features, self.out_features, self.rank, self.alpha = in_features, out_features, rank, alpha
        g = torch.Generator().manual_seed(seed)
        bound_a, bound_b = 1.0 / math.sqrt(in_features), 1.0 / math.sqrt(rank)
        self.A = nn.Parameter((torch.rand(rank, in_features, generator=g) * 2 - 1) * bound_a)  # (r, in)
        self.B = nn.Parameter((torch.rand(out_features, rank, generator=g) * 2 - 1) * bound_b)  # (out, r)
        nnz = round(density * out_features * in_features)
        support = torch.randperm(out_features * in_features, generator=g)[:nnz].sort().values
        self.register_buffer("support", support)  # flat indices into the (out, in) matrix, fixed
        self.values = nn.Parameter((torch.rand(nnz, generator=g) * 2 - 1) * bound_a)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_weight(self) -> torch.Tensor:
        W = (self.alpha / self.rank) * (self.B @ self.A)  # (out, in)
        return W.flatten().index_add(0, self.support, self.values.to(W.dtype)).view_as(W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nnz={self.values.numel()}, alpha={self.alpha}")


class SSTLinear(nn.Module):
    """``y = x (U diag(s) V^T)^T + b`` with only ``rank`` singular vector pairs trainable at a time.

    ``U`` (``out x k``) and ``V`` (``in x k``), ``k = min(in, out)``, are buffers; the active pairs are the parameters
    ``U_active`` / ``V_active`` (``out x r``, ``in x r``), written into place by :meth:`commit` before a resample or a
    re-orthogonalisation. ``s`` (``k``) is always trained. Starts from the SVD of an ``nn.Linear``-initialised matrix.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        _check_rank(rank, in_features, out_features)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.generator = torch.Generator().manual_seed(seed)
        _, U, S, Vh = _random_linear_svd(out_features, in_features, self.generator, torch.float32)
        self.register_buffer("U", U.contiguous())  # (out, k)
        self.register_buffer("V", Vh.mT.contiguous())  # (in, k)
        self.s = nn.Parameter(S.clone())
        self.register_buffer("active", torch.zeros(rank, dtype=torch.long))
        self.U_active = nn.Parameter(torch.empty(out_features, rank))
        self.V_active = nn.Parameter(torch.empty(in_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._select()

    @property
    def num_params(self) -> int:
        """Weights stored (all singular vectors, values and bias), not only the trainable ones."""
        return self.U.numel() + self.V.numel() + self.s.numel() + (self.bias.numel() if self.bias is not None else 0)

    def _select(self) -> None:
        probs = self.s.detach().abs().float().clamp_min(1e-12)
        self.active = torch.multinomial(probs, self.rank, replacement=False, generator=self.generator).sort().values
        with torch.no_grad():
            self.U_active.copy_(self.U[:, self.active])
            self.V_active.copy_(self.V[:, self.active])

    @torch.no_grad()
    def commit(self) -> None:
        """Write the active pairs back into ``U`` and ``V``."""
        self.U[:, self.active] = self.U_active.to(self.U.dtype)
        self.V[:, self.active] = self.V_active.to(self.V.dtype)

    @torch.no_grad()
    def resample(self) -> None:
        """Commit the active pairs and draw ``rank`` new ones (probability proportional to ``s``)."""
        self.commit()
        self._select()

    @torch.no_grad()
    def reorthogonalize(self) -> None:
        """Replace ``U diag(s) V^T`` by its SVD (same matrix, orthonormal factors), then draw new active pairs."""
        self.commit()
        U, S, Vh = torch.linalg.svd(self.dense_weight().double(), full_matrices=False)
        U, Vh = svd_flip(U, Vh)
        self.U.copy_(U.to(self.U.dtype))
        self.V.copy_(Vh.mT.to(self.V.dtype))
        self.s.copy_(S.to(self.s.dtype))
        self._select()

    def dense_weight(self) -> torch.Tensor:
        U = self.U.index_copy(1, self.active, self.U_active.to(self.U.dtype))  # (out, k), active columns trainable
        V = self.V.index_copy(1, self.active, self.V_active.to(self.V.dtype))  # (in, k)
        return (U * self.s) @ V.mT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()  # the next resample's draws: saved, so a resumed run draws the same

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, active rank={self.rank}"


class LOSTLinear(nn.Module):
    """``y = gamma * act(x A) B + (1 - gamma) * x[..., I] S^T + b``: low rank plus channel-wise sparse (LOST).

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: ``r``, the rank of the low-rank path (``A``: ``in x r``, ``B``: ``r x out``).
        channels: fraction of the input channels kept by the sparse path (``k = round(channels * in)`` columns,
            ``S``: ``out x k``).
        gamma: the fixed mix of the two paths (the paper's ablation favours 0.9).
        activation: ``"silu"`` (a nonlinearity between the factors, as the paper's low-rank path) or ``None``
            (linear: then :meth:`dense_weight` gives the equivalent ``nn.Linear`` weight).
        bias: add a bias.
        seed: draws the random weight the layer is initialised from (the same seed, the same layer).

    Initialisation (the paper's SVD split): a weight ``W0`` drawn as ``nn.Linear`` draws it is decomposed
    ``W0 = U diag(s) V^T``; ``A = V_r sqrt(s_r)`` and ``B = sqrt(s_r) U_r^T`` carry the top ``r`` pairs; the
    remainder ``W0 - U_r diag(s_r) V_r^T`` scores every input channel by the norm of its column, and the ``k``
    best-scoring channels ``I`` (sorted; the fixed buffer ``sparse_channels``) take their columns of the remainder
    as ``S``. ``A``, ``B`` and ``S`` are trained; ``I`` and ``gamma`` are not. The sparse path is one dense product
    with the gathered columns, so it needs no sparse kernels.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, channels: float = 0.05,
                 gamma: float = 0.9, activation: str | None = "silu", bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        _check_rank(rank, in_features, out_features)
        if not 0.0 <= channels <= 1.0:
            raise ValueError(f"channels must be a fraction in [0, 1], got {channels}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if activation not in ("silu", None):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.gamma, self.activation = float(gamma), activation
        W0, U, S, Vh = _random_linear_svd(out_features, in_features, torch.Generator().manual_seed(seed),
                                          torch.float64)
        root = S[:rank].sqrt()
        self.A = nn.Parameter((Vh[:rank].mT * root).float())  # (in, r)
        self.B = nn.Parameter((root[:, None] * U[:, :rank].mT).float())  # (r, out)
        rest = W0 - (U[:, :rank] * S[:rank]) @ Vh[:rank]
        k = round(channels * in_features)
        index = rest.norm(dim=0).topk(k).indices.sort().values if k else torch.zeros(0, dtype=torch.long)
        self.register_buffer("sparse_channels", index)  # the input channels of the sparse path, fixed
        self.S = nn.Parameter(rest[:, index].float())  # (out, k)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def dense_weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight of the equivalent ``nn.Linear`` (only without an activation)."""
        if self.activation is not None:
            raise ValueError("a LOSTLinear with an activation between its factors has no equivalent dense weight")
        W = self.gamma * (self.A @ self.B).mT
        return W.index_add(1, self.sparse_channels, (1.0 - self.gamma) * self.S)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.A
        if self.activation == "silu":
            h = F.silu(h)
        y = self.gamma * (h @ self.B)
        if self.S.shape[1]:
            y = y + (1.0 - self.gamma) * (x.index_select(-1, self.sparse_channels) @ self.S.mT)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"channels={self.S.shape[1]}, gamma={self.gamma}, activation={self.activation}")


class SSTSchedule:
    """Resample every SST layer's active pairs every ``resample_every`` steps and re-orthogonalise every
    ``reorthogonalize_every`` steps; the optimizer state of the swapped-in vectors is cleared (new vectors, new
    moments). Call :meth:`step` after each ``optimizer.step()``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, resample_every: int = 200,
                 reorthogonalize_every: int = 1000) -> None:
        if resample_every < 1 or reorthogonalize_every < 1:
            raise ValueError("resample_every and reorthogonalize_every must be positive step counts")
        self.layers = [m for m in model.modules() if isinstance(m, SSTLinear)]
        self.optimizer = optimizer
        self.resample_every, self.reorthogonalize_every = resample_every, reorthogonalize_every
        self.steps = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps % self.reorthogonalize_every == 0:
            action = SSTLinear.reorthogonalize
        elif self.steps % self.resample_every == 0:
            action = SSTLinear.resample
        else:
            return
        for layer in self.layers:
            action(layer)
            for p in (layer.U_active, layer.V_active) + ((layer.s,) if action is SSTLinear.reorthogonalize else ()):
                self.optimizer.state.pop(p, None)

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = int(state["steps"])


def replace_linears(model: nn.Module, factory: Callable[[nn.Linear, str], nn.Module],
                    include: Callable[[str, nn.Linear], bool] | None = None) -> list[str]:
    """Replace ``nn.Linear`` modules of ``model`` by ``factory(linear, name)``, in place; return the names replaced.

    By default every linear layer inside the model except the output layer (``get_output_embeddings``) is replaced;
    ``include(name, linear)`` decides instead when given.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output
              and (include is None or include(name, m))]
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factory(module, name))
    return [name for name, _ in chosen]
