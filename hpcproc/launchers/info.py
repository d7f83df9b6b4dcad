"""What a launcher tells one rank about the job: :class:`ClusterInfo`.

Every launcher module turns environment variables (and files they name) into a
``ClusterInfo``. Fields a launcher does not provide are ``None``; nothing is guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ClusterInfo", "LauncherError", "env_int", "env_opt_int"]


class LauncherError(Exception):
    """The launcher environment is inconsistent or malformed; the message names it."""


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """This rank's place in the job, as its launcher described it.

    Guaranteed: ``0 <= rank < size``; when ``hosts`` is set it has ``size`` entries and
    ``hosts[rank]`` is this rank's host (each rank checked its own entry); when
    ``node_index`` and ``num_nodes`` are set, ``0 <= node_index < num_nodes``.
    """

    #: Which launcher family was detected ("slurm", "openmpi", "hydra", "local", ...).
    launcher: str
    rank: int
    size: int
    #: Rank among the ranks on this node, and their number (None when unknown).
    local_rank: int | None
    local_size: int | None
    #: Index of this node among the job's nodes (None when unknown).
    node_index: int | None
    num_nodes: int | None
    #: This rank's host name as the launcher knows it (Slurm's node name, ...).
    hostname: str
    job_id: str | None = None
    step_id: str | None = None
    #: Host of every rank, only where the launcher makes it certain.
    hosts: tuple[str, ...] | None = None
    #: Where rank 0 runs (the rendezvous server), when known.
    server_host: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise LauncherError(
                f"{self.launcher}: rank {self.rank} is outside 0..{self.size - 1} (size {self.size})"
            )
        if self.hosts is not None and len(self.hosts) != self.size:
            raise LauncherError(
                f"{self.launcher}: {len(self.hosts)} hosts listed for {self.size} ranks"
            )
        if (
            self.node_index is not None
            and self.num_nodes is not None
            and not 0 <= self.node_index < self.num_nodes
        ):
            raise LauncherError(
                f"{self.launcher}: node index {self.node_index} is outside 0..{self.num_nodes - 1}"
            )

    @property
    def is_multi_rank(self) -> bool:
        """Whether this rank is one of several started together."""
        return self.size > 1

    def describe(self) -> str:
        """One line for ``--dry-run`` and logs: every field, unknowns as ``?``."""

        def show(value: object) -> str:
            return "?" if value is None else str(value)

        return (
            f"rank={self.rank} size={self.size} node_index={show(self.node_index)}"
            f" num_nodes={show(self.num_nodes)} host={self.hostname}"
            f" local_rank={show(self.local_rank)} local_size={show(self.local_size)}"
            f" launcher={self.launcher} job_id={show(self.job_id)} step_id={show(self.step_id)}"
            f" server_host={show(self.server_host)}"
        )


def env_int(env: Mapping[str, str], name: str) -> int:
    """``int(env[name])``.

    Raises:
        LauncherError: missing, or not a non-negative integer (the message names it).
    """
    value = env_opt_int(env, name)
    if value is None:
        raise LauncherError(f"{name} is not set")
    return value


def env_opt_int(env: Mapping[str, str], name: str) -> int | None:
    """``int(env[name])`` or None when unset.

    Raises:
        LauncherError: set but not a non-negative integer.
    """
    text = env.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise LauncherError(f"{name}={text!r} is not an integer") from None
    if value < 0:
        raise LauncherError(f"{name}={text!r} is negative")
    return value
