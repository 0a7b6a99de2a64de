"""Structured (width-reducing) approximations of pairs of matrices, the closed forms of MoDeGPT.

Lin et al., "MoDeGPT: Modular Decomposition for Large Language Model Compression" (ICLR 2025),
https://arxiv.org/abs/2408.09632. A transformer block holds three *modules*, each a pair of matrices joined by an
inner dimension; reducing that dimension shrinks both matrices into smaller dense ones:

* gated MLP (type I): keep ``k`` intermediate neurons chosen by the ridge leverage scores of their activations'
  correlation ``C`` (:func:`ridge_leverage_scores`), and refit the down projection by the Nyström correction
  ``W_down C[:, S] C[S, S]^-1`` (:func:`nystrom_columns`), the least-squares optimum given the kept neurons;
* query/key (type II): keep the head dimensions with the largest products of query and key energies (a CR
  decomposition), in rotary pairs ``(i, i + d/2)`` (:func:`rope_pair_selection`);
* value/output (type III): the rank-``k`` optimum of ``sum_h ||X^T (W_V,g^T W_O,h^T - V'^T O_h'^T)||`` over the
  query heads ``h`` reading value head ``g``, by one SVD in whitened coordinates (:func:`whitened_value_output`).

Everything takes float tensors, computes in float64 and returns the weights' dtype.
"""

from __future__ import annotations

import torch

from rankwise.linalg._checks import check_matrix
from rankwise.linalg.whiten import Whitening, whiten


def _psd(C: torch.Tensor, name: str = "C") -> torch.Tensor:
    C = check_matrix(C, name)
    if C.shape[0] != C.shape[1]:
        raise ValueError(f"{name} must be square (n, n), got shape {tuple(C.shape)}")
    C = C.to(torch.float64)
    return (C + C.mT) / 2


def ridge_leverage_scores(C: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """``diag(C (C + lam I)^-1)`` with ``lam = ridge * mean(diag(C))``: each variable's ridge leverage (in
    ``[0, 1)``), the share of the correlation ``C`` that only it explains.

    Args:
        C: ``(n, n)`` positive semi-definite correlation of ``n`` variables (an MLP's intermediate activations).
        ridge: relative ridge ``lam / mean(diag(C))``, > 0.

    Returns:
        ``(n,)`` float64 scores (eigenvalues below zero, from rounding, count as zero).
    """
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge}")
    C = _psd(C)
    lam = ridge * float(C.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    evals, Q = torch.linalg.eigh(C)
    evals = evals.clamp_min(0.0)
    return (Q * Q) @ (evals / (evals + lam))


def nystrom_columns(W: torch.Tensor, C: torch.Tensor, keep: torch.Tensor, *, damp: float = 1e-6) -> torch.Tensor:
    """``W C[:, S] (C[S, S] + eps I)^-1``: the ``(m, k)`` matrix ``W'`` minimising ``||W X - W' X_S||_F`` when only
    the inputs ``S = keep`` remain, given ``C = X X^T`` (the Nyström approximation of ``C`` from the columns ``S``).

    Args:
        W: ``(m, n)`` weight reading ``n`` inputs.
        C: ``(n, n)`` second moment of those inputs.
        keep: ``(k,)`` indices of the kept inputs.
        damp: relative ridge on ``C[S, S]`` (times its mean diagonal), for a singular kept block.
    """
    W = check_matrix(W, "W")
    C = _psd(C)
    if C.shape[0] != W.shape[1]:
        raise ValueError(f"C must be ({W.shape[1]}, {W.shape[1]}) to match W {tuple(W.shape)}, got {tuple(C.shape)}")
    keep = torch.as_tensor(keep, dtype=torch.long, device=C.device)
    block = C[keep][:, keep]  # (k, k)
    eps = damp * float(block.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny))
    block.diagonal().add_(eps)
    cross = W.to(C.device, torch.float64) @ C[:, keep]  # (m, k)
    try:
        L = torch.linalg.cholesky(block)
        out = torch.cholesky_solve(cross.mT, L).mT
    except torch.linalg.LinAlgError:
        out = torch.linalg.lstsq(block, cross.mT).solution.mT
    return out.to(W.device, W.dtype)


