"""Resident ("cpu") blocks spread among streamed ("disk") ones when the offloaded layers compute on the CPU.

The greedy walk fills the devices in module order, so a model that overflows the CPU budget gets its first blocks on
"cpu" and all the later ones on "disk". Computing on the CPU, the disk stream reads the next "disk" blocks into its
buffers while the compute runs, and it can only read as far ahead as its buffers reach: through a run of "cpu" blocks
(and the resident head and tail of the model, e.g. a tied embedding and LM head) it fills them and then stands idle,
while a forward that is bound by its reads pays for every idle moment. Measured on the larger-than-memory benchmark
(GPT-2-large shape, 1.6 GiB cgroup): the disk was idle for the whole run of resident blocks at the start of each
forward, 0.4-0.5 s of 3.4 s on a slow minute.

Which of a run of identical sibling blocks (one class, one size, under one parent: the layers of a ``ModuleList``)
are resident changes nothing else: the same bytes sit on each device, the budgets hold as planned, and every weight
still lands whole on one device. So under CPU execution the walk's "cpu" blocks of such a run are respread evenly
over it, and the stream reads during each resident block's compute. Blocks holding a tied weight keep their place
(their partner decided it), and nothing moves under GPU execution, where "cpu" and "disk" blocks both stream to the
GPU one at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_bigmodel.planning._planner import _Planner
    from lightning_bigmodel.planning.devices import DeviceMap


def spread_positions(count: int, among: int) -> list[int]:
    """``count`` indices in ``range(among)``, evenly spaced, each in the middle of its share (increasing, distinct)."""
    return [(2 * index + 1) * among // (2 * count) for index in range(count)]


def interleave_resident(raw: DeviceMap, planner: _Planner) -> DeviceMap:
    """``raw`` with the "cpu" members of each run of identical sibling blocks spread evenly among its "disk" members
    (see the module docstring); a copy, in the same key order. For a plan whose offloaded layers compute on the CPU."""
    runs: dict[tuple, list[str]] = {}
    for name, device in raw.items():
        module = planner.modules.get(name)
        if device not in ("cpu", "disk") or module is None or not name or name in planner.tied_prefixes:
            continue
        parent = name.rpartition(".")[0]
        key = (parent, type(module).__name__, planner.sizes.get(name, 0), planner.moved(name))
        runs.setdefault(key, []).append(name)
    out, position = dict(raw), {name: index for index, name in enumerate(planner.modules)}
    for members in runs.values():
        members.sort(key=position.__getitem__)
        resident = sum(out[name] == "cpu" for name in members)
        if not resident or resident == len(members):
            continue
        chosen = set(spread_positions(resident, len(members)))
        for index, name in enumerate(members):
            out[name] = "cpu" if index in chosen else "disk"
    return out
