"""Load models, save and reload compressed models (safetensors + JSON), export dense checkpoints."""

from rankwise.io.models import DEFAULT_MODEL, load_model
from rankwise.io.save import MANIFEST, is_compressed_dir, load, save

__all__ = ["DEFAULT_MODEL", "MANIFEST", "is_compressed_dir", "load", "load_model", "save"]
