"""Adapters PEFT lacks, registered into PEFT, plus fine-tuning and healing.

Importing this package registers the tuners, after which PEFT's ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` handle them like PEFT's own methods, and makes compressed layers (``CompressedLinear``)
LoRA targets (:mod:`rankwise.adapt.compressed`).
"""

from rankwise.adapt.block_lora import BlockLoRAConfig, BlockLoRAModel
from rankwise.adapt.compressed import CompressedLoraLinear, check_mergeable, install
from rankwise.adapt.heal import HealConfig, HealResult, heal_, heal_model
from rankwise.adapt.job import AdaptResult, adapt_model
from rankwise.adapt.loldu import LoLDUConfig, LoLDUModel
from rankwise.adapt.lora_sb import LoRASBConfig, LoRASBModel, preprocess_lora_sb
from rankwise.adapt.methods import METHODS, add_adapter
from rankwise.adapt.milora import MiLoRAConfig, MiLoRAModel
from rankwise.adapt.snell import SNELLConfig, SNELLModel
from rankwise.adapt.svfit import SVFitConfig, SVFitModel
from rankwise.adapt.train import TrainConfig, TrainingDivergedError, TrainResult, train
from rankwise.adapt.tucker import TuckerConfig, TuckerModel

install()

__all__ = [
    "METHODS",
    "AdaptResult",
    "BlockLoRAConfig",
    "BlockLoRAModel",
    "CompressedLoraLinear",
    "HealConfig",
    "HealResult",
    "LoLDUConfig",
    "LoLDUModel",
    "LoRASBConfig",
    "LoRASBModel",
    "MiLoRAConfig",
    "MiLoRAModel",
    "SNELLConfig",
    "SNELLModel",
    "SVFitConfig",
    "SVFitModel",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "TuckerConfig",
    "TuckerModel",
    "adapt_model",
    "add_adapter",
    "check_mergeable",
    "heal_",
    "heal_model",
    "install",
    "preprocess_lora_sb",
    "train",
]
