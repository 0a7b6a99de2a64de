"""Hook rankwise into transformers and PEFT as soon as they are imported, without importing them here.

``import rankwise`` must make ``AutoModelForCausalLM.from_pretrained(compressed_dir)`` work (the ``rankwise``
quantization method) and make compressed layers PEFT LoRA targets (:mod:`rankwise.adapt.compressed`), but importing
transformers' quantizers or PEFT costs seconds that ``import rankwise.linalg`` should not pay. So each hook runs at once
when its module is already imported, and otherwise right after that module first is (``transformers.quantizers.auto``
is imported by ``transformers.modeling_utils``, before any ``from_pretrained`` can run).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType


def _register_quantizer() -> None:
    importlib.import_module("rankwise.io.hf_quantizer").register()


def _install_peft() -> None:
    importlib.import_module("rankwise.adapt.compressed").install()


HOOKS: dict[str, Callable[[], None]] = {"transformers.quantizers.auto": _register_quantizer, "peft": _install_peft}


class _Loader(importlib.abc.Loader):
    """The module's own loader, then the hook; anything else (resources, ``get_code`` ...) is the inner loader's."""

    def __init__(self, inner: importlib.abc.Loader, finder: _Finder, name: str) -> None:
        self.inner, self.finder, self.name = inner, finder, name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        self.finder.loaded(self.name)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the spec of each hooked module until the module is actually executed: a look-up alone
    (``importlib.util.find_spec``, as ``transformers`` does to see whether PEFT is installed) must not use the hook
    up."""

    def __init__(self) -> None:
        self.pending = {name: hook for name, hook in HOOKS.items() if name not in sys.modules}

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:  # the real spec, from the other finders
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, self, fullname)
                return spec
        return None

    def loaded(self, name: str) -> None:
        hook = self.pending.pop(name, None)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        if hook is not None:
            hook()


def install() -> None:
    """Run each hook now if its module is loaded, else when it loads."""
    for name, hook in HOOKS.items():
        if name in sys.modules:
            hook()
    if any(name not in sys.modules for name in HOOKS) and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
