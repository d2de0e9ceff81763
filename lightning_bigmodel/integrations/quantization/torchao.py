"""Weight-only quantization with torchao, one tensor at a time, while a checkpoint streams in.

torchao is imported here only, and only when quantization is asked (``pip install "lightning-bigmodel[quantization]"``).
:class:`TorchaoQuantizer` is the per-tensor transform that
:func:`~lightning_bigmodel.checkpoint.loading.load_checkpoint_in_model` applies (see
:class:`~lightning_bigmodel.checkpoint.transform.TensorTransform`): a checkpoint tensor, cast to the compute dtype on
the CPU, becomes the same tensor subclass ``torchao.quantization.quantize_`` would install (``Int8Tensor`` for
``"int8"``: symmetric, per output row; ``Int4TilePackedTo4dTensor`` for ``"int4"``), so outputs equal those of the
plainly loaded model quantized by torchao afterwards.

Kernels (torchao 0.18 with torch 2.13): ``"int8"`` runs wherever PyTorch runs (CPU and CUDA: the weight-only path
is a plain matmul over the int8 data, scaled per row). ``"int4"`` has a kernel on CUDA only (tinygemm, compute
capability 8.0 or newer, bfloat16); on the CPU torchao 0.18 offers none for x86 (its int4 CPU layouts need ARM
KleidiAI or its own C++ kernels, which the wheel does not ship), so ``"int4"`` with a CPU execution device is refused.
"""

from __future__ import annotations

import logging
import warnings
from importlib import metadata
from typing import Any, Optional, Sequence

import torch

from lightning_bigmodel.integrations.quantization.spec import QuantizationSpec, quantized_nbytes
from lightning_bigmodel.offload.subclass import decode_context, encode_context, inner_tensors

__all__ = ["TorchaoQuantizer", "check_kernel", "import_torchao", "torchao_version"]

_EXTRA = 'pip install "lightning-bigmodel[quantization]"'
_MIN_VERSION = (0, 18)  # the release tested (with torch 2.13); Int8Tensor and its flatten protocol as used here


def torchao_version() -> Optional[str]:
    """The installed torchao version (from package metadata: nothing is imported), or ``None``."""
    try:
        return metadata.version("torchao")
    except metadata.PackageNotFoundError:
        return None


def import_torchao() -> Any:
    """Import ``torchao.quantization``, or raise ``ImportError`` naming the extra to install.

    torchao logs at import that its optional CUDA extensions cannot be loaded on a CPU build, and torch warns about
    one of its enums: both are silenced here (they say nothing about what this package uses).
    """
    version = torchao_version()
    if version is None:
        raise ImportError(f"`quantization=` needs torchao, which is not installed. Install it: {_EXTRA}")
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < _MIN_VERSION:
        raise ImportError(f"`quantization=` needs torchao >= 0.18, found {version}. Upgrade it: {_EXTRA}")
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as quantization
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return quantization


def check_kernel(spec: QuantizationSpec, devices: Sequence[torch.device], dtypes: Sequence[torch.dtype]) -> None:
    """Raise ``ValueError`` when ``spec`` has no torchao kernel on one of the execution ``devices``.

    Args:
        spec: the quantization.
        devices: every device quantized weights compute on.
        dtypes: the dtypes the quantized weights are loaded in.
    """
    if spec.method != "int4":
        return
    cpu = sorted({str(d) for d in devices if d.type != "cuda"})
    if cpu:
        raise ValueError(
            f"`quantization='int4'` has no torchao kernel for execution device(s) {cpu}: torchao ships int4 "
            "weight-only kernels for CUDA GPUs only (compute capability 8.0+, bfloat16). Use `quantization='int8'` "
            "(CPU and GPU), or run on a GPU."
        )
    for device in sorted({d for d in devices}, key=str):
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise ValueError(
                f"`quantization='int4'` needs a GPU of compute capability 8.0 or newer for torchao's int4 kernel; "
                f"{device} has {major}.{minor}. Use `quantization='int8'`."
            )
    other = sorted({str(d).removeprefix("torch.") for d in dtypes if d != torch.bfloat16})
    if other:
        raise ValueError(
            f"`quantization='int4'` computes in bfloat16 (torchao's int4 GPU kernel), but the weights load as {other}. "
            "Pass `dtype=torch.bfloat16` (or `\"bfloat16\"`), or use `quantization='int8'`."
        )


