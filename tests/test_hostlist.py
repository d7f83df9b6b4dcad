"""Slurm hostlist and task-count grammar (as in Slurm's hostlist.c)."""

from __future__ import annotations

import pytest

from hpcproc.launchers.hostlist import (
    MAX_HOSTS,
    HostlistError,
    expand_hostlist,
    parse_task_counts,
)


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("nid[001-004,010]", ["nid001", "nid002", "nid003", "nid004", "nid010"]),
        ("gpu-[01-03]-ib", ["gpu-01-ib", "gpu-02-ib", "gpu-03-ib"]),
        ("[1-2]x", ["1x", "2x"]),
        ("n[5]", ["n5"]),
        ("", []),
        ("   ", []),
    ],
)
def test_expand_hostlist_gives_hosts_in_order(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


def test_expand_hostlist_varies_leftmost_group_slowest() -> None:
    assert expand_hostlist("rack[1-2]-node[01-02]") == [
        "rack1-node01",
        "rack1-node02",
        "rack2-node01",
        "rack2-node02",
    ]


def test_expand_hostlist_pads_to_width_of_low_bound() -> None:
    assert expand_hostlist("n[08-10]") == ["n08", "n09", "n10"]
    assert expand_hostlist("n[8-10]") == ["n8", "n9", "n10"]
    assert expand_hostlist("n[098-101]") == ["n098", "n099", "n100", "n101"]


def test_expand_hostlist_keeps_duplicates_and_order() -> None:
    assert expand_hostlist("b,a,b,n[2,1,2]") == ["b", "a", "b", "n2", "n1", "n2"]


def test_expand_hostlist_splits_on_commas_and_whitespace_outside_brackets() -> None:
    assert expand_hostlist("a, b\tc\nn[1,3]  d,,e") == ["a", "b", "c", "n1", "n3", "d", "e"]


def test_expand_hostlist_tolerates_spaces_inside_a_group() -> None:
    assert expand_hostlist("n[1, 3-4]") == ["n1", "n3", "n4"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("n[1-3", "unbalanced '['"),
        ("n1-3]", "unbalanced ']'"),
        ("n[[1-2]]", "nested '['"),
        ("n[3-1]", "lo > hi"),
        ("n[]", "empty bracket group"),
        ("n[a-b]", "not a number"),
        ("n[1-]", "not a number"),
        ("n[1,,2]", "not a number"),
        ("n[-2]", "not a number"),
    ],
)
def test_malformed_hostlist_raises_clear_error(text: str, reason: str) -> None:
    with pytest.raises(HostlistError) as exc_info:
        expand_hostlist(text)
    assert reason in str(exc_info.value)
    assert repr(text) in str(exc_info.value)


def test_huge_hostlist_is_refused_not_expanded() -> None:
    with pytest.raises(HostlistError, match="more than"):
        expand_hostlist(f"n[0-{MAX_HOSTS}]")
    with pytest.raises(HostlistError, match="more than"):
        expand_hostlist("a[0-1023]b[0-1023]c[0-1]")


@pytest.mark.parametrize(
    ("text", "counts"),
    [
        ("2(x3),1", [2, 2, 2, 1]),
        ("4", [4]),
        ("1,2,3", [1, 2, 3]),
        ("2(x1)", [2]),
        (" 3(x2) ", [3, 3]),
    ],
)
def test_parse_task_counts_expands_repeats(text: str, counts: list[int]) -> None:
    assert parse_task_counts(text) == counts


@pytest.mark.parametrize("text", ["", "2(x)", "x3", "2(3)", "2(x3", "1,,2", "2(x0)", "-1"])
def test_malformed_task_counts_raise_clear_error(text: str) -> None:
    with pytest.raises(HostlistError, match="task counts"):
        parse_task_counts(text)
