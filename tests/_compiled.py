"""Whether the optional compiled parts are required: under ``HPCPROC_REQUIRE_COMPILED=1``
(which ``.ci/run`` sets) a test that finds one missing fails instead of skipping."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

__all__ = ["REQUIRE_ENV", "compiled_required", "require_compiled"]

REQUIRE_ENV = "HPCPROC_REQUIRE_COMPILED"


def compiled_required() -> bool:
    """True when a missing compiled part must fail the test that needs it."""
    return os.environ.get(REQUIRE_ENV) == "1"


def require_compiled(module: ModuleType | None, name: str, what: str) -> ModuleType:
    """``module`` (the compiled part ``name``, None where it was not built); else the
    test fails where compiled parts are required, and is skipped, naming ``what``,
    where they are not."""
    if module is None:
        if compiled_required():
            pytest.fail(f"{REQUIRE_ENV}=1 but {name} was not built")
        pytest.skip(f"{what} was not built (no C compiler at install)")
    return module
