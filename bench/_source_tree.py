"""Make ``fastunet`` importable from this source tree when it is not installed.

The package maps the ``kernels/`` folder to ``fastunet.kernels`` (setuptools ``package-dir``), so putting the
repository on ``PYTHONPATH`` is not enough. Importing this module tries ``import fastunet``; if that fails because
the package or its kernels are missing, it puts the repository root on ``sys.path`` and registers a finder that
loads ``fastunet.kernels`` from ``kernels/``, the same mapping an editable install makes. An installed
``fastunet`` is left alone.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class _KernelsFinder(importlib.abc.MetaPathFinder):
    """Resolves ``fastunet.kernels`` to ``<repo>/kernels``; its submodules then load through the package path."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "fastunet.kernels":
            return None
        kernels = REPO / "kernels"
        return importlib.util.spec_from_file_location(
            fullname, kernels / "__init__.py", submodule_search_locations=[str(kernels)]
        )


def _ensure_importable() -> None:
    try:
        importlib.import_module("fastunet")
        return
    except ModuleNotFoundError as error:
        if error.name not in ("fastunet", "fastunet.kernels"):
            raise
    for name in [name for name in sys.modules if name == "fastunet" or name.startswith("fastunet.")]:
        del sys.modules[name]
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.meta_path.insert(0, _KernelsFinder())
    importlib.import_module("fastunet")


_ensure_importable()