class TorchaoQuantizer:
    """The per-tensor quantizing step (a :class:`~lightning_bigmodel.checkpoint.transform.TensorTransform`).

    Args:
        spec: the quantization.
        weights: ``{weight name: (out_features, in_features)}`` to quantize
            (:func:`~lightning_bigmodel.integrations.quantization.spec.quantized_weights`).
        transposed: those of ``weights`` stored ``(in, out)`` (transformers' ``Conv1D``): quantized as their transpose,
            and their module then computes ``F.linear`` with it (:meth:`finish`).
    """

    def __init__(
        self, spec: QuantizationSpec, weights: dict[str, tuple[int, int]], transposed: frozenset = frozenset()
    ) -> None:
        self.spec = spec
        self.weights = dict(weights)
        self.transposed = frozenset(transposed)
        quantization = import_torchao()
        if spec.method == "int8":
            self._cls = quantization.Int8Tensor
        else:
            from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import (
                Int4TilePackedTo4dTensor,
            )

            self._cls = Int4TilePackedTo4dTensor
        self._granularity = quantization.PerRow()
        # Offload files written for another method, class or torchao release are rewritten, never reused.
        self.form = {"quantization": spec.method, "class": self._cls.__name__, "torchao": torchao_version()}

    def selects(self, name: str) -> bool:
        return name in self.weights

    def stored_nbytes(self, name: str) -> int:
        return quantized_nbytes(self.spec, *self.weights[name])

    def convert(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The quantized form of ``tensor`` (already in the compute dtype), for a weight computing on ``device``.

        ``"int8"`` is quantized where ``tensor`` is (the CPU while loading); ``"int4"`` on ``device``, since its
        packing runs on the GPU only.
        """
        with torch.no_grad():
            if name in self.transposed:  # Conv1D: (in, out) -> the (out, in) layout torchao's linear kernels take
                tensor = tensor.t().contiguous()
            if self.spec.method == "int8":
                return self._cls.from_hp(tensor, granularity=self._granularity)
            return self._cls.from_hp(tensor.to(device), [1, self.spec.group_size])

    def finish(self, model: torch.nn.Module) -> None:
        """After loading: each ``Conv1D`` whose weight is now quantized ``(out, in)`` computes ``F.linear`` with it.

        Its class becomes a subclass (still a ``Conv1D``, same name) whose forward is ``F.linear(x, weight, bias)``:
        ``Conv1D``'s own ``addmm(bias, x, weight)`` needs the ``(in, out)`` weight, and torchao's ``Int8Tensor`` has
        no transpose (its kernels are for ``F.linear``).
        """
        for name in self.transposed:
            module = model.get_submodule(name.rpartition(".")[0])
            converted = getattr(module, "_bigmodel_linear_weight", False)
            if type(module._parameters["weight"]) is self._cls and not converted:
                module.__class__ = _linear_form(type(module))

    def to_parts(self, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Inner tensors and a JSON description of a quantized tensor, for an offload file."""
        parts, context = inner_tensors(tensor)
        meta = {"context": encode_context(context), "shape": list(tensor.shape), "stride": list(tensor.stride())}
        return parts, meta

    def from_parts(self, parts: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        """The quantized tensor whose inner tensors are ``parts`` (e.g. memory-mapped views of an offload file)."""
        context = decode_context(meta["context"])
        return self._cls.__tensor_unflatten__(dict(parts), context, torch.Size(meta["shape"]), tuple(meta["stride"]))


_LINEAR_FORMS: dict[type, type] = {}


def _linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, self.weight, self.bias)


def _linear_form(cls: type) -> type:
    """``cls`` (a ``Conv1D``) computing ``F.linear`` with an ``(out, in)`` weight; one subclass per class."""
    form = _LINEAR_FORMS.get(cls)
    if form is None:
        attrs = {"forward": _linear_forward, "_bigmodel_linear_weight": True, "__module__": cls.__module__}
        form = _LINEAR_FORMS[cls] = type(cls.__name__, (cls,), attrs)
    return form
