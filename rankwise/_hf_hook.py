"""Register rankwise's quantization method with transformers as soon as transformers' quantizer registry exists.

``import rankwise`` must make ``AutoModelForCausalLM.from_pretrained(compressed_dir)`` work, but importing
transformers' quantizers costs seconds that ``import rankwise.linalg`` should not pay. So registration happens at once
when ``transformers.quantizers.auto`` is already imported, and otherwise right after it first is (it is imported by
``transformers.modeling_utils``, before any ``from_pretrained`` can run).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    from rankwise.io.hf_quantizer import register

    register()


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders, once
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else when it loads."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
