"""Fused input groups: low-rank layers that read the same input (q/k/v, gate/up) project it down in one matmul.

Each :class:`~rankwise.nn.LowRankLinear` ``x -> up(down(x))`` of a group keeps its own factors (saving, loading and
adapters see nothing new); :func:`fuse_inputs_` gives the members a shared :class:`InputGroup` holding the
concatenation of their ``down`` factors, ranks may differ. The first member called with an input computes
``x @ cat(downs).T`` once and splits it; the others, called with that same tensor, take their slice. A member
called with another tensor (or one changed in place) recomputes, so the result never depends on call order.

The concatenation is rebuilt when a member's ``down`` changes (its version counter moves), and with gradients
enabled the members run unfused, so training through a fused model is exact too. :func:`unfuse_` undoes it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter; ``-1`` for an inference tensor, which has none (recognised by identity alone)."""
    return -1 if t.is_inference() else t._version


class InputGroup:
    """The shared down-projection of the low-rank layers that read one input."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._clear()

    def _clear(self) -> None:
        self._weight: torch.Tensor | None = None
        self._key: tuple[Any, ...] = ()
        self._input: weakref.ref | None = None
        self._input_version = -1
        self._parts: tuple[torch.Tensor, ...] = ()
        self._served: set[int] = set()  # members that took their slice of the cached product
        self._product_of: torch.Tensor | None = None  # the fused weight the cached parts were computed with

    def _fused_weight(self) -> torch.Tensor:
        key = tuple((_version(m.down), m.down.data_ptr(), m.down.shape, m.down.dtype, m.down.device)
                    for m in self.members)
        if self._weight is None or key != self._key:
            self._weight = torch.cat([m.down.detach() for m in self.members])  # (sum of ranks, in)
            self._key = key
        return self._weight

    def down(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``member.down`` applied to ``x``: a slice of the group's one product when ``x`` is the group's input.

        The product is dropped once every member has taken its slice, so a forward pass holds at most one group's
        product at a time. An inference tensor (``torch.inference_mode``) has no version counter: it is recognised
        by identity alone."""
        if torch.is_grad_enabled() and any(m.down.requires_grad for m in self.members):
            return F.linear(x, member.down)
        weight = self._fused_weight()
        index = self.members.index(member)
        seen = self._input() if self._input is not None else None
        version = _version(x)
        if (seen is not x or version != self._input_version or weight is not self._product_of
                or index in self._served):
            h = F.linear(x, weight)  # (..., sum of ranks)
            self._parts = h.split([m.rank for m in self.members], dim=-1)
            self._input, self._input_version, self._product_of = weakref.ref(x), version, weight
            self._served = set()
        part = self._parts[index]
        self._served.add(index)
        if len(self._served) == len(self.members):
            self._parts, self._input = (), None
        return part

    def __deepcopy__(self, memo: dict) -> InputGroup:
        from copy import deepcopy

        group = InputGroup.__new__(InputGroup)
        memo[id(self)] = group  # the members' copies point back at this one group
        group.members = deepcopy(self.members, memo)
        group._clear()  # caches are not copied
        return group

    def __getstate__(self) -> dict[str, Any]:
        return {"members": self.members}  # pickling drops the caches (and the weak reference)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.members = state["members"]
        self._clear()


def _shared_inputs(model: nn.Module, layers: dict[str, nn.Module]) -> list[list[str]]:
    """Groups of ``layers`` (two or more) that receive the very same input tensor in one short forward pass."""
    first: dict[str, int] = {}
    calls: list[tuple[torch.Tensor, str]] = []

    def hook(name: str):
        def record(_module: nn.Module, args: tuple) -> None:
            if name in first or not args:
                return
            leader = next((lead for x, lead in calls if x is args[0]), None)
            if leader is None:
                calls.append((args[0], name))
            first[name] = len(calls) - 1 if leader is None else next(
                k for k, (_, lead) in enumerate(calls) if lead == leader)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name in layers:
        if name in first:
            groups.setdefault(first[name], []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def fuse_inputs_(model: nn.Module) -> list[list[str]]:
    """Fuse the down-projections of ``model``'s low-rank layers that share an input; returns the groups fused.

    Only the plain ``lowrank`` kind fuses (dense and other kinds in a group run as before). Runs one forward pass
    of two tokens to find which layers read the same tensor. Idempotent; :func:`unfuse_` reverses it.
    """
    from rankwise.nn.linear import LowRankLinear

    unfuse_(model)
    layers = {n: m for n, m in model.named_modules() if type(m) is LowRankLinear}
    groups = _shared_inputs(model, layers)
    for names in groups:
        group = InputGroup([layers[n] for n in names])
        for n in names:
            layers[n].input_group = group
    return groups


def unfuse_(model: nn.Module) -> int:
    """Run every fused low-rank layer of ``model`` on its own again; returns how many were fused."""
    from rankwise.nn.linear import LowRankLinear

    count = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear) and m.input_group is not None:
            m.input_group = None
            count += 1
    return count
