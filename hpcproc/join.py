"""``python -m hpcproc.join ADDRESS``: add a worker node to a running cluster.

The command is documented in :mod:`hpcproc._joining`, which implements it. This
module shares its name with the function ``hpcproc.join`` (``hp.join(address)``);
importing it makes ``hpcproc.join`` this module, so the module is callable and
calling it is calling that function.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ._joining import main
from ._membership import join as _join

__all__ = ["main"]


class _CallableModule(types.ModuleType):
    """This module, callable as :func:`hpcproc.join` (see the module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _join(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
