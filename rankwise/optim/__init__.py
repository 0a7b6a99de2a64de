"""Low-rank gradient optimizers as ordinary ``torch.optim`` optimizers: GaLore (SVD or DCT projection) and APOLLO
(channel-wise or tensor-wise scaling), with per-layer updates; see :mod:`rankwise.optim.adamw`."""

from rankwise.optim.adamw import APOLLOAdamW, GaLoreAdamW, LowRankAdamW, param_groups
from rankwise.optim.projection import PROJECTIONS

__all__ = ["PROJECTIONS", "APOLLOAdamW", "GaLoreAdamW", "LowRankAdamW", "param_groups"]