def rope_pair_selection(q_energy: torch.Tensor, k_energy: torch.Tensor, width: int) -> torch.Tensor:
    """Head positions to keep in the query and key projections of one attention layer: the ``width / 2`` rotary
    pairs ``(i, i + d/2)`` with the largest ``sum_h sum_{j in pair} sqrt(E_q[h, j] E_k[g(h), j])``, shared by all
    heads.

    ``E_q[h, j] = ||X^T w_q,h,j||^2`` is the energy of query head ``h``'s dimension ``j`` (the squared column norm of
    the query correlation's square root), ``E_k`` the same for keys, and ``g(h)`` the key head query head ``h`` reads
    (grouped-query attention). ``sqrt(E_q E_k)`` is MoDeGPT's CR score of a dimension, the term it adds to the bound
    on the error of ``Q K^T`` when removed: the kept pairs minimise that bound summed over the heads.

    Args:
        q_energy: ``(H, d)`` query energies, ``d`` even.
        k_energy: ``(H_kv, d)`` key energies, ``H`` a multiple of ``H_kv``.
        width: kept dimensions per head, even, in ``[2, d]``.

    Returns:
        ``(width,)`` positions: the kept first-half positions ascending, then their partners ``+ d/2``.
    """
    if q_energy.ndim != 2 or k_energy.ndim != 2:
        raise ValueError(f"q_energy (H, d) and k_energy (H_kv, d) must be 2-D, got shapes {tuple(q_energy.shape)} "
                         f"and {tuple(k_energy.shape)}")
    heads, d = q_energy.shape
    kv_heads = k_energy.shape[0]
    if k_energy.shape[1] != d or heads % kv_heads or d % 2:
        raise ValueError(f"q_energy (H, d) and k_energy (H_kv, d) need the same even d and H a multiple of H_kv, "
                         f"got {tuple(q_energy.shape)} and {tuple(k_energy.shape)}")
    if width % 2 or not 2 <= width <= d:
        raise ValueError(f"width must be even and in [2, {d}] (rotary pairs), got {width}")
    score = (q_energy.double() * k_energy.double().repeat_interleave(heads // kv_heads, dim=0)).sqrt()  # (H, d)
    half = d // 2
    pair = (score[:, :half] + score[:, half:]).sum(0)  # (d/2,)
    first = torch.topk(pair, width // 2, sorted=False).indices.sort().values
    return torch.cat([first, first + half])


def whitened_value_output(V: torch.Tensor, Wo: torch.Tensor, C: torch.Tensor | Whitening, heads: int, kv_heads: int,
                          width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Value and output projections with ``width`` dimensions per head, minimising
    ``sum_h ||X^T (V_g(h)^T O_h^T - V'_g(h)^T O'_h^T)||_F^2`` (the attention weights between them left out, as in the
    paper), with ``C = X X^T`` the input's second moment.

    For each value head ``g``, with ``C = S S^T`` and ``P = S^T V_g^T`` (``n x d``): the top ``width`` left singular
    vectors ``Z`` of ``P [O_h1^T | O_h2^T | ...]`` (the query heads reading ``g``) give ``V'_g = Z^T S^-1`` and
    ``O'_h = O_h P^T Z``, the Eckart-Young optimum of the stacked products.

    Args:
        V: ``(H_kv d, n)`` value projection.
        Wo: ``(n_out, H d)`` output projection ``O``.
        C: ``(n, n)`` second moment of the value projection's input, or its :class:`Whitening`.
        heads, kv_heads: query and value heads (``heads`` a multiple of ``kv_heads``).
        width: kept dimensions per head, in ``[1, d]``.

    Returns:
        ``(V', O')`` of shapes ``(H_kv width, n)`` and ``(n_out, H width)``, in ``V``'s and ``Wo``'s dtypes.
    """
    V, Wo = check_matrix(V, "V"), check_matrix(Wo, "Wo")
    if heads % kv_heads or V.shape[0] % kv_heads or Wo.shape[1] != V.shape[0] // kv_heads * heads:
        raise ValueError(f"V {tuple(V.shape)} and Wo {tuple(Wo.shape)} do not split into {kv_heads} value and "
                         f"{heads} query heads of one width")
    d = V.shape[0] // kv_heads
    if not 1 <= width <= d:
        raise ValueError(f"width must be in [1, {d}], got {width}")
    wh = C if isinstance(C, Whitening) else whiten(C)
    group = heads // kv_heads
    new_v, new_o = [], [None] * heads
    for g in range(kv_heads):
        Pt = wh.right_multiply(V[g * d:(g + 1) * d].to(torch.float64))  # (d, n) = V_g S = P^T
        Q, R = torch.linalg.qr(Pt.mT)  # P = Q R: (n, d), (d, d)
        Os = [Wo[:, h * d:(h + 1) * d].to(torch.float64) for h in range(g * group, (g + 1) * group)]  # (n_out, d)
        U, _, _ = torch.linalg.svd(R @ torch.cat([o.mT for o in Os], dim=1), full_matrices=False)  # (d, d)
        Z = Q @ U[:, :width]  # (n, width), orthonormal
        new_v.append(wh.right_solve(Z.mT))  # (width, n) = Z^T S^-1
        for j, o in enumerate(Os):
            new_o[g * group + j] = o @ (Pt @ Z)  # (n_out, width) = O_h P^T Z
    return torch.cat(new_v).to(V.dtype), torch.cat(new_o, dim=1).to(Wo.dtype)
