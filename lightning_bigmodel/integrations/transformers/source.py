"""A checkpoint reader seen through a transformers model's conversion rules: its keys are the model's names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from lightning_bigmodel.checkpoint.errors import CheckpointError
from lightning_bigmodel.checkpoint.reader import CheckpointReader, TensorSpec
from lightning_bigmodel.integrations.transformers.rules import ConversionPlan, Unit, convert_unit

_SHOWN = 5


def _sample(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_SHOWN])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > _SHOWN else ''}]"


class ConvertedSource:
    """What :func:`~lightning_bigmodel.checkpoint.load_checkpoint_in_model` streams from for a transformers model.

    It answers like a :class:`~lightning_bigmodel.checkpoint.CheckpointReader` (``keys``, ``spec``, ``borrow``,
    ``read``, ``mmap_view``), with the network's names as keys:

    - a renamed tensor is the checkpoint's own tensor under the model's name: same spec, same zero-copy views;
    - a converted tensor (e.g. fused experts) has no bytes in the checkpoint: its spec says ``is_safetensors=False``
      (so a ``"disk"`` placement writes it once to the offload folder) and it is built when first asked for, from
      its sources only; :meth:`is_fresh` tells the loader it owns its memory (no second copy);
    - checkpoint keys that fit nothing keep their checkpoint names (reported as unexpected).

    Keys come in checkpoint file order (a conversion at its first source), so shards are read front to back.
    """

    def __init__(self, reader: CheckpointReader, network: nn.Module, plan: ConversionPlan) -> None:
        self.reader = reader
        self.checkpoint = reader.checkpoint
        self.network = network
        self._plain: dict[str, str] = dict(plan.renamed)  # key here -> checkpoint key
        self._plain.update({key: key for key in plan.unexpected})
        self._unit_of: dict[str, Unit] = {name: unit for unit in plan.units for name in unit.outputs}
        self._pending: dict[str, torch.Tensor] = {}  # made by a conversion, not yet taken
        self.renamed = {name: key for name, key in plan.renamed.items() if name != key}
        self.units = plan.units
        position = {key: index for index, key in enumerate(reader.keys())}
        order = [(position[key], name) for name, key in self._plain.items()]
        order += [(min(position[key] for _, key in unit.sources), name) for name, unit in self._unit_of.items()]
        self._keys = [name for _, name in sorted(order, key=lambda item: item[0])]  # stable: a unit keeps its order

    # ------------------------------------------------------------------ reader interface
    @property
    def files(self) -> tuple[Path, ...]:
        return self.reader.files

    @property
    def metadata(self) -> Optional[dict[str, Any]]:
        return self.reader.metadata

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._plain or key in self._unit_of

    def __len__(self) -> int:
        return len(self._keys)

    def spec(self, key: str) -> TensorSpec:
        if key in self._plain:
            return self.reader.spec(self._plain[key])
        unit = self._unit(key)
        shape, dtype = unit.outputs[key]
        return TensorSpec(torch.Size(shape), dtype, self.reader.spec(unit.sources[0][1]).file, False)

    def is_fresh(self, key: str) -> bool:
        """Whether :meth:`borrow` gives a tensor made for this call (a converted one): it may be kept as it is."""
        return key in self._unit_of

    def borrow(self, key: str) -> torch.Tensor:
        if key in self._plain:
            return self.reader.borrow(self._plain[key])
        return self._take(key)

    def read(self, key: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        if key in self._plain:
            return self.reader.read(self._plain[key], device)
        return self._take(key).to(device)

    def mmap_view(self, key: str) -> torch.Tensor:
        if key in self._plain:
            return self.reader.mmap_view(self._plain[key])
        raise CheckpointError(f"Tensor {key!r} is converted from several checkpoint tensors; it has no file to map.")

    def close(self) -> None:
        self._pending.clear()
        self.reader.close()

    # ------------------------------------------------------------------ conversion
    def sources_of(self, key: str) -> list[str]:
        """The checkpoint keys ``key`` is read or built from."""
        if key in self._plain:
            return [self._plain[key]]
        return [source for _, source in self._unit(key).sources]

    def _unit(self, key: str) -> Unit:
        try:
            return self._unit_of[key]
        except KeyError:
            raise KeyError(f"Tensor {key!r} is neither in checkpoint {str(self.checkpoint.root)!r} nor built by its "
                           "conversion rules.") from None  # fmt: skip

    def _take(self, key: str) -> torch.Tensor:
        """A converted tensor: built with its unit's other outputs (kept until asked for), from its sources only."""
        if key in self._pending:
            return self._pending.pop(key)
        unit = self._unit(key)
        made = convert_unit(self.network, unit, self.reader.borrow)
        for name, tensor in made.items():
            shape, dtype = unit.outputs[name]
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:  # the meta run said otherwise
                raise RuntimeError(f"Converting `{unit.layer}` gave `{name}` {list(tensor.shape)} {tensor.dtype}, "
                                   f"planned {list(shape)} {dtype}.")  # fmt: skip
        tensor = made.pop(key)
        self._pending.update(made)
        return tensor

    # ------------------------------------------------------------------ checks
    def check_fit(self, missing_parameters: list[str], unexpected: list[str]) -> None:
        """Raise ``ValueError`` when model parameters find no checkpoint tensor while checkpoint tensors fit no model
        tensor, even through the conversion rules: a checkpoint of another class or revision. Call before placing."""
        if not (missing_parameters and unexpected):
            return
        kind = type(self.network).__name__
        raise ValueError(
            f"Checkpoint {str(self.checkpoint.root)!r} does not fit `{kind}`, even through transformers' conversion "
            f"rules for it: {len(missing_parameters)} model parameter(s) are in no checkpoint tensor "
            f"{_sample(missing_parameters)}, and {len(unexpected)} checkpoint tensor(s) fit no model tensor "
            f"{_sample(unexpected)}. The checkpoint is probably for another model class or revision: build the model "
            "from the checkpoint's own config.json (`AutoConfig.from_pretrained(folder)` and the matching "
            "`AutoModel...` class), or use the checkpoint revision this model was made for. Nothing was loaded."
        )
