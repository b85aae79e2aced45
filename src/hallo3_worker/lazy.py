"""Modules imported on first use, so that importing ours does not import them.

The media libraries (PyAV, librosa, soundfile) are needed only by the branches that decode,
resample or write media. Code that hands decoded media to the pipeline directly (the GPU check on a
machine without them, say) imports the pipeline without them; the first attribute access loads the
module, and a missing one fails there, with the usual ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """Stands for ``name`` (and its ``submodules``) until an attribute is first read."""

    def __init__(self, name: str, *submodules: str) -> None:
        super().__init__(name)
        self._lazy_target = (name, submodules)

    def _load(self) -> ModuleType:
        name, submodules = self._lazy_target
        module = importlib.import_module(name)
        for sub in submodules:
            importlib.import_module(f"{name}.{sub}")
        return module

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return getattr(self._load(), attr)


def lazy_module(name: str, *submodules: str) -> ModuleType:
    """``name`` itself when it is already imported, else a :class:`LazyModule` for it."""
    if name in sys.modules and all(f"{name}.{sub}" in sys.modules for sub in submodules):
        return sys.modules[name]
    return LazyModule(name, *submodules)
