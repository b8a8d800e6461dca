"""Model backends: `embedded` (torch in this process) or `triton` (tritonclient, no torch).

Implementations are imported lazily so that a gateway with backend=triton never imports torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from service.backends.base import Backend, softmax

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = ["Backend", "create_backend", "softmax", "BACKENDS"]

# backend name -> "module:class"; the module is imported only when that backend is chosen.
BACKENDS: dict[str, str] = {
    "embedded": "service.backends.embedded:EmbeddedBackend",
    "triton": "service.backends.triton:TritonBackend",
}


def create_backend(settings: "Settings") -> Backend:
    """The backend the settings name, constructed but not started (`await backend.start()`).

    Every implementation takes the settings as its only constructor argument.
    """
    try:
        target = BACKENDS[settings.backend]
    except KeyError:
        raise ValueError(f"unknown backend {settings.backend!r}; choose one of {', '.join(BACKENDS)}") from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise RuntimeError(f"backend {settings.backend!r} is not available in this installation "
                               f"(module {module_name} is missing)") from err
        raise
    return getattr(module, class_name)(settings)
