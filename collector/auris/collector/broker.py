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
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from auris.v1 import query_service_pb2, verdict_pb2

__all__ = ["Broker", "NewVerdict", "Subscription", "check_filter", "compile_filter", "matches"]

T = TypeVar("T")

# A verdict as the ingest path has it once committed: (id, the verdict as stored, received ns).
NewVerdict = tuple[int, verdict_pb2.Verdict, int]


def _ns(ts: object) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)  # type: ignore[attr-defined]


def _canonical(ip: str) -> str:
    return ipaddress.ip_address(ip).compressed if ip else ""


def compile_filter(flt: query_service_pb2.VerdictFilter) -> Callable[[verdict_pb2.Verdict, int], bool]:
    """A predicate on (verdict, received ns) with the rules of the store's SQL (store.filter_sql).

    The filter is read once, here: matching then tests only the fields the filter sets, on the
    verdict as ingest has it (no StoredVerdict is built for verdicts nobody wants).
    """
    tests: list[Callable[[verdict_pb2.Verdict, int], bool]] = []
    start = _ns(flt.time_range.start_time) if flt.time_range.HasField("start_time") else None
    end = _ns(flt.time_range.end_time) if flt.time_range.HasField("end_time") else None
    if start is not None or end is not None:
        low = start if start is not None else -(2**63)
        high = end if end is not None else 2**63

        if flt.time_field == query_service_pb2.TIME_FIELD_FLOW:
            tests.append(lambda v, r: low <= _ns(v.last_seen_time) < high)
        elif flt.time_field == query_service_pb2.TIME_FIELD_RECEIVED:
            tests.append(lambda v, r: low <= r < high)
        else:
            tests.append(lambda v, r: low <= _ns(v.scored_time) < high)
    if flt.agent_ids:
        agents = frozenset(flt.agent_ids)
        tests.append(lambda v, r: v.agent_id in agents)
    if flt.hostnames:
        hosts = frozenset(flt.hostnames)
        tests.append(lambda v, r: v.hostname in hosts)
    if flt.labels:
        labels = frozenset(flt.labels)
        tests.append(lambda v, r: v.label in labels)
    if flt.ip:
        either = _canonical(flt.ip)
        tests.append(lambda v, r: either in (v.flow.src_ip, v.flow.dst_ip))
    if flt.src_ip:
        src = _canonical(flt.src_ip)
        tests.append(lambda v, r: v.flow.src_ip == src)
    if flt.dst_ip:
        dst = _canonical(flt.dst_ip)
        tests.append(lambda v, r: v.flow.dst_ip == dst)
    if flt.model_id:
        model_id = flt.model_id
        tests.append(lambda v, r: v.model.model_id == model_id)
    if flt.HasField("src_port"):
        src_port = flt.src_port
        tests.append(lambda v, r: v.flow.src_port == src_port)
    if flt.HasField("dst_port"):
        dst_port = flt.dst_port
        tests.append(lambda v, r: v.flow.dst_port == dst_port)
    if flt.HasField("ip_protocol"):
        protocol = flt.ip_protocol
        tests.append(lambda v, r: v.flow.ip_protocol == protocol)
    if flt.HasField("anomalous"):
        anomalous = flt.anomalous
        tests.append(lambda v, r: v.anomalous == anomalous)
    if flt.HasField("min_score") or flt.HasField("max_score"):
        low_score = flt.min_score if flt.HasField("min_score") else -float("inf")
        high_score = flt.max_score if flt.HasField("max_score") else float("inf")

        def in_range(v: verdict_pb2.Verdict, r: int) -> bool:
            score = _decider_score(v)
            return score is not None and low_score <= score <= high_score

        tests.append(in_range)
    if not tests:
        return lambda v, r: True
    if len(tests) == 1:
        return tests[0]
    return lambda v, r: all(test(v, r) for test in tests)


def _decider_score(v: verdict_pb2.Verdict) -> float | None:
    model = v.model
    for s in v.scores:
        if s.model.model_id == model.model_id and s.model.version == model.version:
            return s.score
    return None


def matches(flt: query_service_pb2.VerdictFilter, stored: verdict_pb2.StoredVerdict) -> bool:
    """Whether a stored verdict passes a filter: the same rules as the store's SQL (store.filter_sql)."""
    return compile_filter(flt)(stored.verdict, _ns(stored.received_time))


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
