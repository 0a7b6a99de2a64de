"""Compression methods, one file each, registered by config type.

Every module in this package is imported here, so adding a method is adding a file.
"""

import importlib
import pkgutil

from rankwise.methods.base import (
    CompressConfig,
    LowRankConfig,
    MethodFn,
    config_class,
    method_for,
    method_names,
    register_method,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["CompressConfig", "LowRankConfig", "MethodFn", "config_class", "method_for", "method_names",
           "register_method"]
