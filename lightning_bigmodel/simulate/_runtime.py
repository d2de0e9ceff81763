"""Stand-ins for the GPU runtime of the simulated GPUs: current device, streams, events, pinned host memory.

Computation on a simulated GPU is synchronous (it is CPU computation), so streams and events only need to be
*recorded*: each stand-in appends a :class:`Record` to the harness log (which thread, which device, which stream),
and so does every copy between the host and a simulated GPU. Tests read the log to check that copies run on the
stream and thread the code meant (e.g. prefetch on a side stream, waited for by the compute stream).

The current device and the current stream of each device are per thread, as in CUDA; a stream's ``with`` block
makes it current for its device. Pinned memory is stood in for by remembering which CPU storages were "pinned".
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch

from lightning_bigmodel.simulate._backend import BACKEND, STATE, SimTensor, _check_index

DeviceLike = Union[int, str, torch.device, None]
_DEVICE_TYPE: dict = {}  # filled lazily: torch's integer code of the simgpu device type
_next_id = iter(range(1, 2**62))  # stream and event ids (0 is each device's default stream)


@dataclass(frozen=True)
class Record:
    """One entry of the harness log.

    Attributes:
        kind: ``"copy"``, ``"wait_event"``, ``"wait_stream"``, ``"record_event"``, ``"record_stream"``,
            ``"set_device"``, ``"synchronize"``.
        device: the simulated GPU index concerned.
        stream: the id of the stream concerned (0 is the default stream).
        thread: the name of the thread that did it.
        detail: for copies ``"h2d"``, ``"d2h"`` or ``"d2d"``, then ``"pinned"``/``"pageable"`` (host to device) and
            ``"non_blocking"`` when so; for events the event id; for ``wait_stream`` the id of the stream waited for.
        nbytes: for copies, the bytes copied; for ``record_stream``, the bytes of the tensor.
    """

    kind: str
    device: int
    stream: int
    thread: str
    detail: str = ""
    nbytes: int = 0


def _index(device: DeviceLike) -> int:
    if device is None:
        return current_device_index()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return current_device_index() if device.index is None else device.index


def _log(kind: str, device: int, stream: int, detail: str = "", nbytes: int = 0) -> None:
    STATE.log.append(Record(kind, device, stream, threading.current_thread().name, detail, nbytes))


def _device_type_code() -> int:
    if not _DEVICE_TYPE:
        _DEVICE_TYPE["code"] = torch._C.Stream(device=torch.device(BACKEND, 0)).device_type
    return _DEVICE_TYPE["code"]


class SimStream(torch._C.Stream):
    """Stands in for ``torch.Stream`` / ``torch.cuda.Stream`` on a simulated GPU (records, never waits)."""

    def __new__(cls, device: DeviceLike = None, priority: int = 0, *, stream_id: Optional[int] = None, **_):
        index = _index(device)
        _check_index(torch.device(BACKEND, index))
        sid = next(_next_id) if stream_id is None else stream_id
        return super().__new__(cls, stream_id=sid, device_index=index, device_type=_device_type_code())

    def __init__(self, *args, **kwargs) -> None:
        self._previous: list = []

    def wait_event(self, event: "SimEvent") -> None:
        _log("wait_event", self.device_index, self.stream_id, str(getattr(event, "sim_id", "?")))

    def wait_stream(self, stream: torch.Stream) -> None:
        _log("wait_stream", self.device_index, self.stream_id, str(stream.stream_id))

    def record_event(self, event: Optional["SimEvent"] = None) -> "SimEvent":
        event = SimEvent() if event is None else event
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        _log("synchronize", self.device_index, self.stream_id)

    def __enter__(self) -> "SimStream":
        context = StreamContext(self)
        self._previous.append(context)
        context.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self._previous.pop().__exit__(*exc_info)

    @property
    def device(self) -> torch.device:
        return torch.device(BACKEND, self.device_index)


class SimEvent(torch._C.Event):
    """Stands in for ``torch.Event`` / ``torch.cuda.Event`` on a simulated GPU (records, never waits)."""

    def __new__(cls, device: DeviceLike = None, *, enable_timing: bool = False, **_):
        return super().__new__(cls, device=torch.device("cpu"), enable_timing=enable_timing)

    def __init__(self, *args, blocking: bool = False, **kwargs) -> None:
        self.sim_id = next(_next_id)
        self.blocking = blocking  # `synchronize` sleeps (True) or spins a CPU core (False), as CUDA's flag says
        self.recorded_on: Optional[tuple[int, int]] = None

    def record(self, stream: Optional[torch.Stream] = None) -> None:
        stream = current_stream() if stream is None else stream
        self.recorded_on = (stream.device_index, stream.stream_id)
        _log("record_event", stream.device_index, stream.stream_id, str(self.sim_id))

    def wait(self, stream: Optional[torch.Stream] = None) -> None:
        stream = current_stream() if stream is None else stream
        _log("wait_event", stream.device_index, stream.stream_id, str(self.sim_id))

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: "SimEvent") -> float:
        return 0.0


def _thread_state() -> threading.local:
    local = STATE.local
    if not hasattr(local, "streams"):
        local.device, local.streams = 0, {}
    return local


def current_device_index() -> int:
    return _thread_state().device


def set_device_index(device: DeviceLike) -> None:
    index = _index(device)
    if index >= 0:  # -1 means "leave unchanged" in torch's device guards
        _check_index(torch.device(BACKEND, index))
        _thread_state().device = index
        _log("set_device", index, current_stream(index).stream_id)


def current_stream(device: DeviceLike = None) -> SimStream:
    index = _index(device)
    streams = _thread_state().streams
    if index not in streams:
        streams[index] = default_stream(index)
    return streams[index]


def default_stream(device: DeviceLike = None) -> SimStream:
    index = _index(device)
    if index not in STATE.default_streams:
        STATE.default_streams[index] = SimStream(index, stream_id=0)
    return STATE.default_streams[index]


def set_stream(stream: torch.Stream) -> None:
    """Make ``stream`` current on its device, and its device current, in this thread (as ``torch.cuda.set_stream``)."""
    if current_device_index() != stream.device_index:
        set_device_index(stream.device_index)
    _thread_state().streams[stream.device_index] = stream


class StreamContext:
    """Stands in for ``torch.cuda.stream(s)`` / ``with s:``: make ``s`` current; on exit put back the stream of ``s``'s
    device and then the stream (and so the device) that was current before, as CUDA's ``StreamContext`` does."""

    def __init__(self, stream: Optional[torch.Stream]) -> None:
        self.stream = stream
        self.source: Optional[SimStream] = None
        self.destination: Optional[SimStream] = None

    def __enter__(self) -> Optional[torch.Stream]:
        if self.stream is None:
            return None
        self.source = current_stream()
        self.destination = current_stream(self.stream.device_index)
        set_stream(self.stream)
        return self.stream

    def __exit__(self, *exc_info) -> None:
        if self.stream is None:
            return
        if self.source.device_index != self.stream.device_index:
            set_stream(self.destination)
        set_stream(self.source)


