"""Hub checkpoints of transformers models: their names and layouts seen through transformers' conversion rules.

Used by :func:`~lightning_bigmodel.checkpoint.load_checkpoint_in_model` (and so by ``load_checkpoint_and_dispatch``,
the strategy and the CLI) whenever the model, or the network inside a LightningModule that the checkpoint's keys are
relative to, is a transformers ``PreTrainedModel``. Detection reads class names only: importing this package does
not import transformers; the rules are imported when such a model is loaded (the ``transformers`` extra).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import nn

# Nothing of the package is imported here at module level: the loader imports this module, and the rules import the
# checkpoint package (which imports the loader).
INSTALL_HINT = 'pip install "lightning-bigmodel[transformers]"'

__all__ = ["INSTALL_HINT", "converted_source", "hub_networks", "infer_converted_prefix", "is_transformers_model"]


def is_transformers_model(module: object) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (checked by class names; transformers not imported)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.split(".", 1)[0] == "transformers"
        for cls in type(module).__mro__
    )


def network_at(model: nn.Module, key_prefix: str) -> Optional[nn.Module]:
    """The transformers network that checkpoint keys are relative to (``model`` for ``""``, the submodule that
    ``key_prefix`` names otherwise), or ``None`` when that is no transformers model."""
    if key_prefix and not key_prefix.endswith("."):
        return None
    try:
        network = model.get_submodule(key_prefix[:-1]) if key_prefix else model
    except AttributeError:
        return None
    return network if is_transformers_model(network) else None


def hub_networks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the outermost transformers models in ``model`` (``("", model)`` when it is one)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if is_transformers_model(module) and not any(name.startswith(f"{outer}.") or not outer for outer, _ in found):
            found.append((name, module))
    return found


def converted_source(model: nn.Module, reader, key_prefix: str = ""):
    """``reader`` as the loader should see it: through the conversion rules of the transformers network the keys are
    relative to (a :class:`~lightning_bigmodel.integrations.transformers.source.ConvertedSource`), else unchanged.

    Raises:
        ImportError: the network needs conversion (some checkpoint keys are not its names) but transformers' rules
            cannot be imported; the message names the extra to install.
        ValueError: a conversion's sources disagree in shape or dtype.
    """
    network = network_at(model, key_prefix)
    if network is None:
        return reader
    from lightning_bigmodel.integrations.transformers.rules import plan_conversion
    from lightning_bigmodel.integrations.transformers.source import ConvertedSource

    try:
        plan = plan_conversion(network, {key: reader.spec(key) for key in reader.keys()})
    except ImportError:
        names = set(network.state_dict(keep_vars=True))
        if all(key in names for key in reader.keys()):
            return reader  # nothing to convert: transformers is not needed
        raise
    return ConvertedSource(reader, network, plan)


def infer_converted_prefix(model: nn.Module, checkpoint_keys: Sequence[str]) -> Union[str, None]:
    """The prefix (``"model."``) of the one transformers network inside ``model`` that takes at least half of
    ``checkpoint_keys`` through its conversion rules; ``None`` when there is no such network (or several)."""
    from lightning_bigmodel.integrations.transformers.rules import rename_keys

    fits = []
    for name, network in hub_networks(model):
        renamed, converted, _ = rename_keys(network, checkpoint_keys)
        if (len(renamed) + len(converted)) * 2 >= len(checkpoint_keys):
            fits.append(f"{name}." if name else "")
    return fits[0] if len(fits) == 1 else None
