"""Plans with one GPU pinned as the execution device, for :class:`~lightning_bigmodel.planning._planner._Planner`: where
the in-order walk leaves the GPUs empty because none holds its first modules beside the reserve for offloaded layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from lightning_bigmodel.planning._walk import _Pass

if TYPE_CHECKING:
    from lightning_bigmodel.planning._planner import _Planner
    from lightning_bigmodel.planning.devices import Device, DeviceMap

_MAX_PASSES = 6


def plan_pinned(
    planner: _Planner, budgets: dict[Device, float], balanced: bool, low_0: bool, slots: int = 2
) -> Optional[DeviceMap]:
    """For each GPU ``g`` as the execution device (the GPUs before it left out): passes that stay on ``g`` and send
    what does not fit beside its reserve to the later devices (the map is then not in module order), raising the
    reserve as :meth:`_Planner.plan_in_order` does. The valid plan with the most bytes on GPUs, or ``None``.

    The in-order walk abandons every GPU when none holds its first modules beside the reserve for the offloaded
    ones (e.g. an embedding as large as the room left): moving on empties the GPU, which moves the execution
    device, whose reserve empties it in turn."""
    best, best_bytes = None, 0
    for gpu in [device for device, budget in budgets.items() if isinstance(device, int) and budget > 0]:
        reserve = 0
        for _ in range(_MAX_PASSES):
            effective = {
                device: max(0, budget - (reserve if device == gpu else 0))
                for device, budget in budgets.items()
                if not (isinstance(device, int) and device < gpu)
            }
            raw = _Pass(planner, effective, balanced, low_0, pinned=gpu).run()
            held = {device: 0 for device in raw.values()}
            for name, device in raw.items():
                held[device] += planner.sizes.get(name, 0)
            need, _ = planner._reserve(raw, slots)
            if not held.get(gpu):
                break  # nothing fits on `gpu` beside its reserve
            if need <= reserve:
                gpu_bytes = sum(size for device, size in held.items() if isinstance(device, int))
                if gpu_bytes > best_bytes:
                    best, best_bytes = raw, gpu_bytes
                break
            reserve = need
    return best
