"""Without ucxx the ucx transport fails with an error naming the extra to install.

Separate from ``test_ucx.py`` (which is skipped where ucxx is missing) because this
promise matters exactly there; the test hides ucxx from a fresh interpreter, so it
runs everywhere.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_missing_ucxx_names_the_extra_to_install() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["ucxx"] = None  # as if the wheel were not installed
        from hpcproc.transports import create
        try:
            create("ucx")
        except ImportError as exc:
            print(exc)
        else:
            print("no error")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install hpcproc[ucx]" in result.stdout
