"""Transaction and tick feeds: validation, identifier hashing, storage, scoring and subscription.

A batch is checked record by record: a record with a missing or non-finite field, a
negative amount or size, an empty id, or (ticks) a time that does not increase within
its symbol is rejected with its index and reason; the rest of the batch is accepted.
Rejected records are counted and kept (``ListFeedRejects``). With ``feed_hash_key_file``
set, customer and terminal ids are replaced by a keyed hash (HMAC-SHA256) before anything
else sees them, so the store never holds the raw identifiers. Accepted records are scored
by the feed's models when the collector has them (``feed_models.py``), stored with their
scores in one transaction, published to subscribers, and acknowledged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import math
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from auris.agent.manifest import ManifestError
from auris.agent.signing import ModelTrust
from auris.collector.broker import Broker, follow
from auris.collector.store import VerdictStore, decode_page_token, encode_page_token
from auris.v1 import admin_service_pb2, feed_service_pb2, feed_service_pb2_grpc, model_pb2

__all__ = [
    "FeedScorer",
    "FeedScorers",
    "FeedServicer",
    "FeedStore",
    "Scored",
    "hash_identifier",
    "tick_record_id",
    "validate_tick",
    "validate_transaction",
]

logger = logging.getLogger(__name__)

TRANSACTIONS = admin_service_pb2.FEED_KIND_TRANSACTIONS
TICKS = admin_service_pb2.FEED_KIND_TICKS
# The most records one request may carry.
MAX_BATCH = 100_000
# Rebuilding windows: records in a row older than the window after which the walk back stops.
_PAST_SPAN_ROWS = 10_000


def hash_identifier(key: bytes, value: str) -> str:
    """A keyed hash of an identifier: stable for one key, meaningless without it."""
    if not value:
        return ""
    return "h:" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:32]


def _ns(ts: Any) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


def time_problem(name: str, ts: Any) -> str | None:
    """Why a Timestamp is unusable, or None: stored in ns, it must fit SQLite's signed 64-bit
    integers (the years 1678 to 2261)."""
    if not 0 <= ts.nanos <= 999_999_999 or not -(2**63) <= _ns(ts) < 2**63:
        return f"{name} is out of range (seconds {ts.seconds}, nanos {ts.nanos})"
    return None


def _finite(message: Any, fields: Sequence[str]) -> str | None:
    for name in fields:
        if not message.HasField(name):
            return f"{name} is missing"
        if not math.isfinite(getattr(message, name)):
            return f"{name} is not a finite number"
    return None


def validate_transaction(tx: feed_service_pb2.Transaction) -> str | None:
    """Why a transaction cannot be accepted, or None."""
    if not tx.transaction_id:
        return "transaction_id is empty"
    if not tx.HasField("time"):
        return "time is missing"
    reason = time_problem("time", tx.time) or _finite(tx, ["amount"])
    if reason:
        return reason
    if tx.amount < 0:
        return f"amount is negative ({tx.amount:g})"
    features = tx.features
    # The sum of finite values is finite unless it overflows: look one by one only then.
    if not features or math.isfinite(sum(map(features.__getitem__, features))):
        return None
    bad = next((name for name, value in features.items() if not math.isfinite(value)), None)
    return f"feature {bad!r} is not a finite number" if bad is not None else None


def tick_record_id(tick: feed_service_pb2.Tick) -> str:
    return f"{tick.symbol}@{_ns(tick.time)}"


def validate_tick(tick: feed_service_pb2.Tick, last_ns: int | None) -> str | None:
    """Why a tick cannot be accepted (``last_ns``: the symbol's latest accepted time), or None."""
    if not tick.symbol:
        return "symbol is empty"
    if not tick.HasField("time"):
        return "time is missing"
    reason = time_problem("time", tick.time)
    if reason:
        return reason
    if tick.is_bar:
        reason = _finite(tick, ["open", "high", "low", "close", "volume"])
        if reason:
            return reason
        if tick.volume < 0:
            return f"volume is negative ({tick.volume:g})"
        if not (tick.low <= min(tick.open, tick.close) and tick.high >= max(tick.open, tick.close)):
            return "bar is inconsistent (low <= open, close <= high does not hold)"
    else:
        reason = _finite(tick, ["price", "size"])
        if reason:
            return reason
        if tick.price <= 0 or tick.size < 0:
            return "price must be positive and size not negative"
    if last_ns is not None and _ns(tick.time) <= last_ns:
        return f"time does not increase within {tick.symbol} (last accepted {last_ns} ns)"
    return None


@dataclasses.dataclass(frozen=True)
class Scored:
    """What a feed's model said about one record."""

    model_id: str
    model_version: str
    score: float
    anomalous: bool
    explanation: str = ""


# What one batch came to: stored scores, rejected records, alerts changed.
_Outcome = tuple[list[feed_service_pb2.FeedScore], list[feed_service_pb2.RejectedRecord], list[int]]

# Scores a batch of accepted records (in time order) of one kind; one result (or None) per record.
FeedScorer = Callable[[Sequence[Any]], Sequence[Scored | None]]


class FeedScorers:
    """The feed models, and one scorer per feed (their windows are per feed: the same symbol or
    customer in two feeds is two histories). Loaded once; a feed's scorer is made on first use."""

    def __init__(
        self,
        folder: Path,
        trust: ModelTrust,
        tick_detector: str | None = None,
        *,
        history: FeedStore | None = None,
        max_replay: int = 500_000,
    ) -> None:
        from auris.collector.feed_models import TickScorer, TransactionScorer, load_feed_models

        # Stored records replayed into a feed's windows when its scorer is made (after a restart).
        self._history = history
        self.max_replay = max_replay

        self._tx_models, refused = load_feed_models(folder, trust, model_pb2.MODEL_DOMAIN_TRANSACTION)
        try:
            self._tick_model: Any = TickScorer.load(folder, trust, detector=tick_detector).model
        except ManifestError as exc:
            self._tick_model = None
            refused.append(str(exc).splitlines()[0])
        self.refused = refused
        self._new_tx = lambda: TransactionScorer(self._tx_models)
        self._new_ticks = lambda: TickScorer(self._tick_model)
        self._tx: dict[str, Any] = {}
        self._ticks: dict[str, Any] = {}

    @property
    def models(self) -> list[str]:
        found = [f"{m.model_id}@{m.version}" for m in self._tx_models]
        if self._tick_model is not None:
            found.append(f"{self._tick_model.model_id}@{self._tick_model.version}")
        return found

    def _score(
        self, kind: int, records: Sequence[Any], scorers: dict[str, Any], new: Callable[[], Any]
    ) -> list[Scored | None]:
        out: list[Scored | None] = [None] * len(records)
        by_feed: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            by_feed.setdefault(record.feed_id, []).append(i)
        for feed_id, rows in by_feed.items():
            scorer = scorers.get(feed_id)
            if scorer is None:
                scorer = new()
                self._rebuild(kind, feed_id, scorer)  # kept only once rebuilt: a failure retries
                scorers[feed_id] = scorer
            for i, result in zip(rows, scorer.score_aligned([records[i] for i in rows]), strict=True):
                if result is not None:
                    out[i] = Scored(
                        result.model_id,
                        result.model_version,
                        result.score,
                        result.anomalous,
                        result.explanation,
                    )
        return out

    def _rebuild(self, kind: int, feed_id: str, scorer: Any) -> None:
        """Replay the feed's stored records into a new scorer's windows, without scoring them."""
        if self._history is None:
            return
        started = time.monotonic()
        chunks: Iterator[Sequence[Any]]
        if kind == TRANSACTIONS:
            span_s = max(scorer.windows.customers.windows)
            chunks = self._history.recent_transactions(feed_id, span_s, self.max_replay)
        else:
            chunks = self._history.recent_ticks(feed_id, 2 * scorer.bars.kept + 1, scorer.trades.seconds)
        replayed = 0
        for chunk in chunks:
            scorer.warm(chunk)
            replayed += len(chunk)
        if replayed:
            logger.info(
                "feed %s: windows rebuilt from %d stored records in %.1f s",
                feed_id,
                replayed,
                time.monotonic() - started,
            )

    def transactions(self, records: Sequence[feed_service_pb2.Transaction]) -> list[Scored | None]:
        if not self._tx_models:
            return [None] * len(records)
        return self._score(TRANSACTIONS, records, self._tx, self._new_tx)

    def ticks(self, records: Sequence[feed_service_pb2.Tick]) -> list[Scored | None]:
        if self._tick_model is None:
            return [None] * len(records)
        return self._score(TICKS, records, self._ticks, self._new_ticks)


_COLUMNS = "id, feed_id, record_id, entity, time_ns, model_id, model_version, score, anomalous, explanation"


def _score(row: Sequence[Any]) -> feed_service_pb2.FeedScore:
    row_id, feed_id, record_id, entity, time_ns, model_id, version, score, anomalous, explanation = row
    out = feed_service_pb2.FeedScore(
        id=row_id,
        feed_id=feed_id,
        record_id=record_id,
        entity=entity,
        anomalous=bool(anomalous),
        explanation=explanation,
        score=score if score is not None else math.nan,
    )
    out.time.FromNanoseconds(time_ns)
    if model_id:
        out.model.model_id, out.model.version = model_id, version
    return out


class FeedStore:
    """Feed records and rejects in the collector's database."""

    def __init__(
        self,
        store: VerdictStore,
        on_store: Callable[[sqlite3.Connection, list[feed_service_pb2.FeedScore], int], list[int]]
        | None = None,
    ) -> None:
        self._store = store
        # Alert rules over feed scores, run inside the transaction that stores them.
        self._on_store = on_store
        # (feed, symbol) -> latest accepted tick time, loaded per feed on first use.
        self._last_tick: dict[tuple[str, str], int] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()

    def last_tick_ns(self, feed_id: str, symbol: str) -> int | None:
        with self._lock:
            if feed_id not in self._loaded:
                rows = self._store.reader().execute(
                    "SELECT entity, MAX(time_ns) FROM feed_records WHERE feed_id = ? AND kind = ?"
                    " GROUP BY entity",
                    (feed_id, TICKS),
                )
                for entity, latest in rows:
                    self._last_tick[(feed_id, entity)] = int(latest)
                self._loaded.add(feed_id)
            return self._last_tick.get((feed_id, symbol))

    def recent_transactions(
        self, feed_id: str, span_s: float, limit: int, chunk: int = 10_000
    ) -> Iterator[list[feed_service_pb2.Transaction]]:
        """The feed's stored transactions of the last ``span_s`` before its newest one (at most
        ``limit``, the newest kept), in the order they were stored, in chunks. Walking back skips
        records older than the span and stops after a run of them."""
        conn = self._store.reader()
        rows = conn.execute(
            "SELECT id, time_ns FROM feed_records WHERE feed_id = ? AND kind = ? ORDER BY id DESC",
            (feed_id, TRANSACTIONS),
        )
        first_id: int | None = None
        cutoff: int | None = None
        taken = older = 0
        for row_id, time_ns in rows:
            if cutoff is None:
                cutoff = time_ns - int(span_s * 1e9)
            if time_ns < cutoff:
                # A late record is skipped, not the end: stop once a long run is past the span.
                older += 1
                if older >= _PAST_SPAN_ROWS:
                    break
                continue
            older = 0
            first_id = row_id
            taken += 1
            if taken >= limit:
                break
        rows.close()
        if first_id is None or cutoff is None:
            return
        after = first_id - 1
        while True:
            page = conn.execute(
                "SELECT id, record_pb FROM feed_records WHERE feed_id = ? AND kind = ? AND id > ?"
                " AND time_ns >= ? ORDER BY id LIMIT ?",
                (feed_id, TRANSACTIONS, after, cutoff, chunk),
            ).fetchall()
            if not page:
                return
            after = page[-1][0]
            yield [feed_service_pb2.Transaction.FromString(blob) for _, blob in page]

    def recent_ticks(
        self, feed_id: str, bars: int, trade_bar_seconds: float
    ) -> Iterator[list[feed_service_pb2.Tick]]:
        """Per symbol, the stored ticks of the feed's last ``bars`` bars (bar records, or the
        trades of whole trade bars, the open one included), oldest first; one chunk a symbol."""
        conn = self._store.reader()
        symbols = [
            entity
            for (entity,) in conn.execute(
                "SELECT DISTINCT entity FROM feed_records WHERE feed_id = ? AND kind = ?", (feed_id, TICKS)
            )
        ]
        from auris.collector.feed_features import trade_bar_start_ns

        for symbol in symbols:
            rows = conn.execute(
                "SELECT record_pb FROM feed_records WHERE feed_id = ? AND kind = ? AND entity = ?"
                " ORDER BY time_ns DESC, id DESC",
                (feed_id, TICKS, symbol),
            )
            ticks: list[feed_service_pb2.Tick] = []
            seen = 0
            last_bucket: int | None = None
            for (blob,) in rows:
                tick = feed_service_pb2.Tick.FromString(blob)
                stamp = tick.time
                t_s = stamp.seconds + stamp.nanos * 1e-9
                bucket = None if tick.is_bar else trade_bar_start_ns(t_s, trade_bar_seconds)
                if bucket is None or bucket != last_bucket:
                    seen += 1
                    if seen > bars:
                        break
                last_bucket = bucket
                ticks.append(tick)
            rows.close()
            if ticks:
                yield ticks[::-1]

    def add(
        self,
        feed_id: str,
        kind: int,
        records: Sequence[tuple[str, str, int, bytes, Scored | None]],
        rejects: Sequence[feed_service_pb2.RejectedRecord],
        now_ns: int,
    ) -> tuple[list[feed_service_pb2.FeedScore], list[int]]:
        """Store accepted records (record id, entity, time, serialised record, score) and rejects in one
        transaction; return the stored scores and the ids of alerts they changed."""
        out: list[feed_service_pb2.FeedScore] = []
        alert_ids: list[int] = []
        rows = [
            (feed_id, kind, record_id, entity, time_ns, now_ns,
             scored.model_id if scored else "", scored.model_version if scored else "",
             scored.score if scored else None, int(bool(scored and scored.anomalous)),
             scored.explanation if scored else "", blob)
            for record_id, entity, time_ns, blob, scored in records
        ]  # fmt: skip
        with self._store.writing() as conn:
            if rows:
                conn.executemany(
                    "INSERT INTO feed_records (feed_id, kind, record_id, entity, time_ns, received_ns,"
                    " model_id, model_version, score, anomalous, explanation, record_pb)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
                # One writer, rowids without AUTOINCREMENT: the batch took consecutive ids.
                first = conn.execute("SELECT last_insert_rowid()").fetchone()[0] - len(rows) + 1
                out = [
                    _score((first + i, row[0], row[2], row[3], row[4], *row[6:11]))
                    for i, row in enumerate(rows)
                ]
            conn.executemany(
                "INSERT INTO feed_rejects (feed_id, received_ns, record_index, record_id, reason)"
                " VALUES (?,?,?,?,?)",
                [(feed_id, now_ns, r.index, r.record_id, r.reason) for r in rejects],
            )
            if self._on_store is not None and out:
                alert_ids = self._on_store(conn, out, now_ns)
        if kind == TICKS:
            with self._lock:
                for _, entity, time_ns, _, _ in records:
                    key = (feed_id, entity)
                    self._last_tick[key] = max(time_ns, self._last_tick.get(key, 0))
        return out, alert_ids

    def query(
        self, feed_id: str, since_ns: int, anomalous: bool | None, page_size: int, page_token: str
    ) -> tuple[list[feed_service_pb2.FeedScore], str]:
        where: list[str] = ["time_ns >= ?"]
        params: list[Any] = [since_ns]
        if feed_id:
            where.append("feed_id = ?")
            params.append(feed_id)
        if anomalous is not None:
            where.append("anomalous = ?")
            params.append(int(anomalous))
        if page_token:
            where.append("id < ?")
            params.append(decode_page_token(page_token))
        rows = self._store.reader().execute(
            f"SELECT {_COLUMNS} FROM feed_records WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            [*params, page_size + 1],
        )
        scores = [_score(r) for r in rows]
        token = encode_page_token(scores[page_size - 1].id) if len(scores) > page_size else ""
        return scores[:page_size], token

    def rejects(
        self, feed_id: str, page_size: int, page_token: str
    ) -> tuple[list[feed_service_pb2.StoredReject], str]:
        where: list[str] = ["1"]
        params: list[Any] = []
        if feed_id:
            where.append("feed_id = ?")
            params.append(feed_id)
        if page_token:
            where.append("id < ?")
            params.append(decode_page_token(page_token))
        rows = self._store.reader().execute(
            "SELECT id, feed_id, received_ns, record_index, record_id, reason FROM feed_rejects"
            f" WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
            [*params, page_size + 1],
        )
        out = []
        for row_id, feed, received_ns, index, record_id, reason in rows:
            reject = feed_service_pb2.StoredReject(
                id=row_id,
                feed_id=feed,
                record=feed_service_pb2.RejectedRecord(index=index, record_id=record_id, reason=reason),
            )
            reject.received_time.FromNanoseconds(received_ns)
            out.append(reject)
        token = encode_page_token(out[page_size - 1].id) if len(out) > page_size else ""
        return out[:page_size], token

    def feeds(self) -> list[admin_service_pb2.FeedInfo]:
        reader = self._store.reader()
        rejected = dict(
            reader.execute("SELECT feed_id, COUNT(*) FROM feed_rejects GROUP BY feed_id").fetchall()
        )
        out = []
        for feed_id, kind, accepted, latest in reader.execute(
            "SELECT feed_id, kind, COUNT(*), MAX(time_ns) FROM feed_records GROUP BY feed_id, kind"
            " ORDER BY feed_id"
        ):
            info = admin_service_pb2.FeedInfo(
                feed_id=feed_id,
                kind=kind,
                records_accepted=accepted,
                records_rejected=rejected.get(feed_id, 0),
            )
            info.last_record_time.FromNanoseconds(latest)
            out.append(info)
        # Feeds that so far sent nothing valid are listed too.
        listed = {info.feed_id for info in out}
        out += [
            admin_service_pb2.FeedInfo(feed_id=feed_id, records_rejected=count)
            for feed_id, count in sorted(rejected.items())
            if feed_id not in listed
        ]
        return sorted(out, key=lambda info: info.feed_id)


class FeedServicer(feed_service_pb2_grpc.FeedServiceServicer):
    """FeedService: accept, hash, validate, score, store, publish, acknowledge."""

    def __init__(
        self,
        feeds: FeedStore,
        writer: ThreadPoolExecutor,
        readers: ThreadPoolExecutor,
        broker: Broker[feed_service_pb2.FeedScore],
        *,
        hash_key: bytes | None = None,
        score_transactions: FeedScorer | None = None,
        score_ticks: FeedScorer | None = None,
        default_page: int = 100,
        max_page: int = 1000,
        alerts_changed: Callable[[list[int]], Awaitable[None]] | None = None,
    ) -> None:
        self._alerts_changed = alerts_changed
        self._feeds = feeds
        self._writer = writer
        self._readers = readers
        self._broker = broker
        self._hash_key = hash_key
        self._score_transactions = score_transactions
        self._score_ticks = score_ticks
        self._default_page = default_page
        self._max_page = max_page
        # One batch of a feed at a time: scoring state and tick order are per feed.
        self._lock = threading.Lock()

    def _transactions(self, batch: Sequence[feed_service_pb2.Transaction]) -> _Outcome:
        rejects: list[feed_service_pb2.RejectedRecord] = []
        accepted: list[feed_service_pb2.Transaction] = []
        for index, original in enumerate(batch):
            tx = original
            if self._hash_key is not None:  # on a copy: the request stays as it came
                tx = feed_service_pb2.Transaction()
                tx.CopyFrom(original)
                tx.customer_id = hash_identifier(self._hash_key, tx.customer_id)
                tx.terminal_id = hash_identifier(self._hash_key, tx.terminal_id)
            reason = validate_transaction(tx)
            if reason is not None:
                rejects.append(
                    feed_service_pb2.RejectedRecord(index=index, reason=reason, record_id=tx.transaction_id)
                )
            else:
                accepted.append(tx)
        return self._store(
            TRANSACTIONS, batch, accepted, rejects, lambda t: (t.transaction_id, t.customer_id)
        )

    def _ticks(self, batch: Sequence[feed_service_pb2.Tick]) -> _Outcome:
        rejects: list[feed_service_pb2.RejectedRecord] = []
        accepted: list[feed_service_pb2.Tick] = []
        latest: dict[tuple[str, str], int] = {}
        for index, tick in enumerate(batch):
            key = (tick.feed_id, tick.symbol)
            last = latest[key] if key in latest else self._feeds.last_tick_ns(*key) if tick.symbol else None
            reason = validate_tick(tick, last)
            if reason is not None:
                rejects.append(
                    feed_service_pb2.RejectedRecord(
                        index=index, reason=reason, record_id=tick_record_id(tick)
                    )
                )
            else:
                accepted.append(tick)
                latest[key] = _ns(tick.time)
        return self._store(TICKS, batch, accepted, rejects, lambda t: (tick_record_id(t), t.symbol))

    def _store(
        self,
        kind: int,
        batch: Sequence[Any],
        accepted: Sequence[Any],
        rejects: list[feed_service_pb2.RejectedRecord],
        ids: Callable[[Any], tuple[str, str]],
    ) -> _Outcome:
        scorer = self._score_transactions if kind == TRANSACTIONS else self._score_ticks
        scores: Sequence[Scored | None] = (
            scorer(accepted) if scorer is not None and accepted else [None] * len(accepted)
        )
        stored: list[feed_service_pb2.FeedScore] = []
        by_feed: dict[str, list[tuple[str, str, int, bytes, Scored | None]]] = {}
        for record, scored in zip(accepted, scores, strict=True):
            record_id, entity = ids(record)
            by_feed.setdefault(record.feed_id, []).append(
                (record_id, entity, _ns(record.time), record.SerializeToString(), scored)
            )
        # Each reject is kept under the feed its record named.
        rejected: dict[str, list[feed_service_pb2.RejectedRecord]] = {}
        for reject in rejects:
            rejected.setdefault(batch[reject.index].feed_id, []).append(reject)
        now = time.time_ns()
        alert_ids: list[int] = []
        for feed_id in dict.fromkeys([*by_feed, *rejected]):
            added, changed = self._feeds.add(
                feed_id, kind, by_feed.get(feed_id, []), rejected.get(feed_id, []), now
            )
            stored += added
            alert_ids += changed
        return stored, rejects, alert_ids

    async def _accept(
        self, kind: int, records: Sequence[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[list[feed_service_pb2.FeedScore], list[feed_service_pb2.RejectedRecord]]:
        if len(records) > MAX_BATCH:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"more than {MAX_BATCH} records in one request"
            )
        work = self._transactions if kind == TRANSACTIONS else self._ticks

        def run() -> _Outcome:
            with self._lock:
                return work(records)

        stored, rejects, alert_ids = await asyncio.get_running_loop().run_in_executor(self._writer, run)
        if alert_ids and self._alerts_changed is not None:
            await self._alerts_changed(alert_ids)
        if stored and self._broker.active:
            self._broker.publish(stored)
        if rejects:
            logger.info(
                "feed batch: %d accepted, %d rejected (first: %s)",
                len(stored),
                len(rejects),
                rejects[0].reason,
            )
        return stored, rejects

    async def SubmitTransactions(
        self,
        request: feed_service_pb2.SubmitTransactionsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> feed_service_pb2.SubmitTransactionsResponse:
        stored, rejects = await self._accept(TRANSACTIONS, request.transactions, context)
        return feed_service_pb2.SubmitTransactionsResponse(
            accepted=len(stored), rejected=rejects, scores=stored
        )

    async def StreamTransactions(
        self,
        request_iterator: AsyncIterator[feed_service_pb2.StreamTransactionsRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[feed_service_pb2.StreamTransactionsResponse]:
        async for request in request_iterator:
            stored, rejects = await self._accept(TRANSACTIONS, request.transactions, context)
            yield feed_service_pb2.StreamTransactionsResponse(
                accepted=len(stored), rejected=rejects, scores=stored
            )

    async def SubmitTicks(
        self, request: feed_service_pb2.SubmitTicksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feed_service_pb2.SubmitTicksResponse:
        stored, rejects = await self._accept(TICKS, request.ticks, context)
        return feed_service_pb2.SubmitTicksResponse(accepted=len(stored), rejected=rejects, scores=stored)

    async def StreamTicks(
        self,
        request_iterator: AsyncIterator[feed_service_pb2.StreamTicksRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[feed_service_pb2.StreamTicksResponse]:
        async for request in request_iterator:
            stored, rejects = await self._accept(TICKS, request.ticks, context)
            yield feed_service_pb2.StreamTicksResponse(accepted=len(stored), rejected=rejects, scores=stored)

    def _page(self, size: int) -> int:
        return min(size or self._default_page, self._max_page)

    async def QueryFeedScores(
        self, request: feed_service_pb2.QueryFeedScoresRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feed_service_pb2.QueryFeedScoresResponse:
        reason = time_problem("since_time", request.since_time)
        if reason:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        since = _ns(request.since_time) if request.HasField("since_time") else 0
        anomalous = request.anomalous if request.HasField("anomalous") else None
        try:
            scores, token = await asyncio.get_running_loop().run_in_executor(
                self._readers,
                self._feeds.query,
                request.feed_id,
                since,
                anomalous,
                self._page(request.page_size),
                request.page_token,
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return feed_service_pb2.QueryFeedScoresResponse(scores=scores, next_page_token=token)

    async def ListFeedRejects(
        self, request: feed_service_pb2.ListFeedRejectsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feed_service_pb2.ListFeedRejectsResponse:
        try:
            rejects, token = await asyncio.get_running_loop().run_in_executor(
                self._readers,
                self._feeds.rejects,
                request.feed_id,
                self._page(request.page_size),
                request.page_token,
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return feed_service_pb2.ListFeedRejectsResponse(rejects=rejects, next_page_token=token)

    async def SubscribeFeedScores(
        self,
        request: feed_service_pb2.SubscribeFeedScoresRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[feed_service_pb2.SubscribeFeedScoresResponse]:
        anomalous = request.anomalous if request.HasField("anomalous") else None

        def wanted(s: feed_service_pb2.FeedScore) -> bool:
            return (not request.feed_id or s.feed_id == request.feed_id) and (
                anomalous is None or s.anomalous == anomalous
            )

        def wrap(items: list[feed_service_pb2.FeedScore]) -> feed_service_pb2.SubscribeFeedScoresResponse:
            return feed_service_pb2.SubscribeFeedScoresResponse(score=items[0])

        async for response in follow(context, self._broker, wanted, wrap):
            yield response
