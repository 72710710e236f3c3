"""Live subscriptions: new verdicts and alert changes fanned out to subscribers, never slowing ingest.

Each subscriber has a bounded buffer. Publishing never waits: a subscriber whose
buffer is full is cut off (its stream ends with RESOURCE_EXHAUSTED) instead of
holding back the agents' acknowledgements.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from auris.v1 import query_service_pb2, verdict_pb2

__all__ = ["Broker", "Subscription", "check_filter", "matches"]

T = TypeVar("T")


def _ns(ts: object) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)  # type: ignore[attr-defined]


def _canonical(ip: str) -> str:
    return ipaddress.ip_address(ip).compressed if ip else ""


def matches(flt: query_service_pb2.VerdictFilter, stored: verdict_pb2.StoredVerdict) -> bool:
    """Whether a stored verdict passes a filter: the same rules as the store's SQL (store.filter_sql)."""
    v = stored.verdict
    if flt.time_field == query_service_pb2.TIME_FIELD_FLOW:
        when = _ns(v.last_seen_time)
    elif flt.time_field == query_service_pb2.TIME_FIELD_RECEIVED:
        when = _ns(stored.received_time)
    else:
        when = _ns(v.scored_time)
    if flt.time_range.HasField("start_time") and when < _ns(flt.time_range.start_time):
        return False
    if flt.time_range.HasField("end_time") and when >= _ns(flt.time_range.end_time):
        return False
    if flt.agent_ids and v.agent_id not in flt.agent_ids:
        return False
    if flt.hostnames and v.hostname not in flt.hostnames:
        return False
    if flt.labels and v.label not in flt.labels:
        return False
    if flt.ip and _canonical(flt.ip) not in (v.flow.src_ip, v.flow.dst_ip):
        return False
    if flt.src_ip and _canonical(flt.src_ip) != v.flow.src_ip:
        return False
    if flt.dst_ip and _canonical(flt.dst_ip) != v.flow.dst_ip:
        return False
    if flt.model_id and flt.model_id != v.model.model_id:
        return False
    for present, wanted, actual in (
        (flt.HasField("src_port"), flt.src_port, v.flow.src_port),
        (flt.HasField("dst_port"), flt.dst_port, v.flow.dst_port),
        (flt.HasField("ip_protocol"), flt.ip_protocol, v.flow.ip_protocol),
    ):
        if present and wanted != actual:
            return False
    if flt.HasField("anomalous") and flt.anomalous != v.anomalous:
        return False
    if flt.HasField("min_score") or flt.HasField("max_score"):
        score = next(
            (
                s.score
                for s in v.scores
                if s.model.model_id == v.model.model_id and s.model.version == v.model.version
            ),
            None,
        )
        if score is None:
            return False
        if flt.HasField("min_score") and score < flt.min_score:
            return False
        if flt.HasField("max_score") and score > flt.max_score:
            return False
    return True


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
    queue: asyncio.Queue[T]
    # Set when the subscriber fell behind by a whole buffer and was cut off.
    overflowed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


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
        subscription: Subscription[T] = Subscription(wants, asyncio.Queue(maxsize=self._buffer))
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription[T]) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def publish(self, items: Sequence[T]) -> None:
        """Hand each item to every subscriber that wants it; never waits."""
        for subscription in list(self._subscriptions):
            for item in items:
                if not subscription.wants(item):
                    continue
                try:
                    subscription.queue.put_nowait(item)
                except asyncio.QueueFull:
                    subscription.overflowed.set()
                    self.unsubscribe(subscription)
                    break
