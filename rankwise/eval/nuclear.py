"""Matrix Nuclear-Norm: a label-free score of a causal LM. Li, Xia, Wu and Chang, "Large Language Model Evaluation via
Matrix Nuclear-Norm", 2024, https://arxiv.org/abs/2410.10672 (code: https://github.com/MLGroupJLU/MatrixNuclearNorm).

Per sequence (here: per evaluation window of ``L`` tokens) the paper takes the model's ``(L, d)`` output matrix ``R``
(its released code: the last hidden state, the input of the LM head), normalises it

    ``X = (R - mean_rows(R)) / ||row||_2``   (centre each column over the tokens, then every row to unit length)

and scores it ``||X||_* / L`` (the nuclear norm, its sum of singular values, divided by the number of rows). As the
nuclear norm needs an SVD, the paper replaces it by the L1,2-norm of the ``D = min(L, d)`` largest columns (Cui et al.,
Fast Batch Nuclear-norm Maximization, https://arxiv.org/abs/2107.06154)

    ``MNN(X) = sum of the D largest ||X[:, j]||_2, divided by L``,

the value the paper reports as "Matrix Nuclear-Norm". The model's score is the mean over the sequences.

Where the approximation stands: with ``|X| = (X^T X)^{1/2}``, ``||X[:, j]||_2 = ||(|X|)[:, j]||_2 >= |X|_jj`` and
``||X||_* = trace |X|``, so the sum over *all* columns bounds the nuclear norm from above, with equality exactly when
the columns are orthogonal (as for uncentred one-hot rows, the case Cui et al. derive it for; centring tilts them).
Keeping only the ``D`` largest columns can fall below the nuclear norm when more than ``D`` columns are non-zero, so
the approximation is neither a bound nor exact in general. Both values lie in ``[0, sqrt(D / L)]`` (``[0, 1]`` when
``L <= d``): 0 for a window whose rows are all equal (nothing is left after centring); one-hot rows on ``L`` distinct
columns give the approximation's top, 1, and the exact ``sqrt((L - 1) / L)`` (centring removes one dimension and
tilts the columns).

Which direction is better: the paper reads a *lower* value as better compression (it falls as the model grows, as the
loss does); Batch Nuclear-norm Maximization reads a higher value on class probabilities as more confident, diverse
predictions. ``matrix="probs"`` scores the next-token probabilities (after softmax, ``(L, vocab)``) with the same
normalisation instead of the hidden state; ``benchmarks/nuclear_metric.py`` measures how either tracks perplexity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rankwise.linalg import squared_singular_values
from rankwise.progress import progress_bar

MATRICES = ("hidden", "probs")


@dataclass(frozen=True)
class NuclearConfig:
    """One variant of the score.

    Attributes:
        matrix: which ``(L, .)`` matrix of each window: ``"hidden"``, the last hidden state (the LM head's input,
            as the paper's code), or ``"probs"``, the next-token probabilities (softmax of the logits).
        approx: the paper's L1,2-norm of the ``D`` largest columns (no SVD); ``False``: the exact nuclear norm
            (:func:`nuclear_norm`).
    """

    matrix: Literal["hidden", "probs"] = "hidden"
    approx: bool = True

    def __post_init__(self) -> None:
        if self.matrix not in MATRICES:
            raise ValueError(f"matrix must be one of {', '.join(MATRICES)}, got {self.matrix!r}")
        if not isinstance(self.approx, bool):
            raise ValueError(f"approx must be True or False, got {self.approx!r}")

    @property
    def name(self) -> str:
        """``nuclear`` (hidden, approximate), ``nuclear_exact``, ``nuclear_probs``, ``nuclear_probs_exact``."""
        return "nuclear" + ("_probs" if self.matrix == "probs" else "") + ("" if self.approx else "_exact")


def normalize_rows(R: torch.Tensor) -> torch.Tensor:
    """The paper's normalisation: centre each column over the rows, then scale every row to unit L2 norm. Computed
    in float32; ``R`` is ``(L, d)``. A row that centring leaves at rounding level (norm at most ``8 eps sqrt(d)`` times
    the largest ``|R|``, e.g. every row the same distribution) becomes zero instead of unit-length rounding noise."""
    R = R.float()
    X = R - R.mean(dim=0, keepdim=True)
    norms = torch.linalg.vector_norm(X, dim=1, keepdim=True)  # (L, 1)
    noise = 8 * torch.finfo(X.dtype).eps * X.shape[1] ** 0.5 * R.abs().max()
    return torch.where(norms > noise, X / norms.clamp_min(torch.finfo(X.dtype).tiny), torch.zeros_like(X))


def matrix_nuclear_norm(R: torch.Tensor, *, approx: bool = True) -> float:
    """The Matrix Nuclear-Norm of one sequence's ``(L, d)`` matrix ``R``: normalise (:func:`normalize_rows`), then the
    sum of the ``D = min(L, d)`` largest column L2 norms (``approx``) or of the singular values, divided by ``L``.

    Raises:
        ValueError: ``R`` is not a non-empty 2-D matrix of finite values.
    """
    if R.ndim != 2 or R.numel() == 0:
        raise ValueError(f"R must be a non-empty (rows, columns) matrix, got shape {tuple(R.shape)}")
    if not torch.isfinite(R).all():
        raise ValueError("R must hold finite values (found NaN or Inf)")
    X = normalize_rows(R)
    rows, cols = X.shape
    if approx:
        columns = torch.linalg.vector_norm(X, dim=0)  # (d,)
        total = torch.topk(columns, min(rows, cols)).values.sum()
    else:
        total = nuclear_norm(X)
    return float(total) / rows


def nuclear_norm(X: torch.Tensor) -> torch.Tensor:
    """``||X||_*``, the sum of the singular values of ``X``: the square roots of the eigenvalues of the Gram matrix of
    its short side, formed and decomposed in float64 (negatives from rounding clamped to zero).

    On a ``256 x 49152`` probability matrix this took 1.6 s on a loaded 2-core CPU against 16 s for
    ``torch.linalg.svdvals`` in float32 and 25 s in float64, and agreed with the float64 SVD to 1e-10 relative (the
    float32 SVD: 3e-5); tests check it against ``torch.linalg.matrix_norm(X, "nuc")`` in float64.
    """
    return squared_singular_values(X).sqrt().sum()


@torch.no_grad()
def nuclear_scores(model: nn.Module, windows: torch.Tensor, configs: Sequence[NuclearConfig] = (NuclearConfig(),),
                   *, batch_size: int = 8, progress: bool = False) -> list[float]:
    """Every variant in ``configs`` from one pass over ``windows``: the mean over windows of
    :func:`matrix_nuclear_norm` of each window's matrix (one window is one of the paper's sequences).

    Memory stays bounded by one batch: its logits ``(batch, L, vocab)`` (as for perplexity) and one window's
    ``(L, vocab)`` probabilities at a time; nothing is kept across batches but the running sums.

    Raises:
        ValueError: ``windows`` is not ``(n, seq_len >= 2)`` token ids, ``batch_size < 1``, or the model has no
            output embeddings to read the last hidden state from.
    """
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be token ids of shape (n >= 1, seq_len >= 2), got {tuple(windows.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    configs = list(configs)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head): the score needs a causal LM")
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    device = next(model.parameters()).device
    totals = [0.0] * len(configs)
    try:
        for batch in progress_bar(list(windows.split(batch_size)), "nuclear norm", enabled=progress):
            captured.clear()
            logits = model(input_ids=batch.to(device)).logits  # (b, L, vocab)
            hidden = captured[-1]  # (b, L, d): the LM head's input
            for w in range(batch.shape[0]):
                probs = None
                for k, config in enumerate(configs):
                    if config.matrix == "probs" and probs is None:
                        probs = torch.softmax(logits[w].float(), dim=-1)  # (L, vocab), one window at a time
                    matrix = probs if config.matrix == "probs" else hidden[w]
                    totals[k] += matrix_nuclear_norm(matrix, approx=config.approx)
            del logits, hidden, probs
    finally:
        hook.remove()
    return [t / windows.shape[0] for t in totals]


def nuclear_score(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 8, approx: bool = True,
                  matrix: Literal["hidden", "probs"] = "hidden", progress: bool = False) -> float:
    """The Matrix Nuclear-Norm of ``model`` on ``windows`` (see the module docstring): per window, normalised by its
    ``L`` rows, averaged over windows. ``approx``: the paper's L1,2 approximation, else the exact nuclear norm."""
    return nuclear_scores(model, windows, [NuclearConfig(matrix, approx)], batch_size=batch_size,
                          progress=progress)[0]
