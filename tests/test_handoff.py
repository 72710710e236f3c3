"""The meter thread -> scoring loop hand-off: whole batches at once, nothing held back for long."""

from __future__ import annotations

import threading
import time

from auris.agent.daemon import _End, _Flow, _Handoff, _SourceDone
from auris.agent.meter import FlowRecord
from auris.v1 import flow_pb2


def _flow(i: int) -> _Flow:
    end = flow_pb2.FLOW_END_REASON_IDLE_TIMEOUT
    record = FlowRecord("10.0.0.1", "10.0.0.2", i, 80, 6, 4, 0, 1, 2, 1, 1, 60, 60, "", end, "t", {})
    return _Flow("capture", record)


def test_nothing_waiting_returns_empty_after_the_timeout() -> None:
    handoff = _Handoff(limit=100, batch=8)
    started = time.monotonic()
    assert handoff.take(max_delay_s=5.0, timeout_s=0.05) == []
    assert time.monotonic() - started >= 0.05


def test_a_partial_batch_waits_at_most_max_delay() -> None:
    handoff = _Handoff(limit=100, batch=8)
    for i in range(3):
        handoff.put(_flow(i))
    started = time.monotonic()
    items = handoff.take(max_delay_s=0.2, timeout_s=10.0)
    waited = time.monotonic() - started
    assert [item.flow.src_port for item in items if isinstance(item, _Flow)] == [0, 1, 2]
    assert 0.15 <= waited < 5.0  # held for the batch to fill, but not for the 10 s timeout


def test_a_full_batch_wakes_the_consumer_and_whole_batches_are_taken() -> None:
    handoff = _Handoff(limit=100, batch=8)
    taken: list[list[object]] = []

    def consumer() -> None:
        taken.append(list(handoff.take(max_delay_s=30.0, timeout_s=30.0)))

    thread = threading.Thread(target=consumer)
    thread.start()
    time.sleep(0.05)
    for i in range(7):
        handoff.put(_flow(i))
    time.sleep(0.1)
    assert not taken  # 7 of 8: still waiting
    for i in range(7, 19):
        handoff.put(_flow(i))
    thread.join(10)
    assert not thread.is_alive(), "a full batch did not wake the consumer"
    # Woken by the 8th; by the time it ran, up to 19 were there: whole batches only.
    assert len(taken[0]) in (8, 16)
    rest = handoff.take(max_delay_s=0.0, timeout_s=0.0)
    ports = [item.flow.src_port for item in [*taken[0], *rest] if isinstance(item, _Flow)]
    assert ports == list(range(19))  # in order, none lost


def test_end_markers_are_handed_over_at_once() -> None:
    handoff = _Handoff(limit=100, batch=64)
    handoff.put(_flow(0))
    handoff.put(_SourceDone("capture"))
    handoff.put(_End())
    started = time.monotonic()
    items = handoff.take(max_delay_s=30.0, timeout_s=30.0)
    assert time.monotonic() - started < 5.0
    assert [type(item) for item in items] == [_Flow, _SourceDone, _End]


def test_a_full_list_holds_the_producer_back_until_taken() -> None:
    handoff = _Handoff(limit=4, batch=64)  # a batch larger than the list: the list's size wakes
    for i in range(4):
        handoff.put(_flow(i))
    done = threading.Event()

    def producer() -> None:
        handoff.put(_flow(4))
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.1)  # backpressure
    assert len(handoff.take(max_delay_s=30.0, timeout_s=30.0)) == 4
    assert done.wait(10)
    thread.join(10)
