"""Registering rankwise's tuners into PEFT, so ``get_peft_model``, ``save_pretrained`` and
``PeftModel.from_pretrained`` handle them like PEFT's own methods once ``rankwise.adapt`` is imported."""

from __future__ import annotations

from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType


def _add_peft_type(name: str) -> PeftType:
    """Add ``NAME`` to PEFT's ``PeftType`` enum (PEFT's registry only accepts names the enum lists).

    ``PeftType`` is a ``str`` enum, so a member is a ``str`` subclass instance entered in the enum's maps: lookups by
    value (``PeftType("NAME")``, used when a saved ``adapter_config.json`` is read), by name and by attribute all
    find it.
    """
    value = name.upper()
    if value in PeftType.__members__:
        return PeftType[value]
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    type.__setattr__(PeftType, value, member)
    return member


def register(name: str, config_cls: type, model_cls: type) -> None:
    """Register a tuner under ``name`` (lower case; its PEFT type is ``NAME``). Importing twice is harmless."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = _add_peft_type(name)
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is model_cls:
        return
    if registered is not None:
        raise RuntimeError(f"PEFT already has a method named {name!r} ({registered.__module__}); this PEFT version "
                           "clashes with rankwise's tuner of that name: report it to rankwise, or use an older PEFT")
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
