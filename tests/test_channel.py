"""The channel nfstream's meters send flows on (auris.agent.channel): batches, order, linger."""

from __future__ import annotations

import multiprocessing
import pickle
import time
from typing import Any

import pytest
from nfstream.flow import NFlow
from nfstream.utils import NFEvent

import auris.agent.channel as channel_module
from auris.agent.channel import BATCH, LINGER_S, FlowBatch, FlowChannel


def _flow(number: int) -> NFlow:
    flow = NFlow.__new__(NFlow)
    flow.id = number
    return flow


def _channel(shape: Any = None) -> FlowChannel:
    return FlowChannel(32767, ctx=multiprocessing.get_context("forkserver"), shape=shape)


def _read_flows(channel: FlowChannel, count: int) -> list[Any]:
    flows: list[Any] = []
    while len(flows) < count:
        batch = channel.get(timeout=5)
        assert type(batch) is FlowBatch
        assert 0 < len(batch) <= BATCH
        flows += batch
    return flows


def test_flows_arrive_in_order_in_batches_and_the_end_by_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_module, "LINGER_S", 60.0)  # only the end marker can send the rest
    channel = _channel()
    try:
        count = 3 * BATCH + 5
        for number in range(count):
            channel.put(_flow(number))
        channel.put(None)  # nfstream's end marker: sends the partial batch before it, at once
        got = _read_flows(channel, count)  # (each get waits 5 s at most)
        assert [f.id for f in got] == list(range(count))
        assert channel.get(timeout=5) is None
        assert channel.qsize() == 0  # every put's semaphore count given back
    finally:
        channel.close()
        channel.join_thread()


def test_a_lone_flow_is_sent_after_the_linger() -> None:
    channel = _channel()
    try:
        started = time.monotonic()
        channel.put(_flow(7))
        assert [f.id for f in _read_flows(channel, 1)] == [7]
        waited = time.monotonic() - started
        assert LINGER_S * 0.9 <= waited < 5.0, waited  # held for the rest of its batch, not forever
    finally:
        channel.close()
        channel.join_thread()


def _ident(flow: NFlow) -> tuple[str, int]:
    return ("shaped", flow.id)


def test_shape_makes_what_the_reader_gets() -> None:
    """(In the agent it runs in the meter process: every metering test goes through it.)"""
    channel = _channel(_ident)
    try:
        for number in range(3):
            channel.put(_flow(number))
        channel.put(None)
        assert _read_flows(channel, 3) == [("shaped", 0), ("shaped", 1), ("shaped", 2)]
        assert channel.get(timeout=5) is None
    finally:
        channel.close()
        channel.join_thread()


def test_a_batch_pickles_smaller_than_its_flows_one_by_one() -> None:
    """What batching buys: each flow's slot names are written once per batch."""
    flows = [_flow(n) for n in range(BATCH)]
    for flow in flows:
        flow.src_ip, flow.bidirectional_packets = "10.0.0.1", 3
    alone = sum(len(pickle.dumps(f)) for f in flows)
    together = len(pickle.dumps(FlowBatch(flows)))
    assert together < alone / 2


def test_messages_that_are_not_batches_are_read_as_before() -> None:
    """auris.agent.meter ends a dead meter's channel with one object written by hand."""
    channel = _channel()
    try:
        channel.put(_flow(1))
        channel.put(None)
        assert [f.id for f in _read_flows(channel, 1)] == [1]
        assert channel.get(timeout=5) is None
        assert channel._sem.acquire(False)  # as the meter's put would
        channel._writer.send_bytes(pickle.dumps("an error"))
        assert channel.get(timeout=5) == "an error"
        assert channel.qsize() == 0
    finally:
        channel.close()
        channel.join_thread()


def _broken_shape(flow: NFlow) -> Any:
    if flow.id == 2:
        raise KeyError("no such column")
    return flow.id


def test_a_flow_that_cannot_be_shaped_ends_the_source_with_the_reason() -> None:
    """(A bug in a feature extractor: nfstream's reader gets an error message, so the agent
    reports the source as failed with it, rather than a meter that died with exit code 1.)"""
    channel = _channel(_broken_shape)
    try:
        for number in range(3):
            channel.put(_flow(number))
        assert _read_flows(channel, 2) == [0, 1]
        error = channel.get(timeout=5)
        assert error.id == NFEvent.ERROR
        assert error.message == "cannot make a flow record: KeyError('no such column')"
        assert channel.qsize() == 0
    finally:
        channel.close()
        channel.join_thread()


def _unpicklable(flow: NFlow) -> Any:
    return lambda: flow.id


def test_a_batch_that_cannot_be_pickled_is_reported_and_gives_its_counts_back(
    capfd: pytest.CaptureFixture[str],
) -> None:
    channel = _channel(_unpicklable)
    try:
        for number in range(5):
            channel.put(_flow(number))
        channel.put(None)
        assert channel.get(timeout=5) is None  # the batch before it is lost, not the channel
        assert channel.qsize() == 0
        assert "auris meter: 5 flow(s) lost, cannot send them" in capfd.readouterr().err
    finally:
        channel.close()
        channel.join_thread()
