"""The channel nfstream's meters send flows on (auris.agent.channel): batches, order, linger."""

from __future__ import annotations

import multiprocessing
import pickle
import time

from nfstream.flow import NFlow

from auris.agent.channel import BATCH, LINGER_S, FlowChannel


def _flow(number: int) -> NFlow:
    flow = NFlow.__new__(NFlow)
    flow.id = number
    return flow


def _channel() -> FlowChannel:
    return FlowChannel(32767, ctx=multiprocessing.get_context("forkserver"))


def test_flows_arrive_in_order_and_whole_batches_are_one_message() -> None:
    channel = _channel()
    try:
        count = 3 * BATCH + 5
        for number in range(count):
            channel.put(_flow(number))
        channel.put(None)  # nfstream's end marker: sent at once with the partial batch
        got = [channel.get(timeout=5) for _ in range(count + 1)]
        assert [f.id for f in got[:-1]] == list(range(count))
        assert got[-1] is None
        assert channel.qsize() == 0  # every put's semaphore count given back
        assert channel.empty()
    finally:
        channel.close()
        channel.join_thread()


def test_a_lone_flow_is_sent_after_the_linger() -> None:
    channel = _channel()
    try:
        started = time.monotonic()
        channel.put(_flow(7))
        assert channel.get(timeout=5).id == 7
        waited = time.monotonic() - started
        assert LINGER_S * 0.9 <= waited < 1.0, waited  # held for the rest of its batch, not longer
    finally:
        channel.close()
        channel.join_thread()


def test_a_batch_pickles_smaller_than_its_flows_one_by_one() -> None:
    """What batching buys: each flow's slot names are written once per batch."""
    flows = [_flow(n) for n in range(BATCH)]
    for flow in flows:
        flow.src_ip, flow.bidirectional_packets = "10.0.0.1", 3
    alone = sum(len(pickle.dumps(f)) for f in flows)
    together = len(pickle.dumps(flows))
    assert together < alone / 2


def test_messages_that_are_not_batches_are_read_as_before() -> None:
    """auris.agent.meter ends a dead meter's channel with one object written by hand."""
    channel = _channel()
    try:
        channel.put(_flow(1))
        channel.put(None)
        assert channel.get(timeout=5).id == 1
        assert channel._sem.acquire(False)
        channel._writer.send_bytes(pickle.dumps("an error"))
        assert channel.get(timeout=5) is None  # the rest of the batch comes first
        assert channel.get(timeout=5) == "an error"
        assert channel.qsize() == 0
    finally:
        channel.close()
        channel.join_thread()