def synchronize(device: DeviceLike = None) -> None:
    index = _index(device)
    _log("synchronize", index, current_stream(index).stream_id)


class device_index:  # noqa: N801 (stands in for the `torch.accelerator.device_index` class)
    """Stands in for ``torch.accelerator.device_index``: make a simulated GPU current inside a ``with`` block."""

    def __init__(self, device: DeviceLike, /) -> None:
        self.index, self.previous = (None if device is None else _index(device)), None

    def __enter__(self) -> None:
        if self.index is not None:
            self.previous = current_device_index()
            set_device_index(self.index)

    def __exit__(self, *exc_info) -> None:
        if self.previous is not None:
            set_device_index(self.previous)


# Pinned host memory: which CPU storages were "pinned" (by id, with a weak reference to tell a reused id apart).
_PINNED: dict[int, weakref.ref] = {}


def pin(tensor: torch.Tensor) -> torch.Tensor:
    """Mark ``tensor`` (a CPU tensor) as pinned host memory; return it."""
    storage = tensor.untyped_storage()
    _PINNED[id(storage)] = weakref.ref(storage)
    return tensor


def is_pinned(tensor: torch.Tensor) -> bool:
    if isinstance(tensor, SimTensor) or tensor.device.type != "cpu":
        return False
    storage = tensor.untyped_storage()
    ref = _PINNED.get(id(storage))
    return ref is not None and ref() is storage


def pinned_bytes() -> int:
    """Bytes of the live pinned host storages."""
    return sum(s.nbytes() for s in (ref() for ref in list(_PINNED.values())) if s is not None)


def clear_pinned() -> None:
    _PINNED.clear()


def log_copy(
    func, args: tuple, kwargs: dict, source: Optional[torch.device], destination: Optional[torch.device]
) -> None:
    """Record a copy between the host and a simulated GPU, or between two of them (``copy_`` and ``_to_copy``)."""
    name = func._schema.name
    if name == "aten::copy_":
        src, non_blocking = args[1], bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
        src_dev, dst_dev = args[1].device, args[0].device
    elif name in ("aten::_to_copy", "aten::to") and source is not None and destination is not None:
        src, non_blocking = args[0], bool(kwargs.get("non_blocking", False))
        if func._overloadname == "device" and len(args) > 3:  # aten::to.device(self, device, dtype, non_blocking)
            non_blocking = bool(args[3])
        src_dev, dst_dev = source, destination
    else:
        return
    src_sim, dst_sim = src_dev.type == BACKEND, dst_dev.type == BACKEND
    if src_sim and dst_sim and dst_dev.index is None:
        dst_dev = torch.device(BACKEND, current_device_index())
    if src_sim == dst_sim and (not src_sim or src_dev == dst_dev):
        return
    direction = "d2d" if src_sim and dst_sim else ("d2h" if src_sim else "h2d")
    index = (dst_dev if dst_sim else src_dev).index
    detail = [direction]
    if direction == "h2d":
        detail.append("pinned" if is_pinned(src) else "pageable")
    if non_blocking:
        detail.append("non_blocking")
    _log("copy", index, current_stream(index).stream_id, " ".join(detail), src.numel() * src.element_size())


def log_record_stream(tensor: SimTensor, stream: torch.Stream) -> None:
    """Record ``tensor.record_stream(stream)``, with the tensor's bytes (which copy or output it was)."""
    _log("record_stream", tensor.device.index, stream.stream_id, nbytes=tensor.numel() * tensor.element_size())
