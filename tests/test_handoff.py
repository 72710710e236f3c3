"""The meter thread -> scoring loop hand-off: whole batches at once, nothing held back for long."""

from __future__ import annotations

import threading
import time

import pytest

from auris.agent.daemon import _End, _Flows, _Handoff, _Item, _SourceDone
from auris.agent.meter import FlowRecord
from auris.v1 import flow_pb2


def _record(i: int) -> FlowRecord:
    end = flow_pb2.FLOW_END_REASON_IDLE_TIMEOUT
    return FlowRecord("10.0.0.1", "10.0.0.2", i, 80, 6, 4, 0, 1, 2, 1, 1, 60, 60, "", end, "t", {})


def _flow(i: int) -> _Flows:
    return _Flows("capture", [_record(i)])


def _ports(items: list[_Item]) -> list[int]:
    return [flow.src_port for item in items if isinstance(item, _Flows) for flow in item.flows]


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
    assert _ports(items) == [0, 1, 2]
    assert 0.15 <= waited < 5.0  # held for the batch to fill, but not for the 10 s timeout


def test_a_full_batch_wakes_the_consumer_and_whole_batches_are_taken() -> None:
    handoff = _Handoff(limit=100, batch=8)
    taken: list[list[_Item]] = []

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
    assert len(_ports(taken[0])) in (8, 16)
    rest = handoff.take(max_delay_s=0.0, timeout_s=0.0)
    assert _ports([*taken[0], *rest]) == list(range(19))  # in order, none lost


def test_end_markers_are_handed_over_at_once() -> None:
    handoff = _Handoff(limit=100, batch=64)
    handoff.put(_flow(0))
    handoff.put(_SourceDone("capture"))
    handoff.put(_End())
    started = time.monotonic()
    items = handoff.take(max_delay_s=30.0, timeout_s=30.0)
    assert time.monotonic() - started < 5.0
    assert [type(item) for item in items] == [_Flows, _SourceDone, _End]


@pytest.mark.parametrize("one_item", [False, True], ids=["flow-by-flow", "in-one-item"])
def test_a_full_list_holds_the_producer_back_until_taken(one_item: bool) -> None:
    """The limit counts flows, not items: four flows hold the producer back whether they came one
    by one or in one item."""
    handoff = _Handoff(limit=4, batch=64)  # a batch larger than the list: the list's size wakes
    if one_item:
        handoff.put(_Flows("capture", [_record(i) for i in range(4)]))
    else:
        for i in range(4):
            handoff.put(_flow(i))
    done = threading.Event()

    def producer() -> None:
        handoff.put(_flow(4))
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.1)  # backpressure
    assert len(_ports(handoff.take(max_delay_s=30.0, timeout_s=30.0))) == 4
    assert done.wait(10)
    thread.join(10)


def test_batches_of_flows_are_counted_by_flow_and_split_where_a_batch_ends() -> None:
    """The meter hands over its messages' batches whole; the scoring loop still gets whole score
    batches, the item that straddles one split, in order."""
    handoff = _Handoff(limit=100, batch=8)
    handoff.put(_Flows("capture", [_record(i) for i in range(5)]))
    handoff.put(_Flows("capture", [_record(i) for i in range(5, 10)]))
    handoff.put(_Flows("capture", [_record(i) for i in range(10, 17)]))
    first = handoff.take(max_delay_s=30.0, timeout_s=30.0)
    assert _ports(first) == list(range(16))  # two whole batches of 8
    assert [len(item.flows) for item in first if isinstance(item, _Flows)] == [5, 5, 6]
    started = time.monotonic()
    assert _ports(handoff.take(max_delay_s=0.1, timeout_s=30.0)) == [16]  # the rest, after max_delay
    assert time.monotonic() - started < 5.0
