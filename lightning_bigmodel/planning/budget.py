"""Memory budgets: normalise a user's ``max_memory`` and detect free memory per device. Never moves a tensor."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from lightning_bigmodel._accelerator import gpu_count, memory_info
from lightning_bigmodel.planning import cgroup as _cgroup
from lightning_bigmodel.planning.cgroup import CgroupMemory, cgroup_memory
from lightning_bigmodel.planning.devices import DeviceKey, normalize_device
from lightning_bigmodel.planning.sizes import parse_size
from lightning_bigmodel.planning.table import format_bytes

# Free GPU memory kept back when budgets are detected: the CUDA context, cuBLAS/cuDNN workspaces, the caching
# allocator's fragmentation and the activations of a forward pass need room beside the weights.
_MIN_GPU_HEADROOM = 2**30  # 1 GiB
_GPU_HEADROOM_FRACTION = 0.10  # of the device's total memory
# Free RAM kept back from a detected CPU budget for the process itself: the interpreter and libraries growing, the
# allocator holding on to freed activations, a tensor being converted while loading, and, when the plan is made
# without an input shape, the activations of a forward too. A plan made for an input shape (`input_shape=`, see
# `lightning_bigmodel.fitting`) keeps room for the simulated activations of that batch beside the weights on top of
# this headroom; without one, this fixed number is all the activations get (GPT-2-large fp32 in a 1.6 GiB cgroup:
# enough for a 1 x 8 decode, not for a 4 x 128 prefill, whose logits alone take 103 MB).
_MIN_CPU_HEADROOM = 256 * 2**20  # 256 MiB
_CPU_HEADROOM_FRACTION = 0.05  # of the free memory found
# Layers of disk weights read ahead of the one computing on a CPU execution device; the planner keeps
# (1 + READ_AHEAD_LAYERS) times the largest disk layer of the CPU budget free for that stream.
READ_AHEAD_LAYERS = 1


def _normalize_key(key: object) -> DeviceKey:
    if isinstance(key, str) and key.strip().lower() == "disk":
        return "disk"
    try:
        return normalize_device(key)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(
            f"`max_memory` has an unknown key {key!r}. Use GPU indices (0, 1 or 'cuda:1'), 'cpu' and 'disk'."
        ) from None


def _order(budget: Mapping[DeviceKey, int]) -> dict[DeviceKey, int]:
    gpus = sorted(key for key in budget if isinstance(key, int))
    return {key: budget[key] for key in [*gpus, "cpu", "disk"] if key in budget}


def get_max_memory(
    max_memory: Optional[Mapping[DeviceKey, Union[int, str]]] = None,
    gpus: Optional[Sequence[int]] = None,
    simulated_activations: bool = False,
) -> dict[DeviceKey, int]:
    """Normalise a budget ``{0: "10GiB", "cpu": "30GB", "disk": ...}`` to bytes, GPUs first (ascending), then "cpu", "disk".

    Keys may be GPU indices (``1``, ``"1"``, ``"cuda:1"``, ``torch.device("cuda", 1)``), ``"cpu"`` and ``"disk"``;
    values are anything :func:`parse_size` accepts. A device left out of a given budget gets nothing, except disk,
    which the planner treats as unlimited unless budgeted.

    With a budget given, CUDA is never touched (GPU ids are taken as written; ``check_devices_exist`` in
    ``device_map`` checks them against the visible GPUs). With ``None``, every visible GPU gets its free memory
    minus a headroom of ``max(1 GiB, 10% of its total memory)`` for the CUDA context, workspaces and activations,
    and "cpu" gets :func:`detect_cpu_memory`: the smaller of the room under the process's memory cgroup limit and the
    available RAM, minus ``max(256 MiB, 5%)`` for the process (a given ``"cpu"`` budget above it warns). ``gpus`` limits
    detection to those GPU indices (the Trainer's or a replica's): no other GPU is queried, so none gets a context or
    fails when another job owns it. ``simulated_activations=True`` (planning for an input shape, whose activations
    the memory simulation reserves instead) keeps only 1 GiB per GPU for the CUDA context and workspaces; the CPU
    keeps its headroom (the process), and the plan then keeps room for the simulated activations beside its weights.

    Raises:
        ValueError: for an unknown or repeated key, or a malformed size.
    """
    if max_memory is None:
        return _detect_max_memory(gpus, simulated_activations)
    budget: dict[DeviceKey, int] = {}
    for key, value in max_memory.items():
        device = _normalize_key(key)
        if device in budget:
            raise ValueError(f"`max_memory` names device {device!r} twice (key {key!r}); give each device once.")
        try:
            budget[device] = parse_size(value)
        except ValueError as err:
            raise ValueError(f"`max_memory[{key!r}]`: {err}") from None
    if "cpu" in budget:
        _warn_above_detected(budget["cpu"])
    return _order(budget)


def _detect_max_memory(gpus: Optional[Sequence[int]] = None, simulated_activations: bool = False) -> dict[DeviceKey, int]:
    budget: dict[DeviceKey, int] = {}
    if gpus is None:
        gpus = range(gpu_count())
    for index in sorted(set(gpus)):
        try:
            free, total = memory_info(index)
        except RuntimeError as err:  # e.g. an exclusive-process GPU another job holds
            warnings.warn(
                f"GPU {index} cannot be queried ({str(err).strip().splitlines()[0]}); it gets no budget. Hide it "
                "(`CUDA_VISIBLE_DEVICES`) or give `max_memory` explicitly.",
                stacklevel=3,
            )
            free, total = 0, 0
        fraction = 0.0 if simulated_activations else _GPU_HEADROOM_FRACTION  # activations: reserved by simulation
        headroom = max(_MIN_GPU_HEADROOM, int(total * fraction))
        budget[index] = max(0, free - headroom)
    budget["cpu"] = _available_cpu_memory()
    return budget


@dataclass(frozen=True)
class CpuMemory:
    """The detected CPU budget and where it comes from.

    Attributes:
        budget: bytes for weights kept in RAM: ``free - headroom`` (never negative).
        source: ``"cgroup limit"`` when the process's memory cgroup leaves less room than the available RAM, else
            ``"available RAM"``.
        free: the smaller of the cgroup's room (limit minus non-reclaimable use) and the available RAM.
        available: ``MemAvailable`` of ``/proc/meminfo`` (else free pages from ``os.sysconf``).
        headroom: bytes kept back for the process: ``max(256 MiB, 5% of free)``; without an input shape to plan for,
            also all the activations of a forward get (see :func:`lightning_bigmodel.infer_device_map`).
        cgroup: the binding cgroup limit, or ``None`` when no cgroup limits memory.
    """

    budget: int
    source: str
    free: int
    available: int
    headroom: int
    cgroup: Optional[CgroupMemory]

    def describe(self) -> str:
        """``"cgroup limit 1.6 GiB (1.2 GiB free)"`` or ``"available RAM 22.9 GiB"``: the figure behind the budget."""
        if self.source == "cgroup limit" and self.cgroup is not None:
            return f"cgroup limit {format_bytes(self.cgroup.limit)} ({format_bytes(self.free)} free)"
        return f"available RAM {format_bytes(self.free)}"


def detect_cpu_memory() -> CpuMemory:
    """The CPU budget of this process: the smaller of its cgroup's room and the available RAM, minus a headroom.

    A container's memory limit (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``, the tightest along the
    cgroup's ancestors) is invisible in ``/proc/meminfo``; ignoring it gets the process OOM-killed. See
    :func:`~lightning_bigmodel.planning.cgroup.cgroup_memory`.
    """
    available = _available_ram()
    limit = cgroup_memory()
    if limit is not None and limit.room < available:
        source, free = "cgroup limit", limit.room
    else:
        source, free = "available RAM", available
    headroom = max(_MIN_CPU_HEADROOM, int(free * _CPU_HEADROOM_FRACTION))
    return CpuMemory(max(0, free - headroom), source, free, available, headroom, limit)


def budget_sources(max_memory: Optional[Mapping[DeviceKey, Union[int, str]]] = None) -> dict[DeviceKey, str]:
    """Where each budget of ``get_max_memory(max_memory)`` comes from, for the device-map table.

    ``"max_memory"`` for every device of a given budget; detected: ``"free memory"`` for GPUs and the CPU's
    :attr:`CpuMemory.source` (``"cgroup limit"`` or ``"available RAM"``).
    """
    if max_memory is not None:
        return {key: "max_memory" for key in get_max_memory(max_memory)}
    sources: dict[DeviceKey, str] = {}
    sources.update({index: "free memory" for index in range(gpu_count())})
    sources["cpu"] = detect_cpu_memory().source
    return sources


def _warn_above_detected(cpu: int) -> None:
    """Warn when a given CPU budget exceeds what this process can really hold."""
    detected = detect_cpu_memory()
    if cpu <= detected.free:
        return
    warnings.warn(
        f"`max_memory['cpu']`={format_bytes(cpu)} ({cpu} bytes) is above the {detected.source} of this process: "
        f"{format_bytes(detected.free)} ({detected.free} bytes) free"
        + (f" under the limit of {detected.cgroup.path}" if detected.source == "cgroup limit" else "")
        + f". Weights planned for the CPU may not fit and the process may be OOM-killed. Lower `max_memory['cpu']` "
        f"(the detected budget, which keeps {format_bytes(detected.headroom)} for the process, is {detected.budget} "
        "bytes), or pass `max_memory=None` to use it.",
        stacklevel=3,
    )


def check_layer_fits(nbytes: int, name: str) -> None:
    """Raise ``ValueError`` when the process's cgroup leaves less room than ``name`` (``nbytes``), the largest piece of
    the model that must be in memory at once: even streamed from disk it could not run."""
    limit = cgroup_memory()
    if limit is None or nbytes <= limit.room:
        return
    raise ValueError(
        f"The memory cgroup limit of this process, {format_bytes(limit.limit)} ({limit.limit} bytes, "
        f"{limit.path}), leaves {format_bytes(limit.room)} ({limit.room} bytes) free, less than the largest layer "
        f"that must be in memory at once: `{name}` ({format_bytes(nbytes)}, {nbytes} bytes). Raise the memory limit "
        f"(e.g. the pod's `resources.limits.memory` or the job's `--mem`), load in a smaller `dtype`, or let `{name}` "
        "be split (take its class out of `no_split_module_classes`)."
    )


def _available_cpu_memory() -> int:
    """The detected CPU budget in bytes (see :func:`detect_cpu_memory`)."""
    return detect_cpu_memory().budget


def _available_ram() -> int:
    """Available RAM in bytes: ``MemAvailable`` from ``/proc/meminfo``, else free pages from ``os.sysconf``."""
    try:
        with open(_cgroup.SYSTEM_ROOT / "proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # reported in kB (KiB)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0
