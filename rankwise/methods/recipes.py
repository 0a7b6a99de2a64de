"""Recipes and settings as text: ``svd_llm+loss+seq`` (the CLI's ``--recipe``, ``compare --recipes`` and the row
labels), the named recipes (``best``), and a method's own fields from ``NAME=VALUE`` (``--set``), typed by the
config's annotations."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from rankwise.allocate import ALLOCATIONS
from rankwise.methods.base import CompressConfig, config_class, method_names

COMMON_FIELDS = ("ratio", "bits", "targets", "allocation", "sequential", "update_u", "score_samples")
SHARED_SETTINGS = ("score_samples",)  # fields of every method that have no flag of their own: set with --set


def method_fields(config_cls: type[CompressConfig]) -> dict[str, tuple[str, Any]]:
    """A method's own config fields (those beyond :class:`CompressConfig`'s): name -> (type text, default)."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: (_type_text(hints[f.name]), f.default) for f in dataclasses.fields(config_cls)
            if f.name not in COMMON_FIELDS and f.init}


def parse_settings(config_cls: type[CompressConfig], pairs: list[str]) -> dict[str, Any]:
    """``["iterations=4", "whiten=false"]`` as typed keyword arguments of ``config_cls``'s own fields.

    Raises:
        ValueError: one line naming the setting and the fields (with types) this method has.
    """
    own = method_fields(config_cls)
    hints = typing.get_type_hints(config_cls)
    shared = {f.name: (_type_text(hints[f.name]), f.default) for f in dataclasses.fields(config_cls)
              if f.name in SHARED_SETTINGS}
    listing = (", ".join(f"{k} ({t}, default {d!r})" for k, (t, d) in own.items()) or "none") + "".join(
        f"; or the shared {k} ({t}, default {d!r})" for k, (t, d) in shared.items())
    own = {**own, **shared}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in own:
            raise ValueError(f"--set {pair!r}: expected NAME=VALUE with NAME one of {config_cls.name}'s fields: "
                             f"{listing}")
        if key in out:
            raise ValueError(f"--set {key} is given twice; give each setting once")
        out[key] = _parse_value(hints[key], text.strip(), f"--set {key}")
    return out


def _type_text(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse_value(tp: Any, text: str, what: str) -> Any:
    args = typing.get_args(tp)
    if type(None) in args and text.lower() in ("none", "null", ""):
        return None
    for candidate in ([a for a in args if a is not type(None)] or [tp]):
        if candidate is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            continue
        if candidate in (int, float, str):
            try:
                return candidate(text)
            except ValueError:
                continue
    raise ValueError(f"{what}: {text!r} is not a valid {_type_text(tp)}")


FLAG_OPTIONS = {"seq": ("sequential", True), "upd": ("update_u", True), "anc": ("anchored", True),
                "ow": ("output_weighted", True)}


@dataclasses.dataclass(frozen=True)
class NamedRecipe:
    """A recipe reachable by one name, which may expand to a different recipe by budget.

    Attributes:
        by_ratio: ``(from_ratio, recipe)`` pairs, the first from 0, ascending: a ratio takes the last recipe whose
            ``from_ratio`` it reaches. A budget in bits (its ratio depends on the stored dtype) takes the last, the
            most thorough.
    """

    by_ratio: tuple[tuple[float, str], ...]

    def __post_init__(self) -> None:
        starts = [start for start, _ in self.by_ratio]
        if not starts or starts[0] != 0.0 or starts != sorted(set(starts)):
            raise ValueError(f"by_ratio must start from ratio 0 and ascend, got {starts}")

    def expand(self, ratio: float | None = None, *, bits: float | None = None) -> str:
        """The recipe at ``ratio`` (``None``: the configs' default ratio), or for a budget of ``bits``."""
        if bits is not None:
            return self.by_ratio[-1][1]
        ratio = CompressConfig.ratio if ratio is None else ratio
        # an out-of-range ratio takes the first recipe, whose config then names the allowed range
        return next((recipe for start, recipe in reversed(self.by_ratio) if ratio >= start), self.by_ratio[0][1])

    def __str__(self) -> str:
        (_, first), *rest = self.by_ratio
        if not rest:
            return first
        parts = [f"{first} below ratio {rest[0][0]:g}", *(f"{recipe} from {start:g}" for start, recipe in rest)]
        return ", ".join(parts) + " (with --bits, the last)"


NAMED_RECIPES = {
    "best": NamedRecipe(((0.0, "svd_llm+loss+ow"), (0.3, "svd_llm+loss+seq+anc+ow"))),
}
"""Recipes reachable by one name (``rankwise compress --recipe best``, ``compare --recipes best``): ``best`` is the
best training-free recipe measured on the default model (benchmarks/RESULTS.md, "The 2025-2026 records"). Below
ratio 0.3 it fits every layer on the dense model's statistics: the sequential anchored fit tied with it at 0.2
(anchor 0.5, within the spread of three calibration draws) and takes about 1.5x as long; from 0.3 the sequential
anchored fit (anchor 0.25), ahead at 0.3 and 0.4 on the held-out pydoc text and the Python sources at every draw."""


def recipe_options() -> str:
    """The options a recipe may carry, from the registries: allocation names, flags and ``name=value`` fields."""
    return ", ".join([*ALLOCATIONS, *FLAG_OPTIONS, "<method field>=<value>"])


def parse_recipe(text: str, ratio: float | None = None, *, bits: float | None = None) -> CompressConfig:
    """A recipe written like a row label, e.g. ``svd_llm+loss+seq`` or ``monarch+whiten=False``: the method, then
    options (see :func:`recipe_options`), at ``ratio`` or at a budget of ``bits`` per targeted weight; or a name
    of :data:`NAMED_RECIPES` (``best``)."""
    named = NAMED_RECIPES.get(text.strip())
    text = named.expand(ratio, bits=bits) if named is not None else text
    method, *options = [part.strip() for part in text.split("+")]
    config_cls = config_class(method)
    own = {f.name for f in dataclasses.fields(config_cls)}
    fields: dict[str, Any] = {}
    settings = []
    setter: dict[str, str] = {}  # field -> the option that set it: each field is set once
    for option in options:
        key = ("allocation" if option in ALLOCATIONS else FLAG_OPTIONS[option][0] if option in FLAG_OPTIONS
               else option.partition("=")[0].strip().replace("-", "_"))
        if key in setter:
            repeated = (f"option {option!r} is repeated" if setter[key] == option
                        else f"options {setter[key]!r} and {option!r} both set {key}")
            raise ValueError(f"recipe {text!r}: {repeated}; give each option once")
        setter[key] = option
        if option in ALLOCATIONS:
            fields["allocation"] = option
        elif option in FLAG_OPTIONS:
            key, value = FLAG_OPTIONS[option]
            if key not in own:
                with_it = [n for n in method_names() if key in {f.name for f in dataclasses.fields(config_class(n))}]
                raise ValueError(f"recipe {text!r}: option {option!r} ({key}) applies to {', '.join(with_it)}, not "
                                 f"{method}")
            fields[key] = value
        elif "=" in option:
            settings.append(option)
        else:
            raise ValueError(f"recipe {text!r}: unknown option {option!r}; allowed: {recipe_options()}")
    fields.update(parse_settings(config_cls, settings))
    budget = {"bits": bits} if bits is not None else {"ratio": ratio} if ratio is not None else {}
    return config_cls(**budget, **fields)
