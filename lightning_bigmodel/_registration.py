"""Register ``strategy="bigmodel"`` with Lightning without importing Lightning.

Lightning looks strategy names up in ``StrategyRegistry``, filled when a strategy class is imported, and has
no plugin entry point for third-party strategies. Importing Lightning from ``import lightning_bigmodel`` would
cost every core user seconds and ~100 MB, so registration waits for Lightning instead: if
``lightning.pytorch`` is already imported, the strategies are registered now; otherwise a one-shot import
hook registers them right after ``lightning.pytorch`` finishes importing, whichever order the user imports in.
The standard library has no post-import hook (PEP 369 was withdrawn), hence this small finder.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from importlib import import_module
from types import ModuleType
from typing import Any, Optional, Sequence

_TRIGGER = "lightning.pytorch"
_LIGHTNING_SIDE = "lightning_bigmodel.pl"  # importing it registers the strategy names


def _register() -> None:
    try:
        if _LIGHTNING_SIDE not in sys.modules:  # if it is being imported right now, it registers when it finishes
            import_module(_LIGHTNING_SIDE)
    except Exception as err:  # never break the user's `import lightning` because of us
        warnings.warn(
            f"lightning_bigmodel could not register `strategy=\"bigmodel\"` with Lightning ({err!r}); pass "
            "`strategy=BigModelInferenceStrategy(...)` instead.",
            stacklevel=2,
        )


class _ThenRegister(importlib.abc.Loader):
    """Wraps the real loader of ``lightning.pytorch``: runs it, then registers our strategies."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register()

    def __getattr__(self, name: str) -> Any:  # resource readers, get_source, ... come from the real loader
        return getattr(self._loader, name)


class _LightningFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot: later imports go straight to the normal finders
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenRegister(spec.loader)
        return spec


def register_when_lightning_is_imported() -> None:
    """Register the strategies now if ``lightning.pytorch`` is imported, else right after it is."""
    if _TRIGGER in sys.modules:
        _register()
    elif not any(isinstance(finder, _LightningFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _LightningFinder())
