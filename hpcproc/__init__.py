"""hpcproc: Erlang / Cloud Haskell style distributed processes for Python on HPC clusters."""

from __future__ import annotations

__all__: list[str] = []
