"""Optimizers as ordinary ``torch.optim`` optimizers: low-rank gradient projection (GaLore with SVD or DCT, APOLLO
channel- or tensor-wise, per-layer updates; :mod:`rankwise.optim.adamw`), M-FAC's inverse-Fisher preconditioning
(:mod:`rankwise.optim.mfac`), and TRP's rank shaping beside any optimizer (:mod:`rankwise.optim.trp`)."""

from rankwise.optim.adamw import APOLLOAdamW, GaLoreAdamW, LowRankAdamW, param_groups
from rankwise.optim.mfac import MFAC, MFACOptimizer
from rankwise.optim.projection import PROJECTIONS
from rankwise.optim.trp import TRP, nuclear_subgradient

__all__ = ["MFAC", "PROJECTIONS", "TRP", "APOLLOAdamW", "GaLoreAdamW", "LowRankAdamW", "MFACOptimizer",
           "nuclear_subgradient", "param_groups"]
