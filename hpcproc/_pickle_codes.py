"""Short pickle codes for the identities and envelopes that most messages carry.

A pickle names every class or function it refers to by module and qualified name,
and the C unpickler imports the module again (``PyImport_Import``, although it is
loaded) for each name it meets: for a small message that carries a pid, that import
is about half of the unpickling time. Python's extension registry (PEP 307,
:func:`copyreg.add_extension`) gives a global a numeric code instead, which the
unpickler resolves with one dictionary lookup.

Every Python process that imports :mod:`hpcproc.serialization` (every node does,
before it sends or receives anything) registers the same codes, so the pickles of
one node are understood by every other. A pickle holding a pid, written to a file by
a user, therefore needs ``import hpcproc`` before it is loaded (as it needs hpcproc
importable in any case).

The codes are above PEP 307's assigned ranges (1-255), in a block spelling ``HPC``,
where no library we know of registers anything. Another registration of one of them
(or of one of these names under another code) would make the two readings of a
pickle disagree, so it is refused at import with an error naming both.
"""

from __future__ import annotations

import copyreg
import importlib
import os
from types import ModuleType

__all__ = ["ACCEL_ENV", "CODES", "compiled_helper", "register"]

#: Environment variable: ``0`` keeps pickling on its pure-Python paths, where the
#: optional compiled helpers would take them: the serializer's small-message paths
#: (``hpcproc/_pickle_accel.c``, ``hpcproc/_compact_accel.c``) and a pid's reducer and
#: constructor.
ACCEL_ENV = "HPCPROC_PICKLE_ACCEL"


def compiled_helper(name: str = "_pickle_accel") -> ModuleType | None:
    """The serializer's optional compiled module ``hpcproc.<name>`` (``_pickle_accel``
    or ``_compact_accel``), or None where it was not built or :data:`ACCEL_ENV` turns
    the compiled parts off (the callers then keep their Python paths)."""
    if os.environ.get(ACCEL_ENV, "1").strip() == "0":
        return None
    try:
        return importlib.import_module(f"hpcproc.{name}")
    except ImportError:  # built without a compiler
        return None


#: (module, name) -> extension code. Never renumber an entry: nodes of different
#: versions of hpcproc would then read each other's pickles wrongly.
CODES: dict[tuple[str, str], int] = {
    ("hpcproc._ids", "_pid"): 0x48504301,
    ("hpcproc._ids", "NodeId"): 0x48504302,
    ("hpcproc._ids", "MonitorRef"): 0x48504303,
    ("hpcproc._channels", "SendPort"): 0x48504304,
    ("hpcproc._channels", "ChanMessage"): 0x48504305,
}


def register() -> None:
    """Register :data:`CODES` with :mod:`copyreg` (again: a no-op).

    Raises:
        ImportError: a code or a name is already registered for something else.
    """
    for (module, name), code in CODES.items():
        try:
            copyreg.add_extension(module, name, code)
        except ValueError as exc:
            raise ImportError(
                f"hpcproc cannot register pickle extension code {code:#x} for "
                f"{module}.{name}: {exc}. Another library in this process uses the "
                "same code or name; hpcproc's messages would be misread."
            ) from None
