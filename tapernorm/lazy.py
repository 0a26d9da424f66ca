"""Lazy package attributes (PEP 562): a package names what it exports; each module loads on first use.

Used by the package roots so that importing a package costs nothing until a name is touched; this is
what keeps `import tapernorm.runtime` (a subpackage of the root) free of torch.
"""
from __future__ import annotations

import importlib

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """Return (`__getattr__`, `__dir__`, `__all__`) for `package`, given {submodule: [names it defines]}."""
    where = {name: mod for mod, names in exports.items() for name in names}

    def __getattr__(name: str):
        mod = where.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{mod}"), name)

    def __dir__() -> list[str]:
        return sorted(where)

    return __getattr__, __dir__, sorted(where)
