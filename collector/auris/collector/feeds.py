"""Transaction and tick feeds: validation, identifier hashing, storage, scoring and subscription.

A batch is checked record by record: a record with a missing or non-finite field, a
negative amount or size, an empty id, or (ticks) a time that does not increase within
its symbol is rejected with its index and reason; the rest of the batch is accepted.
Rejected records are counted and kept (``ListFeedRejects``). With ``feed_hash_key_file``
set, customer and terminal ids are replaced by a keyed hash (HMAC-SHA256) before anything
else sees them, so the store never holds the raw identifiers. Accepted records are scored
by the feed's models when the collector has them (``feed_models.py``), stored with their
scores in one transaction, published to subscribers, and acknowledged (with every score, or
the anomalous ones only, as the request asks).

A batch is read into columns (``feed_batch.py``; a tick request straight from its bytes,
``feed_wire.decode_ticks``) and checked on those arrays; a record is looked at on its own only
where its columns say it may be bad, so the reasons are those of ``validate_transaction`` /
``validate_tick``. The batches of a stream go through three stages on three threads - prepared
(columns, checks), scored, stored - so that one is prepared and the one before scored while an
earlier one is stored: onnxruntime and SQLite release the GIL. The answer's scores are added
once its batch is stored, on a fourth thread, from bytes laid out with numpy
(``feed_wire.encode_scores``), while the writer goes on to the next batch. Each stage hands the
batch to the next itself; only the last wakes the event loop (``_chain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import itertools
import logging
import math
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
import orjson

from auris.agent.manifest import ManifestError
from auris.agent.signing import ModelTrust
from auris.agent.wire import field_tag, length_delimited
from auris.collector.broker import Broker, follow
from auris.collector.feed_batch import ULB_VALUE_NAMES, TickColumns, TransactionColumns
from auris.collector.feed_wire import decode_ticks, decode_transactions, encode_scores
from auris.collector.store import VerdictStore, decode_page_token, encode_page_token
from auris.v1 import admin_service_pb2, feed_service_pb2, feed_service_pb2_grpc, model_pb2

if TYPE_CHECKING:
    from auris.collector.feed_models import BatchScores

__all__ = [
    "FeedScorer",
    "FeedScorers",
    "FeedServicer",
    "FeedStore",
    "Scored",
    "hash_identifier",
    "tick_firsts",
    "tick_record_id",
    "ticks_need_checking",
    "transaction_suspects",
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


# Seconds beyond which a Timestamp may not fit in signed 64-bit nanoseconds (time_problem decides).
_SAFE_SECONDS = (-(2**63) // 1_000_000_000 + 1, 2**63 // 1_000_000_000 - 1)


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


def validate_transaction(tx: feed_service_pb2.Transaction, names: Sequence[str] = ()) -> str | None:
    """Why a transaction cannot be accepted, or None; ``names`` name its feature_values when it
    does not name them itself (its request's feature_names)."""
    if not tx.transaction_id:
        return "transaction_id is empty"
    if not tx.HasField("time"):
        return "time is missing"
    reason = time_problem("time", tx.time) or _finite(tx, ["amount"])
    if reason:
        return reason
    if tx.amount < 0:
        return f"amount is negative ({tx.amount:g})"
    return _features_problem(tx.features) or _values_problem(tx, names)


def _features_problem(features: Mapping[str, float]) -> str | None:
    # The sum of finite values is finite unless it overflows: look one by one only then.
    if not features or math.isfinite(sum(map(features.__getitem__, features))):
        return None
    bad = next((name for name, value in features.items() if not math.isfinite(value)), None)
    return f"feature {bad!r} is not a finite number" if bad is not None else None


def _values_problem(tx: feed_service_pb2.Transaction, names: Sequence[str]) -> str | None:
    values, own = tx.feature_values, tx.feature_names
    if not values and not own:
        return None
    named = own or names
    if len(values) != len(named):
        whose = "its feature_names" if own else "the request's feature_names"
        return f"feature_values has {len(values)} values for the {len(named)} names of {whose}"
    seen: set[str] = set()
    for name, value in zip(named, values, strict=True):
        if not name:
            return "a feature name is empty"
        if name in seen:
            return f"feature {name!r} is named twice"
        if name in tx.features:
            return f"feature {name!r} is given twice (in features and feature_values)"
        if not math.isfinite(value):
            return f"feature {name!r} is not a finite number"
        seen.add(name)
    return None


_NAMES_TAG = field_tag(feed_service_pb2.Transaction, "feature_names")


def _names_field(names: Sequence[str]) -> bytes:
    """``names`` as Transaction.feature_names entries: appended to a serialised record,
    they parse as its feature_names."""
    return b"".join(length_delimited(_NAMES_TAG, name.encode()) for name in names)


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


def _time_suspects(seconds: npt.NDArray[np.int64], nanos: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    # A missing time reads as 0 s 0 ns: such records are looked at one by one.
    bad: npt.NDArray[np.bool_] = (
        ((seconds == 0) & (nanos == 0))
        | (nanos < 0)
        | (nanos > 999_999_999)
        | (seconds < _SAFE_SECONDS[0])
        | (seconds > _SAFE_SECONDS[1])
    )
    return bad


def transaction_suspects(columns: TransactionColumns) -> list[int]:
    """The records of a batch that ``validate_transaction`` might reject (a superset: a missing
    field reads as zero, so zeros are looked at too), from the batch's columns."""
    bad = _time_suspects(columns.seconds, columns.nanos)
    amounts = columns.amounts
    bad |= ~(amounts > 0) | ~np.isfinite(amounts)
    if len(columns.ulb_rows):
        bad[columns.ulb_rows] |= ~np.isfinite(columns.ulb_values).all(axis=1)
    bad[columns.other_features] = True  # features beyond V1..V28: their sum is checked on the record
    if "" in columns.transaction_ids:
        bad[[i for i, tid in enumerate(columns.transaction_ids) if not tid]] = True
    return np.flatnonzero(bad).tolist()


def tick_firsts(columns: TickColumns) -> dict[tuple[str, str], int] | None:
    """The first time (ns) of each (feed, symbol) of a batch when ``validate_tick`` can reject none
    of its ticks provided each first time is after its symbol's latest accepted one; None when some
    tick may be rejected for any other reason (then each is checked on its own)."""
    if not len(columns):
        return {}
    if "" in columns.symbols or _time_suspects(columns.seconds, columns.nanos).any():
        return None
    bars = columns.is_bar
    if bars.any():
        o, h, lo, c, v = (getattr(columns, n)[bars] for n in ("open", "high", "low", "close", "volume"))
        values = np.stack([o, h, lo, c, v])
        if (
            not np.isfinite(values).all()
            or (values == 0).any()  # maybe missing
            or (v < 0).any()
            or not ((lo <= np.minimum(o, c)) & (h >= np.maximum(o, c))).all()
        ):
            return None
    trades = ~bars
    if trades.any():
        price, size = columns.price[trades], columns.size[trades]
        if not ((price > 0) & (size > 0) & np.isfinite(price) & np.isfinite(size)).all():
            return None
    # Times must increase within each (feed, symbol).
    feed_ids = columns.feed_ids
    keys: dict[Any, int] = {}
    one_feed = feed_ids.count(feed_ids[0]) == len(feed_ids)  # then keyed by symbol alone: no tuples
    codes = np.fromiter(
        (
            keys.setdefault(key, len(keys))
            for key in (columns.symbols if one_feed else zip(feed_ids, columns.symbols, strict=True))
        ),
        np.int64,
        len(columns),
    )
    if one_feed:
        keys = {(feed_ids[0], symbol): code for symbol, code in keys.items()}
    order = np.argsort(codes, kind="stable")
    code, ns = codes[order], columns.time_ns[order]
    if ((code[1:] == code[:-1]) & (ns[1:] <= ns[:-1])).any():
        return None
    first = np.flatnonzero(np.concatenate([[True], code[1:] != code[:-1]]))
    return dict(zip(keys, ns[first].tolist(), strict=True))


def ticks_need_checking(columns: TickColumns, last_ns: Callable[[str, str], int | None]) -> bool:
    """Whether ``validate_tick`` might reject any tick of the batch (``last_ns``: a feed's symbol's
    latest accepted time); False means every one is accepted."""
    firsts = tick_firsts(columns)
    if firsts is None:
        return True
    for key, start in firsts.items():
        last = last_ns(*key)
        if last is not None and start <= last:
            return True
    return False


def _kept(n: int, rejects: Sequence[feed_service_pb2.RejectedRecord]) -> list[int]:
    """Indices of a batch of ``n`` records less the rejected ones."""
    dropped = {r.index for r in rejects}
    return [i for i in range(n) if i not in dropped]


AnswerScores: TypeAlias = "feed_service_pb2.AnswerScores.ValueType"

# The answers of the four ingest RPCs: the same three fields each.
_Answer = (
    feed_service_pb2.SubmitTransactionsResponse
    | feed_service_pb2.StreamTransactionsResponse
    | feed_service_pb2.SubmitTicksResponse
    | feed_service_pb2.StreamTicksResponse
)
_AnswerT = TypeVar(
    "_AnswerT",
    feed_service_pb2.SubmitTransactionsResponse,
    feed_service_pb2.StreamTransactionsResponse,
    feed_service_pb2.SubmitTicksResponse,
    feed_service_pb2.StreamTicksResponse,
)


@dataclasses.dataclass(frozen=True)
class Scored:
    """What a feed's model said about one record."""

    model_id: str
    model_version: str
    score: float
    anomalous: bool
    explanation: str = ""


# Scores a batch of accepted records (in time order) of one kind, given as columns
# (TransactionColumns or TickColumns); None when there is no model for the kind.
FeedScorer = Callable[[Any], "BatchScores | None"]


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

    def _score(self, kind: int, columns: Any, scorers: dict[str, Any], new: Callable[[], Any]) -> BatchScores:
        from auris.collector.feed_models import BatchScores

        feed_ids: list[str] = columns.feed_ids
        groups: dict[str, list[int]] = {}
        if feed_ids.count(feed_ids[0]) != len(feed_ids):
            for i, feed_id in enumerate(feed_ids):
                groups.setdefault(feed_id, []).append(i)
        out: BatchScores | None = None
        for feed_id in groups or [feed_ids[0]]:
            scorer = scorers.get(feed_id)
            if scorer is None:
                scorer = new()
                self._rebuild(kind, feed_id, scorer)  # kept only once rebuilt: a failure retries
                scorers[feed_id] = scorer
            if not groups:  # the whole batch is one feed's
                scored: BatchScores = scorer.score_columns(columns)
                return scored
            rows = groups[feed_id]
            out = out or BatchScores.empty(len(feed_ids), [])
            out.put(rows, scorer.score_columns(columns.take(np.asarray(rows, dtype=np.intp))))
        assert out is not None
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

    def transactions(self, columns: TransactionColumns) -> BatchScores | None:
        """Scores of a batch of accepted transactions (in time order), or None without models."""
        if not self._tx_models or not len(columns):
            return None
        return self._score(TRANSACTIONS, columns, self._tx, self._new_tx)

    def ticks(self, columns: TickColumns) -> BatchScores | None:
        """Scores of a batch of accepted ticks (in time order), or None without a tick model."""
        if self._tick_model is None or not len(columns):
            return None
        return self._score(TICKS, columns, self._ticks, self._new_ticks)


@dataclasses.dataclass
class FeedRows:
    """A feed's accepted records of one batch, as columns, with their scores (``score`` None and
    ``model_id`` "" where no model scored a record)."""

    record_ids: list[str]
    entities: list[str]
    seconds: list[int]
    nanos: list[int]
    blobs: list[bytes]
    model_ids: list[str]
    model_versions: list[str]
    scores: list[float | None]
    anomalous: list[bool]
    explanations: list[str]

    @classmethod
    def of(
        cls,
        record_ids: list[str],
        entities: list[str],
        seconds: list[int],
        nanos: list[int],
        blobs: list[bytes],
        scored: BatchScores | None,
    ) -> FeedRows:
        n = len(record_ids)
        if scored is None:
            return cls(record_ids, entities, seconds, nanos, blobs, [""] * n, [""] * n, [None] * n,
                       [False] * n, [""] * n)  # fmt: skip
        names = np.array([*(m.model_id for m in scored.models), ""], dtype=object)
        versions = np.array([*(m.version for m in scored.models), ""], dtype=object)
        scores: list[float | None] = scored.score.tolist()
        if (scored.model < 0).any():
            scores = [None if m < 0 else s for m, s in zip(scored.model.tolist(), scores, strict=True)]
        return cls(
            record_ids,
            entities,
            seconds,
            nanos,
            blobs,
            names[scored.model].tolist(),
            versions[scored.model].tolist(),
            scores,
            scored.anomalous.tolist(),
            scored.explanation,
        )

    def take(self, rows: list[int]) -> FeedRows:
        columns = (getattr(self, f.name) for f in dataclasses.fields(self))
        return FeedRows(*([column[i] for i in rows] for column in columns))


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


def _answer_scores(
    answer: _Answer, wanted: AnswerScores, feed_id: str, rows: FeedRows, first_id: int
) -> None:
    """Append the scores ``wanted`` of stored rows (ids from ``first_id`` on) to ``answer``."""
    if wanted in (feed_service_pb2.ANSWER_SCORES_UNSPECIFIED, feed_service_pb2.ANSWER_SCORES_ALL):
        answer.MergeFromString(_encoded_scores(feed_id, rows, first_id, None))
    elif wanted == feed_service_pb2.ANSWER_SCORES_ANOMALOUS and any(rows.anomalous):
        answer.MergeFromString(_encoded_scores(feed_id, rows, first_id, rows.anomalous))


def _merge(answer: _Answer, encoded: bytes) -> None:
    answer.MergeFromString(encoded)


class _Halted(RuntimeError):
    """A batch not scored or stored: an earlier batch of its stream failed, or its call ended."""

    def __init__(self) -> None:
        super().__init__("an earlier batch of the stream failed, or the call ended")


def _chain(
    loop: asyncio.AbstractEventLoop,
    done: asyncio.Future[Any],
    stages: Sequence[tuple[Executor, Callable[[Any], Any]]],
    halted: threading.Event,
) -> None:
    """Run ``stages`` one after the other, each on its executor, each given the one before's result
    (the first None); the last one's result, or the first error, goes to ``done`` on ``loop``. A
    stage that fails sets ``halted``, which stages look at before they score or store."""

    def settle(result: Any, error: BaseException | None) -> None:
        def put() -> None:
            if done.done():  # the call was cancelled meanwhile
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            loop.call_soon_threadsafe(put)

    def run(i: int, value: Any) -> None:
        try:
            value = stages[i][1](value)
            if i + 1 < len(stages):
                stages[i + 1][0].submit(run, i + 1, value)  # RuntimeError once shut down
                return
        except BaseException as exc:
            halted.set()
            settle(None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        settle(value, None)

    try:
        stages[0][0].submit(run, 0, None)
    except RuntimeError as exc:
        done.set_exception(exc)


def _call_each(calls: Sequence[Callable[[], None]]) -> None:
    for call in calls:
        call()


# The field number of the scores in every ingest answer.
_SCORES_FIELD = 3
assert {
    answer.DESCRIPTOR.fields_by_name["scores"].number
    for answer in (
        feed_service_pb2.SubmitTransactionsResponse, feed_service_pb2.StreamTransactionsResponse,
        feed_service_pb2.SubmitTicksResponse, feed_service_pb2.StreamTicksResponse,
    )
} == {_SCORES_FIELD}  # fmt: skip


def _encoded_scores(feed_id: str, rows: FeedRows, first_id: int, only: Sequence[bool] | None) -> bytes:
    """The FeedScores of stored rows (ids from ``first_id`` on), those where ``only`` is true when
    given, as entries of an ingest answer's ``scores`` (``feed_wire.encode_scores``)."""
    n = len(rows.record_ids)
    pick = np.ones(n, dtype=bool) if only is None else np.fromiter(only, bool, n)
    take: Callable[[list[Any]], list[Any]] = (
        (lambda column: column) if only is None else (lambda column: list(itertools.compress(column, pick)))
    )
    model_ids, versions = take(rows.model_ids), take(rows.model_versions)
    # Each row's index into the batch's distinct models (-1: not scored).
    refs: dict[tuple[str, str], int] = {}
    one = all(column.count(column[0]) == len(column) for column in (model_ids, versions) if column)
    if one:
        model = np.full(len(model_ids), 0 if model_ids and model_ids[0] else -1, dtype=np.int64)
        if model_ids and model_ids[0]:
            refs[model_ids[0], versions[0]] = 0
    else:
        keys = zip(model_ids, versions, strict=True)
        model = np.fromiter(
            (refs.setdefault(key, len(refs)) if key[0] else -1 for key in keys), np.int64, len(model_ids)
        )
    encoded = [model_pb2.ModelRef(model_id=m, version=v).SerializeToString() for m, v in refs]
    scores = take(rows.scores)
    if None in scores:
        scores = [math.nan if score is None else score for score in scores]
    return encode_scores(
        _SCORES_FIELD,
        feed_id,
        np.flatnonzero(pick) + first_id,
        take(rows.record_ids),
        take(rows.entities),
        np.asarray(take(rows.seconds), dtype=np.int64),
        np.asarray(take(rows.nanos), dtype=np.int64),
        encoded,
        model,
        np.asarray(scores, dtype=np.float64),
        np.asarray(take(rows.anomalous), dtype=bool),
        take(rows.explanations),
    )


_INSERT_COLUMNS = (
    "id, feed_id, kind, record_id, entity, time_ns, received_ns, model_id, model_version, score, anomalous,"
    " explanation, record_pb, prev_id"
)
# A batch in one statement: its rows as one JSON array, its serialised records as one blob cut
# by offsets. Binding rows one by one (executemany) held the GIL ~2.3 us a row and gave it up
# around every row's step; here Python builds two values and SQLite does the rest without it.
_ITEM = "json_extract(r.value, '$[{}]')".format
_INSERT_JSON = (
    f"INSERT INTO feed_records ({_INSERT_COLUMNS}) SELECT :first + r.key, :feed, :kind, {_ITEM(0)},"
    f" {_ITEM(1)}, {_ITEM(2)}, :received, {{model}}, {_ITEM(3)}, {_ITEM(4)}, {_ITEM(5)},"
    f" ifnull(substr(:blob, {_ITEM(6)}, {_ITEM(7)}), x''), {{prev}} FROM json_each(:rows) AS r"
)
# A tick's link to its symbol's previous record in the feed (recent_ticks walks back along them;
# an index on (feed, entity) took each batch's rows in as many places as it had symbols): the
# batch's row before it (its position in the batch, -1 for none, is in the rows), else the
# symbol's latest stored record.
_PREV_TICK = (
    f"CASE WHEN {_ITEM(8)} >= 0 THEN :batch + {_ITEM(8)} ELSE"
    f" (SELECT last_id FROM feed_symbols WHERE feed_id = :feed AND entity = {_ITEM(1)}) END"
)
_INSERTS: dict[tuple[bool, int], str] = {
    (one_model, kind): _INSERT_JSON.format(
        model=":model, :version"
        if one_model
        else f"{_ITEM(8 + (kind == TICKS))}, {_ITEM(9 + (kind == TICKS))}",
        prev=_PREV_TICK if kind == TICKS else "NULL",
    )
    for one_model in (True, False)
    for kind in (TRANSACTIONS, TICKS)
}
_INSERT_ROWS = f"INSERT INTO feed_records ({_INSERT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
# The symbols' latest times and records: [[symbol, time, id], ...].
_SYMBOL_UPDATE = (
    " ON CONFLICT (feed_id, entity) DO UPDATE SET latest_ns = max(latest_ns, excluded.latest_ns),"
    " last_id = excluded.last_id"
)
_NOTE_SYMBOLS = (
    f"INSERT INTO feed_symbols (feed_id, entity, latest_ns, last_id) SELECT ?1, {_ITEM(0)}, {_ITEM(1)},"
    f" {_ITEM(2)} FROM json_each(?2) AS r WHERE 1{_SYMBOL_UPDATE}"
)
_NOTE_SYMBOL = (
    f"INSERT INTO feed_symbols (feed_id, entity, latest_ns, last_id) VALUES (?, ?, ?, ?){_SYMBOL_UPDATE}"
)
_NOTE_TOTALS = (
    "INSERT INTO feed_totals (feed_id, kind, records, latest_ns) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (feed_id, kind) DO UPDATE SET records = records + excluded.records,"
    " latest_ns = max(latest_ns, excluded.latest_ns)"
)


# Bytes of serialised records one statement carries (at least one record): its JSON text stays
# a small multiple of that, both far under SQLite's limit on one value (1e9 bytes), which a whole
# batch of 100,000 records with long names can pass.
_STATEMENT_BYTES = 32 << 20
_TEXT_LIMIT = 256 << 20


def _insert_records(
    conn: sqlite3.Connection,
    feed_id: str,
    kind: int,
    now_ns: int,
    rows: FeedRows,
    time_ns: list[int],
    first: int,
) -> None:
    """Insert a feed's rows of one batch, in order, with ids from ``first`` on."""
    lengths = np.fromiter(map(len, rows.blobs), np.int64, len(rows.blobs))
    ends = np.cumsum(lengths)
    cuts = [0, len(lengths)]
    if ends[-1] > _STATEMENT_BYTES:
        within = np.searchsorted(ends, np.arange(_STATEMENT_BYTES, ends[-1], _STATEMENT_BYTES), side="right")
        cuts = sorted({0, *within.tolist(), len(lengths)})
    columns: list[list[Any]] = [rows.record_ids, rows.entities, time_ns, rows.scores, rows.anomalous,
                                rows.explanations, lengths.tolist(), rows.model_ids, rows.model_versions,
                                rows.blobs]  # fmt: skip
    if kind == TICKS:
        # Where in the batch each tick's symbol had its tick before (-1: nowhere), and each
        # symbol's last position.
        latest: dict[str, int] = {}
        columns.insert(7, _positions(rows.entities, latest))
    for a, b in itertools.pairwise(cuts):
        part = columns if (a, b) == (0, len(lengths)) else [column[a:b] for column in columns]
        _insert_part(conn, (feed_id, kind, now_ns, first, a), part)
    if kind == TICKS:
        noted = [(entity, time_ns[i], first + i) for entity, i in latest.items()]
        try:
            text = orjson.dumps(noted)
        except orjson.JSONEncodeError:  # a string that is not UTF-8
            text = b"\\u0000"
        if b"\\u0000" in text:  # as in _insert_part
            conn.executemany(_NOTE_SYMBOL, [(feed_id, *symbol) for symbol in noted])
        else:
            conn.execute(_NOTE_SYMBOLS, (feed_id, text.decode()))
    conn.execute(_NOTE_TOTALS, (feed_id, kind, len(lengths), max(time_ns)))


def _positions(entities: Sequence[str], latest: dict[str, int]) -> list[int]:
    """Each entity's previous position in ``entities`` (-1: none); ``latest`` gets the last ones."""
    out: list[int] = []
    put = out.append
    last = latest.get
    for i, entity in enumerate(entities):
        put(last(entity, -1))
        latest[entity] = i
    return out


def _insert_part(
    conn: sqlite3.Connection, batch: tuple[str, int, int, int, int], columns: list[list[Any]]
) -> None:
    """One statement's rows: ``_insert_records``' columns; ``batch`` is (feed, kind, received, the
    batch's first id, the part's first position in the batch)."""
    *values, model_ids, versions, blobs = columns
    sizes = np.asarray(values[6], dtype=np.int64)
    values.insert(6, (np.cumsum(sizes) - sizes + 1).tolist())  # each record's offset in the blob
    one_model = all(column.count(column[0]) == len(column) for column in (model_ids, versions))
    if not one_model:
        values += [model_ids, versions]
    scores = values[3]
    numbers = np.asarray([0.0 if v is None else v for v in scores] if None in scores else scores, np.float64)
    text: bytes | None = None
    if np.isfinite(numbers).all():  # JSON has no NaN or infinity (orjson writes null)
        try:
            # orjson: ~0.1 us a row, the json module ~1.5 (the collector's GIL held either way).
            text = orjson.dumps(list(zip(*values, strict=True)))
        except orjson.JSONEncodeError:  # an integer over 64 bits, a string that is not UTF-8
            text = None
    feed_id, kind, now_ns, batch_first, offset = batch
    first = batch_first + offset
    # SQLite's JSON functions end a string at an escaped NUL.
    if text is None or b"\\u0000" in text or len(text) > _TEXT_LIMIT:
        record_ids, entities, time_ns, scores, anomalous, explanations = values[:6]
        same = itertools.repeat
        conn.executemany(
            _INSERT_ROWS,
            zip(itertools.count(first), same(feed_id), same(kind), record_ids, entities, time_ns,
                same(now_ns), model_ids, versions, scores, anomalous, explanations, blobs,
                _previous(conn, feed_id, entities, values[8], batch_first) if kind == TICKS else same(None),
                strict=False),
        )  # fmt: skip
    else:  # the JSON as text: SQLite would take bytes for a BLOB
        conn.execute(
            _INSERTS[one_model, kind],
            {"first": first, "batch": batch_first, "feed": feed_id, "kind": kind, "received": now_ns,
             "rows": text.decode(), "blob": b"".join(blobs), "model": model_ids[0], "version": versions[0]},
        )  # fmt: skip


def _previous(
    conn: sqlite3.Connection, feed_id: str, entities: Sequence[str], before: Sequence[int], first: int
) -> list[int | None]:
    """``_PREV_TICK`` row by row, for rows at positions ``before`` in a batch whose ids start at
    ``first``."""
    stored: dict[str, int | None] = {}
    out: list[int | None] = []
    for entity, position in zip(entities, before, strict=True):
        if position >= 0:
            out.append(first + position)
            continue
        if entity not in stored:
            row = conn.execute(
                "SELECT last_id FROM feed_symbols WHERE feed_id = ? AND entity = ?", (feed_id, entity)
            ).fetchone()
            stored[entity] = row[0] if row else None
        out.append(stored[entity])
    return out


# A symbol's records from record ?1 back along their links, newest first, as the walk goes (SQLite
# yields a recursive CTE's rows as it makes them; one a step: the order is the walk's). A record
# of another feed, kind or symbol, or a link that does not go back, ends it (rows deleted, their
# ids taken again).
_WALK_BACK = (
    "WITH RECURSIVE chain(id, prev, blob) AS (SELECT id, prev_id, record_pb FROM feed_records"
    " WHERE id = ?1 AND feed_id = ?2 AND kind = ?3 AND entity = ?4"
    " UNION ALL SELECT f.id, f.prev_id, f.record_pb FROM chain JOIN feed_records AS f"
    " ON f.id = chain.prev AND f.feed_id = ?2 AND f.kind = ?3 AND f.entity = ?4 WHERE chain.prev < chain.id)"
    " SELECT blob FROM chain"
)


class FeedStore:
    """Feed records and rejects in the collector's database."""

    def __init__(
        self,
        store: VerdictStore,
        on_store: Callable[[sqlite3.Connection, list[feed_service_pb2.FeedScore], int], list[int]]
        | None = None,
        wants_scores: Callable[[], bool] | None = None,
    ) -> None:
        self._store = store
        # Alert rules over feed scores, run inside the transaction that stores them, and whether
        # they look at them at all right now (rules come and go with SIGHUP).
        self._on_store = on_store
        self._wants_scores = wants_scores or (lambda: on_store is not None)
        # (feed, symbol) -> latest accepted tick time, loaded per feed on first use.
        self._last_tick: dict[tuple[str, str], int] = {}
        self._loaded: set[str] = set()
        self._lock = threading.Lock()

    def wants_scores(self) -> bool:
        """Whether alert rules look at feed scores now (they come and go with SIGHUP)."""
        return self._on_store is not None and self._wants_scores()

    def last_tick_ns(self, feed_id: str, symbol: str) -> int | None:
        with self._lock:
            if feed_id not in self._loaded:
                rows = self._store.reader().execute(
                    "SELECT entity, latest_ns FROM feed_symbols WHERE feed_id = ?", (feed_id,)
                )
                for entity, latest in rows:
                    key = (feed_id, entity)
                    self._last_tick[key] = max(int(latest), self._last_tick.get(key, int(latest)))
                self._loaded.add(feed_id)
            return self._last_tick.get((feed_id, symbol))

    def note_ticks(self, feed_ids: Sequence[str], symbols: Sequence[str], time_ns: Sequence[int]) -> None:
        """Accepted ticks, before they are stored: the symbols' latest times for the batches that
        are checked meanwhile."""
        self._note_latest(zip(feed_ids, symbols, strict=True), time_ns)

    def _note_latest(self, keys: Iterable[tuple[str, str]], time_ns: Iterable[int]) -> None:
        """Accepted ticks' (feed, symbol) and times, in the order accepted."""
        # Times increase within a symbol's accepted ticks: the last of each is its latest.
        latest = dict(zip(keys, time_ns, strict=True))
        with self._lock:
            last = self._last_tick
            for key, t in latest.items():
                if t > last.get(key, t - 1):
                    last[key] = t

    def forget_ticks(self, feed_ids: Sequence[str]) -> None:
        """Drop the feeds' latest tick times (reloaded from the store on next use): after a batch
        noted by ``note_ticks`` failed to be stored."""
        with self._lock:
            for feed_id in set(feed_ids):
                self._loaded.discard(feed_id)
                for key in [k for k in self._last_tick if k[0] == feed_id]:
                    del self._last_tick[key]

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
        trades of whole trade bars, the open one included), oldest first; one chunk a symbol. Each
        symbol's records are walked back from its latest along their links (``prev_id``)."""
        conn = self._store.reader()
        latest = conn.execute(
            "SELECT entity, last_id FROM feed_symbols WHERE feed_id = ? ORDER BY entity", (feed_id,)
        ).fetchall()
        from auris.collector.feed_features import trade_bar_start_ns

        for symbol, last_id in latest:
            ticks: list[feed_service_pb2.Tick] = []
            seen = 0
            last_bucket: int | None = None
            rows = conn.execute(_WALK_BACK, (last_id, feed_id, TICKS, symbol))
            for (blob,) in rows:  # read as walked: a trade feed stops many records short of its start
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
        transaction; return the stored scores and the ids of alerts they changed. Accepted ticks'
        times increase within each symbol (``validate_tick``)."""
        rows = FeedRows(
            [r[0] for r in records],
            [r[1] for r in records],
            [r[2] // 1_000_000_000 for r in records],
            [r[2] % 1_000_000_000 for r in records],
            [r[3] for r in records],
            [r[4].model_id if r[4] else "" for r in records],
            [r[4].model_version if r[4] else "" for r in records],
            [r[4].score if r[4] else None for r in records],
            [bool(r[4] and r[4].anomalous) for r in records],
            [r[4].explanation if r[4] else "" for r in records],
        )
        answer = feed_service_pb2.StreamTransactionsResponse()
        alert_ids, _ = self.add_rows(feed_id, kind, rows, rejects, now_ns, answer)
        if kind == TICKS:
            self.note_ticks([feed_id] * len(records), rows.entities, [r[2] for r in records])
        return list(answer.scores), alert_ids

    def add_rows(
        self,
        feed_id: str,
        kind: int,
        rows: FeedRows,
        rejects: Sequence[feed_service_pb2.RejectedRecord],
        now_ns: int,
        answer: _Answer,
        wanted: AnswerScores = feed_service_pb2.ANSWER_SCORES_ALL,
        publish: bool = False,
        later: list[Callable[[], None]] | None = None,
    ) -> tuple[list[int], list[feed_service_pb2.FeedScore]]:
        """Store a feed's accepted records and rejects of one batch in one transaction; append the
        stored scores that ``wanted`` asks for to ``answer``'s scores. Returns the ids of alerts the
        scores changed, and every stored score when ``publish`` (else none). Accepted ticks' times
        are the caller's to note (``note_ticks``).

        With ``later``, what appends the scores to the answer is put there, to be called after the
        transaction (on another thread: the writer's time is the pipeline's)."""
        alert_ids: list[int] = []
        n = len(rows.record_ids)
        time_ns = [s * 1_000_000_000 + ns for s, ns in zip(rows.seconds, rows.nanos, strict=True)]
        answer_all = wanted in (
            feed_service_pb2.ANSWER_SCORES_UNSPECIFIED,
            feed_service_pb2.ANSWER_SCORES_ALL,
        )
        # Every score is built here when subscribers or alert rules want them all.
        build_all = n > 0 and (publish or self.wants_scores())
        built: Sequence[feed_service_pb2.FeedScore] = []
        with self._store.writing() as conn:
            if n:
                first = conn.execute("SELECT ifnull(MAX(id), 0) + 1 FROM feed_records").fetchone()[0]
                _insert_records(conn, feed_id, kind, now_ns, rows, time_ns, first)
                fill = functools.partial(_answer_scores, answer, wanted, feed_id, rows, first)
                if build_all:
                    encoded = _encoded_scores(feed_id, rows, first, None)
                    holder = feed_service_pb2.StreamTicksResponse()
                    holder.MergeFromString(encoded)
                    built = holder.scores
                    if answer_all:
                        fill = functools.partial(_merge, answer, encoded)
                # The answer is filled in the same place whatever else wants the scores: the feeds
                # of a batch keep their order in it.
                if later is None:
                    fill()
                else:
                    later.append(fill)
            if rejects:
                conn.executemany(
                    "INSERT INTO feed_rejects (feed_id, received_ns, record_index, record_id, reason)"
                    " VALUES (?,?,?,?,?)",
                    [(feed_id, now_ns, r.index, r.record_id, r.reason) for r in rejects],
                )
            if self._on_store is not None and build_all:
                alert_ids = self._on_store(conn, list(built), now_ns)
        return alert_ids, list(built) if publish else []

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
            "SELECT feed_id, kind, records, latest_ns FROM feed_totals ORDER BY feed_id, kind"
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


# Batches of one client stream in hand at a time (being prepared, waiting, being stored).
_READ_AHEAD = 2


@dataclasses.dataclass
class _Prepared:
    """A batch read into columns and checked, waiting to be scored and stored."""

    kind: int
    batch: Sequence[Any]
    # The accepted records' columns (for ticks: all the batch's until scoring checks the order).
    columns: TransactionColumns | TickColumns
    blobs: list[bytes]
    rejects: list[feed_service_pb2.RejectedRecord]
    # Ticks: the first time of each (feed, symbol), or None when ticks must be checked one by one.
    firsts: dict[tuple[str, str], int] | None = None


@dataclasses.dataclass
class _Scored:
    """A batch scored, waiting to be stored."""

    kind: int
    batch: Sequence[Any]
    feed_ids: list[str]
    rows: FeedRows
    rejects: list[feed_service_pb2.RejectedRecord]


class FeedRequest:
    """An ingest request as received: its bytes, which ``feed_wire`` reads into columns without a
    Python object per field, and the message protobuf parsed from them (whether the request is
    well-formed is protobuf's call, and records checked one by one are read from it). ``raw`` is
    empty for a request made in this process."""

    __slots__ = ("message", "raw")

    def __init__(self, raw: bytes, message: Any) -> None:
        self.raw = raw
        self.message = message

    @classmethod
    def parser(cls, message_type: Any) -> Callable[[bytes], FeedRequest]:
        """The deserializer of RPCs taking ``message_type`` (DecodeError when protobuf cannot parse
        the bytes); Submit* and Stream* requests of a kind have the same fields."""
        return lambda raw: cls(raw, message_type.FromString(raw))


def add_feed_service(servicer: FeedServicer, server: grpc.aio.Server) -> None:
    """Serve ``servicer`` on ``server`` (as the generated ``add_FeedServiceServicer_to_server``),
    the ingest RPCs' requests as ``FeedRequest``."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    class Collect:
        def add_generic_rpc_handlers(self, _: object) -> None:
            pass

        def add_registered_method_handlers(self, _: str, methods: dict[str, Any]) -> None:
            handlers.update(methods)

    feed_service_pb2_grpc.add_FeedServiceServicer_to_server(servicer, Collect())  # type: ignore[arg-type]
    ticks = FeedRequest.parser(feed_service_pb2.StreamTicksRequest)
    transactions = FeedRequest.parser(feed_service_pb2.StreamTransactionsRequest)
    for method, parse, streams in (
        ("SubmitTicks", ticks, False),
        ("StreamTicks", ticks, True),
        ("SubmitTransactions", transactions, False),
        ("StreamTransactions", transactions, True),
    ):
        handler = grpc.stream_stream_rpc_method_handler if streams else grpc.unary_unary_rpc_method_handler
        answer = getattr(feed_service_pb2, method + "Response")
        handlers[method] = handler(
            getattr(servicer, method),
            request_deserializer=parse,
            response_serializer=answer.SerializeToString,
        )
    name = feed_service_pb2.DESCRIPTOR.services_by_name["FeedService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    # As the generated code does: gRPC's stubs do not know this method yet.
    server.add_registered_method_handlers(name, handlers)  # type: ignore[attr-defined]


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
        preparer: ThreadPoolExecutor | None = None,
        scorer: ThreadPoolExecutor | None = None,
        answerer: ThreadPoolExecutor | None = None,
    ) -> None:
        self._alerts_changed = alerts_changed
        self._feeds = feeds
        # Writer, preparer, scorer and answerer have one thread each: a stream's batches keep their
        # order through every stage because each stage's thread takes them as handed over (_chain).
        self._writer = writer
        # Reads and validates batches while the writer scores and stores earlier ones.
        self._preparer = preparer or writer
        # Scores batches while the writer stores the one before (onnxruntime releases the GIL).
        self._scorer = scorer or writer
        # Fills answers with scores once stored (off the event loop: ~1 us a score).
        self._answerer = answerer or self._preparer
        self._readers = readers
        self._broker = broker
        self._hash_key = hash_key
        self._score_transactions = score_transactions
        self._score_ticks = score_ticks
        self._default_page = default_page
        self._max_page = max_page
        # One batch at a time through scoring (scoring state and tick order are per feed), and one
        # through storing (record ids, rejects, alerts): a batch may be stored while the next one
        # is scored.
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()

    def _hashed(self, batch: Sequence[feed_service_pb2.Transaction]) -> list[feed_service_pb2.Transaction]:
        """Copies of the records with their customer and terminal ids hashed (the request stays as
        it came)."""
        assert self._hash_key is not None
        key = self._hash_key
        hashes: dict[str, str] = {}
        out = []
        for original in batch:
            tx = feed_service_pb2.Transaction()
            tx.CopyFrom(original)
            for name in ("customer_id", "terminal_id"):
                raw = getattr(tx, name)
                hashed = hashes.get(raw)
                if hashed is None:
                    hashed = hashes[raw] = hash_identifier(key, raw)
                setattr(tx, name, hashed)
            out.append(tx)
        return out

    def _prepare_transactions(self, request: FeedRequest, names: Sequence[str] = ()) -> _Prepared:
        batch: Sequence[feed_service_pb2.Transaction] = request.message.transactions
        decoded = None
        if request.raw and self._hash_key is None and (not names or tuple(names) == ULB_VALUE_NAMES):
            decoded = decode_transactions(request.raw, len(names))
        if decoded is None:
            records = self._hashed(batch) if self._hash_key is not None else batch
            blobs = [tx.SerializeToString() for tx in records]
            columns = TransactionColumns.of(records, blobs, names)
            valued = [bool(tx.feature_values and not tx.feature_names) for tx in records] if names else []
        else:  # each record's bytes as the request carries them
            records = batch
            raw = request.raw
            blobs = [raw[a:b] for a, b in zip(decoded.starts.tolist(), decoded.ends.tolist(), strict=True)]
            columns = TransactionColumns.decoded(decoded)
            valued = np.isin(np.arange(len(blobs)), decoded.valued).tolist() if names else []
        rejects: list[feed_service_pb2.RejectedRecord] = []
        for index in transaction_suspects(columns):
            tx = records[index]
            reason = validate_transaction(tx, names)
            if reason is not None:
                rejects.append(
                    feed_service_pb2.RejectedRecord(index=index, reason=reason, record_id=tx.transaction_id)
                )
        if rejects:
            keep = _kept(len(records), rejects)
            columns = columns.take(np.asarray(keep, dtype=np.intp))
            blobs = [blobs[i] for i in keep]
            valued = [valued[i] for i in keep] if names else []
        if names:
            # A stored record is whole: the request's names go with the values they name.
            suffix = _names_field(names)
            blobs = [blob + suffix if named else blob for blob, named in zip(blobs, valued, strict=True)]
        return _Prepared(TRANSACTIONS, batch, columns, blobs, rejects)

    def _prepare_ticks(self, request: FeedRequest) -> _Prepared:
        batch = request.message.ticks
        decoded = decode_ticks(request.raw) if request.raw else None
        columns = TickColumns.of(batch) if decoded is None else TickColumns.decoded(decoded)
        firsts = tick_firsts(columns)
        blobs: list[bytes] = []
        if firsts is None:
            pass  # the ticks are checked one by one, then serialised (``_score_batch``)
        elif decoded is None:
            blobs = [tick.SerializeToString() for tick in batch]
        else:  # each tick's bytes as the request carries them
            raw = request.raw
            blobs = [raw[a:b] for a, b in zip(decoded.starts.tolist(), decoded.ends.tolist(), strict=True)]
        return _Prepared(TICKS, batch, columns, blobs, [], firsts)

    def _check_ticks(self, batch: Sequence[feed_service_pb2.Tick]) -> list[feed_service_pb2.RejectedRecord]:
        """Each tick of a batch against ``validate_tick``, in order (an accepted tick's time is its
        symbol's latest from then on)."""
        rejects: list[feed_service_pb2.RejectedRecord] = []
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
                latest[key] = _ns(tick.time)
        return rejects

    def _score_batch(self, prepared: _Prepared) -> _Scored:
        """Check a prepared batch's tick order and score it. Batches come here one at a time, in
        the order they arrived."""
        batch, columns, blobs, rejects = prepared.batch, prepared.columns, prepared.blobs, prepared.rejects
        if prepared.kind == TICKS:
            # Tick order is checked against the symbols' latest accepted times here, where batches
            # come one after the other; a batch not known clean is checked tick by tick.
            last_ns = self._feeds.last_tick_ns
            firsts = prepared.firsts
            if firsts is None or any(
                (last := last_ns(*key)) is not None and start <= last for key, start in firsts.items()
            ):
                rejects = self._check_ticks(batch)
                keep = _kept(len(batch), rejects)
                columns = columns.take(np.asarray(keep, dtype=np.intp))
                blobs = [batch[i].SerializeToString() for i in keep]
        if prepared.kind == TRANSACTIONS:
            assert isinstance(columns, TransactionColumns)
            scored = self._score_transactions(columns) if self._score_transactions and blobs else None
            record_ids, entities = columns.transaction_ids, columns.customers
        else:
            assert isinstance(columns, TickColumns)
            time_ns = columns.time_ns.tolist()
            self._feeds.note_ticks(columns.feed_ids, columns.symbols, time_ns)
            scored = self._score_ticks(columns) if self._score_ticks and blobs else None
            record_ids = [f"{symbol}@{t}" for symbol, t in zip(columns.symbols, time_ns, strict=True)]
            entities = columns.symbols
        rows = FeedRows.of(
            record_ids, entities, columns.seconds.tolist(), columns.nanos.tolist(), blobs, scored
        )
        return _Scored(prepared.kind, batch, columns.feed_ids, rows, rejects)

    def _store_batch(
        self,
        scored: _Scored,
        answer: _Answer,
        wanted: AnswerScores,
        later: list[Callable[[], None]],
        halted: threading.Event | None = None,
    ) -> tuple[list[int], list[feed_service_pb2.FeedScore]]:
        """Store a scored batch and fill the answer but its scores (what adds the ones ``wanted``
        goes to ``later``); the ids of alerts changed, and the scores to publish. Batches come here
        in the order they were scored; none once ``halted`` is set (the ticks' times it noted while
        scored are forgotten, as when storing fails)."""
        try:
            if halted is not None and halted.is_set():
                raise _Halted()
            return self._store(
                scored.kind, scored.batch, scored.feed_ids, scored.rows, scored.rejects, answer, wanted, later
            )
        except BaseException:
            if scored.kind == TICKS:
                self._feeds.forget_ticks(scored.feed_ids)
            raise

    def _store(
        self,
        kind: int,
        batch: Sequence[Any],
        feed_ids: list[str],
        rows: FeedRows,
        rejects: list[feed_service_pb2.RejectedRecord],
        answer: _Answer,
        wanted: AnswerScores,
        later: list[Callable[[], None]],
    ) -> tuple[list[int], list[feed_service_pb2.FeedScore]]:
        """Store the accepted rows (per feed) and the rejects, fill the answer but its scores (what
        adds them goes to ``later``); the ids of alerts changed and the scores to publish."""
        parts: dict[str, FeedRows] = {}
        if feed_ids and feed_ids.count(feed_ids[0]) == len(feed_ids):
            parts[feed_ids[0]] = rows
        else:
            groups: dict[str, list[int]] = {}
            for i, feed_id in enumerate(feed_ids):
                groups.setdefault(feed_id, []).append(i)
            parts = {feed_id: rows.take(members) for feed_id, members in groups.items()}
        # Each reject is kept under the feed its record named.
        rejected: dict[str, list[feed_service_pb2.RejectedRecord]] = {}
        for reject in rejects:
            rejected.setdefault(batch[reject.index].feed_id, []).append(reject)
        now = time.time_ns()
        alert_ids: list[int] = []
        published: list[feed_service_pb2.FeedScore] = []
        publish = self._broker.active
        for feed_id in dict.fromkeys([*parts, *rejected]):
            changed, stored = self._feeds.add_rows(
                feed_id, kind, parts.get(feed_id) or rows.take([]), rejected.get(feed_id, []), now,
                answer, wanted, publish, later,
            )  # fmt: skip
            alert_ids += changed
            published += stored
        answer.accepted = len(rows.record_ids)
        answer.rejected.extend(rejects)
        return alert_ids, published

    async def _accept(
        self,
        kind: int,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        answer: _AnswerT,
        halted: threading.Event | None = None,
    ) -> _AnswerT:
        """Prepare a batch (on the preparing thread), score it (on the scoring thread), store it (on
        the writer thread), fill the answer's scores (on the answering thread: the writer goes on
        to the next batch meanwhile), then publish its scores. Each stage hands the batch to the
        next itself, and only the last one wakes the event loop (a hop through it per stage cost
        its thread ~0.6 us a bar). One thread a stage, taking
        batches in the order they came: a stream's batches go through each stage in order.

        ``halted`` (one per stream) is set when a batch fails or the call ends: the stream's
        batches behind it are then neither scored nor stored, as its client resends from the failed
        one (a tick stored after it would refuse the resent ticks' times)."""
        loop = asyncio.get_running_loop()
        received = request if isinstance(request, FeedRequest) else FeedRequest(b"", request)
        message = received.message
        prepare: Callable[[], _Prepared]
        if kind == TRANSACTIONS:
            records = message.transactions
            names = list(message.feature_names)
            prepare = functools.partial(self._prepare_transactions, received, names)
        else:
            records = message.ticks
            prepare = functools.partial(self._prepare_ticks, received)
        wanted = message.answer_scores
        if len(records) > MAX_BATCH:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"more than {MAX_BATCH} records in one request"
            )
        later: list[Callable[[], None]] = []
        stop = halted or threading.Event()

        def score(prepared: _Prepared) -> _Scored:
            if stop.is_set():
                raise _Halted()
            with self._lock:
                return self._score_batch(prepared)

        def store(scored: _Scored) -> tuple[list[int], list[feed_service_pb2.FeedScore]]:
            with self._store_lock:
                return self._store_batch(scored, answer, wanted, later, stop)

        def fill(stored: tuple[list[int], list[feed_service_pb2.FeedScore]]) -> Any:
            _call_each(later)
            return stored

        done: asyncio.Future[tuple[list[int], list[feed_service_pb2.FeedScore]]] = loop.create_future()
        stages: list[tuple[Executor, Callable[[Any], Any]]] = [
            (self._preparer, lambda _: prepare()),
            (self._scorer, score),
            (self._writer, store),
            (self._answerer, fill),
        ]
        _chain(loop, done, stages, stop)
        try:
            alert_ids, published = await done
        except asyncio.CancelledError:
            stop.set()
            raise
        if alert_ids and self._alerts_changed is not None:
            await self._alerts_changed(alert_ids)
        if published:
            self._broker.publish(published)
        if answer.rejected:
            logger.info(
                "feed batch: %d accepted, %d rejected (first: %s)",
                answer.accepted,
                len(answer.rejected),
                answer.rejected[0].reason,
            )
        return answer

    async def _stream(
        self,
        kind: int,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        answer_type: type[_AnswerT],
    ) -> AsyncIterator[_AnswerT]:
        """Answers of a client stream, in order. Requests are read ahead (up to ``_READ_AHEAD``
        batches in hand) so that the next batch is prepared while the one before is scored and
        stored: onnxruntime and SQLite release the GIL, the preparing thread uses it meanwhile. An
        answer goes out as soon as its batch is stored, whether or not more requests came."""
        queue: asyncio.Queue[asyncio.Task[_AnswerT] | None] = asyncio.Queue(_READ_AHEAD)
        halted = threading.Event()  # a batch failed or the call ended: the later ones are not stored

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.ensure_future(self._accept(kind, request, context, answer_type(), halted))
                    try:
                        await queue.put(task)
                    except asyncio.CancelledError:  # the call ended while the queue was full
                        task.cancel()
                        raise
            finally:
                await queue.put(None)

        reader = asyncio.ensure_future(read())
        taken: asyncio.Task[_AnswerT] | None = None
        try:
            while (taken := await queue.get()) is not None:
                yield await taken
            await reader  # a failed read ends the call with its error
        finally:
            halted.set()
            reader.cancel()
            left = [taken] if taken is not None else []
            while not queue.empty():
                task = queue.get_nowait()
                if task is not None:
                    left.append(task)
            for task in left:
                task.cancel()
            await asyncio.gather(reader, *left, return_exceptions=True)

    async def SubmitTransactions(
        self,
        request: feed_service_pb2.SubmitTransactionsRequest | FeedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> feed_service_pb2.SubmitTransactionsResponse:
        return await self._accept(
            TRANSACTIONS, request, context, feed_service_pb2.SubmitTransactionsResponse()
        )

    async def StreamTransactions(
        self,
        request_iterator: AsyncIterator[feed_service_pb2.StreamTransactionsRequest | FeedRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[feed_service_pb2.StreamTransactionsResponse]:
        async for answer in self._stream(
            TRANSACTIONS, request_iterator, context, feed_service_pb2.StreamTransactionsResponse
        ):
            yield answer

    async def SubmitTicks(
        self,
        request: feed_service_pb2.SubmitTicksRequest | FeedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> feed_service_pb2.SubmitTicksResponse:
        return await self._accept(TICKS, request, context, feed_service_pb2.SubmitTicksResponse())

    async def StreamTicks(
        self,
        request_iterator: AsyncIterator[feed_service_pb2.StreamTicksRequest | FeedRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[feed_service_pb2.StreamTicksResponse]:
        async for answer in self._stream(
            TICKS, request_iterator, context, feed_service_pb2.StreamTicksResponse
        ):
            yield answer

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
