"""The transport conformance suite, run against every transport of transport_specs.py.

The scenarios live in :mod:`hpcproc.testing.conformance` (so that third-party
transports can run them); each test here runs one of them through the ``harness``
fixture, parametrized over the transports. Select one transport with ``-k NAME``.
"""

from __future__ import annotations

import inspect
import sys

import pytest

from hpcproc.testing import conformance
from hpcproc.testing.conformance import Harness, Scenario, Unsupported


def run(harness: Harness, scenario: Scenario) -> None:
    try:
        harness.run(scenario)
    except Unsupported as exc:
        pytest.skip(str(exc))


# ----------------------------------------------------------- network-transport-tests


def test_ping_pong_round_trips_in_order(harness: Harness) -> None:
    run(harness, conformance.ping_pong)


def test_endpoints_do_not_see_each_others_replies(harness: Harness) -> None:
    run(harness, conformance.endpoints)


def test_connections_keep_their_messages_apart(harness: Harness) -> None:
    run(harness, conformance.connections)


def test_close_one_connection_leaves_the_other_open(harness: Harness) -> None:
    run(harness, conformance.close_one_connection)


def test_close_one_direction_leaves_the_other_direction_open(harness: Harness) -> None:
    run(harness, conformance.close_one_direction)


def test_close_reopen_delivers_every_message(harness: Harness) -> None:
    run(harness, conformance.close_reopen)


def test_parallel_connects_each_get_their_own_connection(harness: Harness) -> None:
    run(harness, conformance.parallel_connects)


def test_send_after_close_raises_closed(harness: Harness) -> None:
    run(harness, conformance.send_after_close)


def test_crossing_connects_both_succeed(harness: Harness) -> None:
    run(harness, conformance.crossing)


def test_close_twice_has_no_further_effect(harness: Harness) -> None:
    run(harness, conformance.close_twice)


def test_connect_to_self_delivers_like_any_connection(harness: Harness) -> None:
    run(harness, conformance.connect_to_self)


def test_connect_to_self_twice_keeps_messages_apart(harness: Harness) -> None:
    run(harness, conformance.connect_to_self_twice)


def test_close_self_fails_self_connections(harness: Harness) -> None:
    run(harness, conformance.close_self)


def test_close_endpoint_notifies_peers_and_fails_local_use(harness: Harness) -> None:
    run(harness, conformance.close_endpoint)


def test_close_transport_closes_every_endpoint(harness: Harness) -> None:
    run(harness, conformance.close_transport)


def test_connect_to_closed_endpoint_raises_not_found(harness: Harness) -> None:
    run(harness, conformance.connect_closed_endpoint)


def test_receive_after_endpoint_closed_raises(harness: Harness) -> None:
    run(harness, conformance.exception_on_receive)


def test_send_exception_fails_the_bundle_on_both_sides(harness: Harness) -> None:
    run(harness, conformance.send_exception)


def test_cancelled_tasks_leak_no_connections(harness: Harness) -> None:
    run(harness, conformance.kill)


def test_cancelled_connect_does_not_fail_concurrent_connects(harness: Harness) -> None:
    run(harness, conformance.cancel_connect)


def test_break_connection_fails_bundle_on_both_sides_then_reconnects(harness: Harness) -> None:
    run(harness, conformance.break_connection)


# ------------------------------------------------------------------------- additions


def test_frame_boundaries_preserved_for_empty_tiny_and_huge_frames(harness: Harness) -> None:
    run(harness, conformance.frame_boundaries)


def test_received_frames_stay_intact_while_held(harness: Harness) -> None:
    run(harness, conformance.received_frames_stay_intact)


def test_send_buffers_may_be_reused_after_send_returns(harness: Harness) -> None:
    run(harness, conformance.send_buffers_reusable)


def test_burst_of_small_messages_arrives_whole_and_in_order(harness: Harness) -> None:
    run(harness, conformance.burst_of_small_messages)


def test_malformed_address_raises_connect_failed(harness: Harness) -> None:
    run(harness, conformance.malformed_address)


def test_numpy_array_crosses_without_serializer_copies(harness: Harness) -> None:
    run(harness, conformance.numpy_zero_copy)


def test_thousands_of_connections_between_two_endpoints(harness: Harness) -> None:
    run(harness, conformance.many_connections)


# --------------------------------------------------------------------- two processes


def test_peer_process_ping_pong(harness: Harness) -> None:
    run(harness, conformance.peer_ping_pong)


def test_peer_process_numpy_round_trip_without_copies(harness: Harness) -> None:
    run(harness, conformance.peer_numpy_round_trip)


def test_peer_process_closing_reports_closed_then_connection_lost(harness: Harness) -> None:
    run(harness, conformance.peer_close_reports_closed_then_lost)


def test_peer_process_killed_reports_connection_lost(harness: Harness) -> None:
    run(harness, conformance.peer_killed_reports_connection_lost)


def test_connect_to_killed_peer_process_raises_not_found(harness: Harness) -> None:
    run(harness, conformance.peer_killed_connect_not_found)


def test_break_connection_across_processes_reported_on_both_sides(harness: Harness) -> None:
    run(harness, conformance.peer_break_connection)


# -------------------------------------------------------------------------- the suite


def test_every_scenario_has_a_test() -> None:
    source = inspect.getsource(sys.modules[__name__])
    missing = [name for name in conformance.SCENARIOS if f"conformance.{name})" not in source]
    assert not missing, f"scenarios without a test: {missing}"
