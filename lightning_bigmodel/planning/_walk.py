"""One greedy walk of the module tree for :class:`lightning_bigmodel.planning._planner._Planner`, filling the devices in
order (GPUs ascending, then cpu, then disk). Pure: reads the planner's sizes only."""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from lightning_bigmodel.planning._planner import _Planner
    from lightning_bigmodel.planning.device_map import Device, DeviceMap


def _water_level(remaining: float, budgets: list[float]) -> float:
    """The level ``L`` with ``sum(min(b, L) for b in budgets) == remaining`` (or infinity when all are full)."""
    for index, budget in enumerate(sorted(budgets)):
        share = math.ceil(remaining / (len(budgets) - index))
        if budget >= share:
            return share
        remaining -= budget
    return math.inf


class _Pass:
    """One greedy walk over the module tree, filling the devices in order."""

    def __init__(
        self,
        planner: _Planner,
        budgets: dict[Device, float],
        balanced: bool,
        low_0: bool,
        low_0_extra: int = 0,
        pinned: Optional[Device] = None,
    ) -> None:
        self.planner, self.budgets, self.balanced, self.low_0 = planner, budgets, balanced, low_0
        self.low_0_extra = low_0_extra
        self.pinned = pinned  # a device the walk never leaves: what does not fit there goes to a later device
        gpus = [device for device in budgets if isinstance(device, int) and budgets[device] > 0]
        others = [device for device in budgets if device not in gpus]
        # balanced_low_0: GPU 0 holds only what GPUs 1.. cannot (its target is that overflow), and the others share
        # the rest evenly. Devices are still filled in index order, so the map stays sequential (0, 1, ..., cpu).
        self.spread = gpus[1:] if low_0 and len(gpus) > 1 else gpus
        self.devices = gpus + others
        self.fills = {device: 0 for device in self.devices}
        self.raw: DeviceMap = {}
        self.queue, self.pending, self.expanded = deque([""]), {""}, set()
        self.index, self.target, self.placed = -1, 0.0, 0

    def run(self) -> DeviceMap:
        planner, queue = self.planner, self.queue
        while queue:
            name = queue[0]
            if name not in self.pending or name in self.expanded:
                queue.popleft()
                if name in self.expanded and name in self.pending:
                    self.pending.discard(name)
                    queue.extendleft(reversed([m for m in planner.members(name) if m in self.pending]))
                continue
            if self.index < 0:
                self.advance(name)
            device = self.devices[self.index]
            group = planner.group(name, self.pending, self.raw)
            need = sum(planner.cost(member, device) for member in group)
            candidates = [member for member in group if planner.splittable(member)]
            fill, target = self.fills[device], self.target
            closer = fill + need <= self.budgets[device] and fill + need - target < target - fill
            if fill + need <= target or (not candidates and closer):
                self.place(group, device)
            elif candidates:
                self.split(max(candidates, key=lambda member: planner.sizes.get(member, 0)))
            elif device == self.pinned:
                if not self.skip_ahead(group, stay=True):
                    self.advance(name)  # fits nowhere: raises
            elif not (self.balanced and need > self.budgets[device] and self.skip_ahead(group)):
                self.advance(name)
        return self.raw

    def spilled_with_room_on_gpu_0(self) -> tuple[int, float]:
        """balanced_low_0: bytes sent past the GPUs while GPU 0 had budget left, and GPU 0's fill (``(0, 0)`` if n/a)."""
        gpu_0 = next((device for device in self.devices if isinstance(device, int)), None)
        if not self.low_0 or gpu_0 is None or gpu_0 in self.spread:
            return 0, 0.0
        spilled = sum(fill for device, fill in self.fills.items() if not isinstance(device, int))
        room = self.budgets[gpu_0] - self.fills[gpu_0]
        return (int(min(spilled, room)) if room > 0 else 0), self.fills[gpu_0]

    def place(self, group: list[str], device: Device) -> None:
        for member in group:
            self.raw[member] = device
            self.pending.discard(member)
            self.placed += self.planner.sizes.get(member, 0)
            self.fills[device] += self.planner.cost(member, device)

    def split(self, name: str) -> None:
        children = self.planner.members(name)
        self.pending.update(children)
        if name == self.queue[0]:
            self.queue.popleft()
            self.pending.discard(name)
            self.queue.extendleft(reversed(children))
        else:
            self.expanded.add(name)  # a tied partner: its children take its place when it reaches the front

    def skip_ahead(self, group: list[str], stay: bool = False) -> bool:
        """Place an atom too big for the whole current device on the first later device with room, if any, and go on
        from there (what follows never goes back to an earlier device: the map stays sequential); with ``stay``, go
        on from the current device."""
        for position, device in enumerate(self.devices[self.index + 1 :], start=self.index + 1):
            need = sum(self.planner.cost(member, device) for member in group)
            if self.fills[device] + need <= self.budgets[device]:
                self.place(group, device)
                if not stay:
                    self.index, self.target = position, self.target_of(device)
                return True
        return False

    def advance(self, name: str) -> None:
        """Move on to the next device with a positive target; raise when none is left."""
        while True:
            self.index += 1
            if self.index >= len(self.devices):
                raise ValueError(
                    f"`max_memory` is too small for the model: {name!r} ({self.planner.sizes.get(name, 0)} bytes) "
                    f"fits on no device after the budgets {self.budgets} are used up. Raise the budgets or leave "
                    "'disk' unbudgeted."
                )
            self.target = self.target_of(self.devices[self.index])
            if self.target > self.fills[self.devices[self.index]] or self.index == len(self.devices) - 1:
                return

    def target_of(self, device: Device) -> float:
        """Bytes to put on ``device``: its budget, or for balanced GPUs an even share of what is left."""
        budgets, spread = self.budgets, self.spread
        if device == self.pinned:
            return budgets[device]
        if self.low_0 and isinstance(device, int) and device not in spread:
            overflow = self.planner.sizes[""] - self.placed - sum(budgets[gpu] for gpu in spread)
            return min(budgets[device], max(0, overflow) + self.low_0_extra)
        if not self.balanced or device not in spread or device == spread[-1]:
            return budgets[device]
        later = spread[spread.index(device) :]
        remaining = self.planner.sizes[""] - self.placed + sum(self.fills[gpu] for gpu in later)
        return min(budgets[device], _water_level(remaining, [budgets[gpu] for gpu in later]))
