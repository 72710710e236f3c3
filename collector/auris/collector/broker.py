"""Live subscriptions: new verdicts and alert changes fanned out to subscribers, never slowing ingest.

Each subscriber has a bounded buffer. Publishing never waits: a subscriber whose
buffer is full is cut off (its stream ends with RESOURCE_EXHAUSTED) instead of
holding back the agents' acknowledgements. Items are published in batches (all
the verdicts of one group commit) and taken in batches, so that a busy
subscription costs a message per batch rather than per verdict.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from auris.collector.store import _INSERT_COLUMNS, Row, verdict_row
from auris.v1 import query_service_pb2, verdict_pb2

__all__ = ["Broker", "NewVerdict", "Subscription", "check_filter", "compile_filter", "follow", "matches"]

T = TypeVar("T")
M = TypeVar("M")

# A verdict as the ingest path has it once committed: (id, its stored row: store.verdict_row's).
NewVerdict = tuple[int, Row]

_COLUMN = {name: i for i, name in enumerate(_INSERT_COLUMNS)}


def _ns(ts: object) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)  # type: ignore[attr-defined]


def _canonical(ip: str) -> str:
    return ipaddress.ip_address(ip).compressed if ip else ""


def compile_filter(flt: query_service_pb2.VerdictFilter) -> Callable[[Row], bool]:
    """A predicate on a stored row (store.verdict_row's) with the rules of the store's SQL
    (store.filter_sql), tested on the very column values the SQL tests.

    The filter is read once, here: matching then tests only the columns the filter sets, on the
    rows ingest already has (no protobuf is read, nothing is built for verdicts nobody wants).
    """
    tests: list[Callable[[Row], bool]] = []

    def equal(column: str, wanted: object) -> None:
        i = _COLUMN[column]
        tests.append(lambda row: row[i] == wanted)

    def one_of(column: str, wanted: Sequence[str]) -> None:
        if wanted:
            i, values = _COLUMN[column], frozenset(wanted)
            tests.append(lambda row: row[i] in values)

    start = _ns(flt.time_range.start_time) if flt.time_range.HasField("start_time") else None
    end = _ns(flt.time_range.end_time) if flt.time_range.HasField("end_time") else None
    if start is not None or end is not None:
        low = start if start is not None else -(2**63)
        high = end if end is not None else 2**63
        column = {
            query_service_pb2.TIME_FIELD_FLOW: "last_seen_ns",
            query_service_pb2.TIME_FIELD_RECEIVED: "received_ns",
        }.get(flt.time_field, "scored_ns")
        i = _COLUMN[column]
        tests.append(lambda row: low <= row[i] < high)
    one_of("agent_id", flt.agent_ids)
    one_of("hostname", flt.hostnames)
    one_of("label", flt.labels)
    if flt.ip:
        either, src, dst = _canonical(flt.ip), _COLUMN["src_ip"], _COLUMN["dst_ip"]
        tests.append(lambda row: row[src] == either or row[dst] == either)
    if flt.src_ip:
        equal("src_ip", _canonical(flt.src_ip))
    if flt.dst_ip:
        equal("dst_ip", _canonical(flt.dst_ip))
    if flt.model_id:
        equal("model_id", flt.model_id)
    for field in ("src_port", "dst_port", "ip_protocol"):
        if flt.HasField(field):
            equal(field, getattr(flt, field))
    if flt.HasField("anomalous"):
        equal("anomalous", int(flt.anomalous))
    if flt.HasField("min_score") or flt.HasField("max_score"):
        low_score = flt.min_score if flt.HasField("min_score") else -float("inf")
        high_score = flt.max_score if flt.HasField("max_score") else float("inf")
        score = _COLUMN["score"]
        tests.append(lambda row: row[score] is not None and low_score <= row[score] <= high_score)
    if not tests:
        return lambda row: True
    if len(tests) == 1:
        return tests[0]
    return lambda row: all(test(row) for test in tests)


def matches(flt: query_service_pb2.VerdictFilter, stored: verdict_pb2.StoredVerdict) -> bool:
    """Whether a stored verdict passes a filter: the same rules as the store's SQL (store.filter_sql)."""
    return compile_filter(flt)(verdict_row(stored.verdict, _ns(stored.received_time)))


def check_filter(flt: query_service_pb2.VerdictFilter) -> None:
    """Refuse a filter whose addresses a query would refuse (ValueError), before subscribing."""
    for ip in (flt.ip, flt.src_ip, flt.dst_ip):
        if ip:
            try:
                _canonical(ip)
            except ValueError:
                raise ValueError(f"{ip[:64]!r} is not an IP address") from None


@dataclasses.dataclass
class Subscription(Generic[T]):
    wants: Callable[[T], bool]
    buffer: int
    # Published batches not yet taken, oldest first, and how many items they hold.
    batches: collections.deque[list[T]] = dataclasses.field(default_factory=collections.deque)
    waiting: int = 0
    # Set while items wait, or once the subscription is cut off.
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # Set when the subscriber fell behind by a whole buffer and was cut off.
    overflowed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def queue(self) -> _OneByOne[T]:
        """The waiting items one at a time (``await queue.get()``, ``queue.maxsize``), for
        followers that send one item a message."""
        return _OneByOne(self)

    def take(self, limit: int) -> list[T]:
        """Up to ``limit`` waiting items, oldest first (empty when none wait)."""
        out: list[T] = []
        while self.batches and len(out) < limit:
            batch = self.batches[0]
            room = limit - len(out)
            if len(batch) <= room:
                out += self.batches.popleft()
            else:
                out += batch[:room]
                self.batches[0] = batch[room:]
        self.waiting -= len(out)
        if not self.batches:
            self.ready.clear()
        return out


class _OneByOne(Generic[T]):
    def __init__(self, subscription: Subscription[T]) -> None:
        self._subscription = subscription

    @property
    def maxsize(self) -> int:
        return self._subscription.buffer

    async def get(self) -> T:
        while True:
            items = self._subscription.take(1)
            if items:
                return items[0]
            await self._subscription.ready.wait()


class Broker(Generic[T]):
    """Fans stored items (verdicts, alerts) out to subscribers; lives on the server's event loop."""

    def __init__(self, buffer: int, max_subscribers: int) -> None:
        self._buffer = buffer
        self._max = max_subscribers
        self._subscriptions: list[Subscription[T]] = []

    @property
    def active(self) -> bool:
        return bool(self._subscriptions)

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, wants: Callable[[T], bool]) -> Subscription[T]:
        """Register a subscriber for the items ``wants`` accepts; OverflowError past max_subscribers."""
        if len(self._subscriptions) >= self._max:
            raise OverflowError(f"the collector already serves {self._max} subscribers")
        subscription: Subscription[T] = Subscription(wants, self._buffer)
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription[T]) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def publish(self, items: Sequence[T]) -> None:
        """Hand the items each subscriber wants to it, as one batch; never waits."""
        for subscription in list(self._subscriptions):
            wanted = [item for item in items if subscription.wants(item)]
            if not wanted:
                continue
            if subscription.waiting + len(wanted) > subscription.buffer:
                subscription.overflowed.set()
                subscription.ready.set()
                self.unsubscribe(subscription)
                continue
            subscription.batches.append(wanted)
            subscription.waiting += len(wanted)
            subscription.ready.set()


async def follow(
    context: grpc.aio.ServicerContext[Any, Any],
    broker: Broker[T],
    wants: Callable[[T], bool],
    wrap: Callable[[list[T]], M],
    max_batch: int = 1,
) -> AsyncIterator[M]:
    """Serve one live subscription: the wanted items, up to ``max_batch`` wrapped in each message,
    until the client leaves or falls a whole buffer behind (then RESOURCE_EXHAUSTED)."""
    try:
        subscription: Subscription[T] = broker.subscribe(wants)
    except OverflowError as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    try:
        while True:
            if subscription.overflowed.is_set():
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"subscriber too slow: more than {subscription.buffer} items waited; "
                    "resubscribe, and query for what was missed",
                )
            items = subscription.take(max_batch)
            if not items:
                await subscription.ready.wait()
                continue
            yield wrap(items)
    finally:
        broker.unsubscribe(subscription)
