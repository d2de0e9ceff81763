"""Per-tensor readers: safetensors through their header and memory-mapped views, pickles through
``torch.load(mmap=True, weights_only=True)``.

Every shard is opened once, when the checkpoint is scanned (:class:`~lightning_bigmodel.checkpoint.shard.ShardHandle`),
and every tensor is read from that descriptor: a shard replaced or deleted during the load is still the planned file;
one truncated, extended or rewritten in place raises :class:`CheckpointError` naming it before a byte is read from it.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from lightning_bigmodel.checkpoint.errors import CheckpointError, CheckpointNotFoundError
from lightning_bigmodel.checkpoint.resolve import ResolvedCheckpoint, is_safetensors, resolve_checkpoint
from lightning_bigmodel.checkpoint.safetensors_view import SafetensorsHeader, open_mmap, read_header, view
from lightning_bigmodel.checkpoint.shard import ShardHandle, ensure_descriptors


def descriptors_needed(files) -> int:
    """Descriptors a load of ``files`` holds at once: each shard's handle, plus the track of each mapped file (the
    read-ahead's, or that of a pickle shard's tensors used in place), plus the one ``torch.load`` opens while it reads a
    pickle shard."""
    return 2 * len(files) + 1


@dataclass(frozen=True)
class TensorSpec:
    shape: torch.Size
    dtype: torch.dtype
    file: Path
    is_safetensors: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def load_pickle_state_dict(path: Path, handle: Optional[ShardHandle] = None) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint, memory-mapped, loaded with ``weights_only=True`` only (never runs code).

    A Lightning checkpoint (``.ckpt``, or any dict with a nested ``"state_dict"``) gives its ``"state_dict"``. With
    ``handle`` (the shard opened once), the file read is the handle's, through its ``/proc/self/fd`` path: a shard
    replaced since it was opened is not read.
    """
    source = path if handle is None else handle.proc_path
    if handle is not None:
        handle.check()
    try:
        obj = torch.load(source, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise _unloadable(path, err) from err
        obj = _load_unmapped(path, source)  # legacy (non-zip) torch.save format cannot be memory-mapped
    except Exception as err:  # noqa: BLE001 - torch.load raises many types; each means "not a safe weights file"
        raise _unloadable(path, err) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)."
        )
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _load_unmapped(path: Path, source: Union[str, Path]) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise _unloadable(path, err) from err


