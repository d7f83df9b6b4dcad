"""Whether the optional compiled parts are required: under ``HPCPROC_REQUIRE_COMPILED=1``
(which ``.ci/run`` sets) a test that finds one missing fails instead of skipping."""

from __future__ import annotations

import os

__all__ = ["REQUIRE_ENV", "compiled_required"]

REQUIRE_ENV = "HPCPROC_REQUIRE_COMPILED"


def compiled_required() -> bool:
    """True when a missing compiled part must fail the test that needs it."""
    return os.environ.get(REQUIRE_ENV) == "1"
