"""What must land on one device with a pending item of the planner's walk: the other direct tensors of its module, and
the items holding its tied partners (closed under both rules). A mixin of :class:`~lightning_bigmodel.planning._planner._Planner`,
which provides ``modules``, ``members``, ``partners`` and ``tied_prefixes``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from lightning_bigmodel.planning.devices import Device


def _prefixes(name: str) -> list[str]:
    """``name``, then each dotted ancestor, then ``""``."""
    out = [name]
    while name:
        cut = name.rfind(".")
        name = name[:cut] if cut >= 0 else ""
        out.append(name)
    return out


class _Groups:
    """The grouping rules of the greedy walk (see the module docstring)."""

    def group(self, name: str, pending: set[str], placed: Mapping[str, Device]) -> list[str]:
        """``name`` plus what must land on its device: the other pending direct tensors of its module (one module's
        direct tensors form one unit, as in :meth:`unit`), and the pending items holding tied partners (closed
        under both rules)."""
        group, seen, owners = [name], {name}, set()
        for item in group:  # grows while iterating: the closure
            for other in self._siblings(item, pending, owners) + self._partner_items(item, pending, placed):
                if other not in seen:
                    seen.add(other)
                    group.append(other)
        return group

    def _siblings(self, name: str, pending: set[str], owners: set[str]) -> list[str]:
        """The pending direct tensors of the module owning tensor ``name`` (``[]`` for a module, or for an owner
        already in ``owners``, which is updated)."""
        if name in self.modules:
            return []
        cut = name.rfind(".")
        owner = name[:cut] if cut >= 0 else ""
        if owner in owners:
            return []
        owners.add(owner)
        return [m for m in self.members(owner) if m not in self.modules and m in pending]

    def _partner_items(self, name: str, pending: set[str], placed: Mapping[str, Device]) -> list[str]:
        """The finest pending items holding the tied partners of tensors under ``name`` (outside it)."""
        items: list[str] = []
        if name not in self.tied_prefixes:
            return items
        inside = f"{name}." if name else ""

        def under(tensor: str) -> bool:
            return tensor == name or tensor.startswith(inside)

        for tensor in self.partners:
            if not under(tensor):
                continue
            for partner in self.partners[tensor]:
                if under(partner):
                    continue
                for prefix in _prefixes(partner):  # the finest pending item holding `partner`
                    if prefix in placed:
                        break  # cannot happen: partners are always placed together
                    if prefix in pending:
                        if prefix not in items:
                            items.append(prefix)
                        break
        return items
