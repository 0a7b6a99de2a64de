"""Adapters PEFT lacks, registered into PEFT, plus fine-tuning and healing.

Importing this package registers the tuners, after which PEFT's ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` handle them like PEFT's own methods.
"""

from rankwise.adapt.svfit import SVFitConfig, SVFitModel

__all__ = ["SVFitConfig", "SVFitModel"]