def _reason(err: BaseException) -> str:
    """The informative line of a ``torch.load`` error (its weights-only message is a long how-to-bypass text)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0].split(". ")[0][:300] if lines else ""
    return f"{type(err).__name__}: {first}"


def _unloadable(path: Path, err: BaseException) -> CheckpointError:
    if isinstance(err, OSError) and err.errno == errno.EMFILE:
        return CheckpointError(
            f"Cannot open checkpoint {str(path)!r}: the process ran out of file descriptors ({err}). Raise the limit "
            "(`ulimit -n`) or use fewer, larger shards."
        )
    return CheckpointError(
        f"Cannot load checkpoint {str(path)!r} with `torch.load(weights_only=True)` ({_reason(err)}). It is corrupt, truncated, or holds objects other than tensors; checkpoints are never "
        "unpickled with arbitrary code. If you trust its source, re-save its state dict with safetensors."
    )


class CheckpointReader:
    """Lazy view over a (sharded) checkpoint. Use as a context manager; at most one pickle shard is mapped at a time.

    Opening validates the whole checkpoint before any weight is read: every safetensors header is parsed strictly,
    every pickle shard is mapped (``weights_only=True``), an index must agree with its shards, no key may appear in two
    shards and no shard may be empty. Each failure raises a ``CheckpointError`` (a ``ValueError``) naming the culprit.

    Each shard is opened once, then (:attr:`handles`); every read comes from that descriptor, after a check that the
    file was not changed in place (:meth:`ShardHandle.check`). Closing drops the handles: a descriptor closes with the
    last reference to its handle.
    """

    def __init__(self, checkpoint: Union[str, Path, ResolvedCheckpoint]) -> None:
        self.checkpoint = resolve_checkpoint(checkpoint)
        self._headers: dict[Path, SafetensorsHeader] = {}
        self.handles: dict[Path, ShardHandle] = {}  # every shard, opened once when scanned
        self._maps: dict[Path, Any] = {}
        self._pickle: Optional[tuple[Path, dict[str, torch.Tensor]]] = None
        self._specs: dict[str, TensorSpec] = {}
        self._scan()

    # ------------------------------------------------------------------ opening and validation
    def _open(self, file: Path) -> ShardHandle:
        try:
            handle = ShardHandle(file, safetensors=False)
        except FileNotFoundError as err:
            raise CheckpointNotFoundError(
                f"Checkpoint shard {str(file)!r} disappeared before it could be opened ({err}). Restore it."
            ) from err
        except OSError as err:
            raise CheckpointError(f"Cannot open checkpoint shard {str(file)!r} ({err}).") from err
        self.handles[file] = handle
        return handle

    def _file_specs(self, file: Path) -> dict[str, TensorSpec]:
        handle = self._open(file)
        if handle.size == 0:
            raise CheckpointError(f"Checkpoint shard {str(file)!r} is empty (0 bytes). Re-download or re-save it.")
        if is_safetensors(file):
            header = self._headers[file] = read_header(file, handle)
            specs = {k: TensorSpec(torch.Size(e.shape), e.dtype, file, True) for k, e in header.entries.items()}
        else:
            tensors = self._pickle_dict(file)
            specs = {k: TensorSpec(t.shape, t.dtype, file, False) for k, t in tensors.items()}
        if not specs:
            raise CheckpointError(f"Checkpoint shard {str(file)!r} holds no tensors. Re-download or re-save it.")
        return specs

    def _scan(self) -> None:
        files = self.checkpoint.files
        ensure_descriptors(descriptors_needed(files), f"Checkpoint {str(self.checkpoint.root)!r} ({len(files)} shards)")
        found: dict[str, TensorSpec] = {}
        for file in files:
            for key, spec in self._file_specs(file).items():
                if key in found:
                    raise CheckpointError(
                        f"Tensor {key!r} appears in two shards, {str(found[key].file)!r} and {str(file)!r}. "
                        "The checkpoint is inconsistent: re-save it, or remove the stale shard."
                    )
                found[key] = spec
        weight_map = self.checkpoint.weight_map
        if weight_map is None:
            self._specs = found
            return
        for key, file in weight_map.items():
            spec = found.get(key)
            if spec is None or spec.file != file:
                actual = f" (it is in {str(spec.file)!r})" if spec is not None else ""
                raise CheckpointError(
                    f"Index {str(self.checkpoint.index)!r} maps tensor {key!r} to shard {str(file)!r}, which does "
                    f"not hold it{actual}. The index and shards disagree: re-download the checkpoint or fix the index."
                )
        order = {file: i for i, file in enumerate(self.checkpoint.files)}
        keys = sorted(weight_map, key=lambda k: order[weight_map[k]])  # stable: index order within a file
        self._specs = {k: found[k] for k in keys}

    def _pickle_dict(self, file: Path) -> dict[str, torch.Tensor]:
        if self._pickle is None or self._pickle[0] != file:
            self._pickle = None  # drop the previous shard's mapping before opening the next
            self._pickle = (file, load_pickle_state_dict(file, self.handles[file]))
        return self._pickle[1]

    # ------------------------------------------------------------------ queries
    @property
    def files(self) -> tuple[Path, ...]:
        return self.checkpoint.files

    def identity(self) -> list[dict[str, Any]]:
        """What identifies the files being read (as opened): path, size, inode, device, ctime, mtime, header digest."""
        return [self.handles[file].identity() for file in self.checkpoint.files]

    def handle(self, key: str) -> ShardHandle:
        """The open handle of the shard holding ``key``, checked unchanged (:meth:`ShardHandle.check`)."""
        handle = self.handles[self.spec(key).file]
        handle.check()
        return handle

    @property
    def metadata(self) -> Optional[dict[str, Any]]:
        """The index's ``"metadata"`` (HF format), else the ``__metadata__`` of a single safetensors file."""
        if self.checkpoint.metadata is not None:
            return self.checkpoint.metadata
        if len(self.checkpoint.files) == 1 and self.checkpoint.files[0] in self._headers:
            return self._headers[self.checkpoint.files[0]].metadata
        return None

    def keys(self) -> list[str]:
        """Every tensor name, grouped by file in index order."""
        return list(self._specs)

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, key: str) -> TensorSpec:
        """Shape, dtype and file of ``key``, read from headers only."""
        try:
            return self._specs[key]
        except KeyError:
            some = list(self._specs)[:5]
            raise KeyError(f"Tensor {key!r} is not in checkpoint {str(self.checkpoint.root)!r} (it has e.g. {some}).") from None

    # ------------------------------------------------------------------ reading
    def read(self, key: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """A fresh tensor that owns its memory (safe to keep after ``close``). Safetensors are read with ``pread``
        from the shard's descriptor (no memory map: a shard truncated meanwhile raises, never ``SIGBUS``)."""
        spec = self.spec(key)
        if spec.is_safetensors:
            return self.handle(key).read(self._headers[spec.file].entries[key]).to(device)
        return self.borrow(key).to(device=device, copy=True)

    def borrow(self, key: str) -> torch.Tensor:
        """The tensor without a copy (a file view for safetensors, the memory-mapped pickle tensor otherwise).

        Valid only while this reader is open and never to be written: use it to copy or convert from.
        """
        spec = self.spec(key)
        if spec.is_safetensors:
            return self.mmap_view(key)
        self.handle(key)  # the shard kept its size
        return self._pickle_dict(spec.file)[key]

    def mmap_view(self, key: str) -> torch.Tensor:
        """Zero-copy CPU tensor backed by the safetensors file itself (page cache). Safetensors only.

        The view keeps the file's memory map alive on its own, also after ``close``. Writes to it stay private.
        """
        spec = self.spec(key)
        if not spec.is_safetensors:
            raise CheckpointError(
                f"Tensor {key!r} is in pickle shard {str(spec.file)!r}; only safetensors can be memory-mapped views. "
                "Use `read()` (or save the checkpoint as safetensors)."
            )
        handle = self.handle(key)
        mapping = self._maps.get(spec.file)
        if mapping is None:
            mapping = self._maps[spec.file] = open_mmap(spec.file, handle)
        return view(mapping, self._headers[spec.file].entries[key])

    def iter_tensors(
        self, keys: Optional[Iterable[str]] = None, device: Union[str, torch.device] = "cpu"
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` file by file, tensor by tensor (only one tensor materialised at a time)."""
        wanted = self.keys() if keys is None else list(keys)
        for key in wanted:
            self.spec(key)  # fail on an unknown key before yielding anything
        order = {file: i for i, file in enumerate(self.checkpoint.files)}
        for key in sorted(wanted, key=lambda k: order[self._specs[k].file]):
            yield key, self.read(key, device)

    def close(self) -> None:
        """Forget the memory maps, the mapped pickle shard and the handles. Views already handed out stay valid."""
        self._maps.clear()  # not unmapped here: live views still reference the maps, which go with the last view
        self._pickle = None
        self.handles.clear()  # a handle still referenced elsewhere (a tracked map, a stream) keeps its descriptor

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
