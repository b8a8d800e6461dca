"""Helpers for tests that need a real Triton server (``from tests.triton_util import ...``).

Typical use, one server per test module (start-up costs seconds: the stubs import torch)::

    @pytest.fixture(scope="module")
    def triton(tmp_path_factory):
        repo = tmp_path_factory.mktemp("repo")
        ...  # write or export models into repo
        with start_triton(repo) as server:
            yield server

Tests are skipped only where the platform cannot run the bundled server (not x86_64 Linux, or
glibc older than 2.35). A failed download or a server that does not start fails the test loudly.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from service.triton_local import LocalTritonServer, TritonUnavailableError, check_platform


def require_triton_platform() -> None:
    """Skip the calling test when this platform cannot run the bundled Triton server."""
    try:
        check_platform()
    except TritonUnavailableError as err:
        pytest.skip(f"Triton cannot run on this platform: {err}")


def start_triton(repository: Path | str, **kwargs: Any) -> LocalTritonServer:
    """Start a :class:`LocalTritonServer` on ``repository`` and return it once ready.

    Use the result as a context manager (``with start_triton(repo) as server:``) so the server
    is stopped whatever happens. ``kwargs`` go to :class:`LocalTritonServer` (``models=``,
    ``extra_env=``, ``log_path=`` ...).
    """
    require_triton_platform()
    return LocalTritonServer(repository, **kwargs).start()


def write_python_model(repository: Path | str, name: str, config_pbtxt: str, model_py: str,
                       version: int = 1) -> Path:
    """Write ``<repository>/<name>/config.pbtxt`` and ``<name>/<version>/model.py``.

    Both texts are dedented, so they can be written as indented triple-quoted strings.
    Returns the model folder.
    """
    model_dir = Path(repository) / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(textwrap.dedent(config_pbtxt).lstrip())
    (model_dir / str(version) / "model.py").write_text(textwrap.dedent(model_py).lstrip())
    return model_dir
