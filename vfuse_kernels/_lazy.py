"""Names a package exports, each imported from its module on first use (so that importing the
package loads nothing heavy: ``vfuse --help`` and the CPU merge run without torch)."""
from __future__ import annotations

import importlib


def lazy_exports(package: str, namespace: dict, sources: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``name`` comes from the module
    ``sources[name]`` (relative to the package) and is kept in ``namespace`` once imported."""

    def __getattr__(name: str):
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(sources[name], package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(sources))

    return __getattr__, __dir__
