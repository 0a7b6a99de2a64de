"""rankwise: low-rank and structured matrix approximation that makes neural networks cheaper."""

from rankwise._errors import RankwiseWarning

__version__ = "0.1.0"
__all__ = ["RankwiseWarning", "__version__"]
