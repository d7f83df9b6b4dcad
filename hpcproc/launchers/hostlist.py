"""Slurm's compressed hostlists and task counts, expanded by the project's own parser.

The grammar follows Slurm's ``hostlist.c`` (what ``scontrol show hostnames`` accepts):

* A hostlist is a sequence of host expressions separated by ``,`` or whitespace at
  bracket depth 0: ``n1,n2 n3``.
* A host expression is literal text with any number of bracket groups:
  ``nid[001-004,010]``, ``rack[1-2]-node[01-02]``, ``gpu-[01-03]-ib``. Several groups
  expand to their cartesian product with the leftmost group varying slowest.
* A group is a ``,``-separated list of numbers and ``lo-hi`` ranges. Numbers are
  zero-padded to the width of the low bound (``[08-10]`` gives ``08 09 10``,
  ``[8-10]`` gives ``8 9 10``).
* Duplicates and order are kept: a hostlist is a list, not a set.

Task counts (``SLURM_STEP_TASKS_PER_NODE``, ``SLURM_TASKS_PER_NODE``) are
``count[(xrepeat)]`` items separated by commas: ``2(x3),1`` is ``[2, 2, 2, 1]``.

Malformed input raises :class:`HostlistError` whose message quotes the input and says
what is wrong; nothing is guessed.
"""

from __future__ import annotations

import re

__all__ = ["MAX_HOSTS", "HostlistError", "expand_hostlist", "parse_task_counts"]

#: Upper bound on the hosts one hostlist may expand to; larger inputs are refused
#: rather than exhausting memory.
MAX_HOSTS = 1 << 20

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_TASKS = re.compile(r"(\d+)(?:\(x(\d+)\))?")


class HostlistError(ValueError):
    """A hostlist or task-count string is malformed; the message quotes it."""


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm hostlist into host names, in order, duplicates kept.

    An empty or all-whitespace string is the empty list.

    Raises:
        HostlistError: unbalanced or nested brackets, an empty group or range, a
            non-numeric bound, ``lo > hi``, or more than :data:`MAX_HOSTS` hosts.
    """
    hosts: list[str] = []
    for expr in _split_top_level(text):
        hosts.extend(_expand_expression(expr, text))
        if len(hosts) > MAX_HOSTS:
            raise HostlistError(f"hostlist {text!r} expands to more than {MAX_HOSTS} hosts")
    return hosts


def parse_task_counts(text: str) -> list[int]:
    """Expand a Slurm task-count list: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``.

    Raises:
        HostlistError: an item is not ``N`` or ``N(xM)``, or the list is empty.
    """
    counts: list[int] = []
    items = text.strip().split(",")
    for item in items:
        m = _TASKS.fullmatch(item.strip())
        if m is None:
            raise HostlistError(f"task counts {text!r}: {item!r} is not N or N(xM)")
        repeat = int(m.group(2)) if m.group(2) is not None else 1
        if repeat == 0:
            raise HostlistError(f"task counts {text!r}: repeat count 0 in {item!r}")
        if len(counts) + repeat > MAX_HOSTS:
            raise HostlistError(f"task counts {text!r} expand to more than {MAX_HOSTS} entries")
        counts.extend([int(m.group(1))] * repeat)
    return counts


def _split_top_level(text: str) -> list[str]:
    """Split at ``,`` and whitespace outside brackets, checking bracket balance."""
    exprs: list[str] = []
    depth = 0
    current: list[str] = []
    for pos, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise HostlistError(f"hostlist {text!r}: nested '[' at position {pos}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise HostlistError(f"hostlist {text!r}: unbalanced ']' at position {pos}")
            depth = 0
        elif depth == 0 and (ch == "," or ch.isspace()):
            if current:
                exprs.append("".join(current))
                current = []
            continue
        current.append(ch)
    if depth:
        raise HostlistError(f"hostlist {text!r}: unbalanced '[' (missing ']')")
    if current:
        exprs.append("".join(current))
    return exprs


def _expand_expression(expr: str, text: str) -> list[str]:
    """Expand one host expression (balanced, unnested brackets guaranteed)."""
    results = [""]
    rest = expr
    while rest:
        open_at = rest.find("[")
        if open_at < 0:
            return [r + rest for r in results]
        close_at = rest.index("]", open_at)
        prefix = rest[:open_at]
        values = _expand_group(rest[open_at + 1 : close_at], text)
        if len(results) * len(values) > MAX_HOSTS:
            raise HostlistError(f"hostlist {text!r} expands to more than {MAX_HOSTS} hosts")
        # Leftmost group varies slowest: extend each existing result by every value.
        results = [r + prefix + v for r in results for v in values]
        rest = rest[close_at + 1 :]
    return results


def _expand_group(group: str, text: str) -> list[str]:
    if not group.strip():
        raise HostlistError(f"hostlist {text!r}: empty bracket group '[]'")
    values: list[str] = []
    for part in group.split(","):
        m = _RANGE.fullmatch(part.strip())
        if m is None:
            raise HostlistError(
                f"hostlist {text!r}: {part!r} in [{group}] is not a number or lo-hi range"
            )
        lo_text, hi_text = m.group(1), m.group(2)
        if hi_text is None:
            values.append(lo_text)
            continue
        lo, hi = int(lo_text), int(hi_text)
        if lo > hi:
            raise HostlistError(f"hostlist {text!r}: range {part!r} has lo > hi")
        if len(values) + hi - lo + 1 > MAX_HOSTS:
            raise HostlistError(f"hostlist {text!r} expands to more than {MAX_HOSTS} hosts")
        width = len(lo_text)
        values.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return values
