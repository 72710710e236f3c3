"""Feed records through ``feed_wire``: scores encoded with numpy parse to the messages that setting
each field through the protobuf API builds, and tick and transaction requests read with numpy give
the columns read from protobuf's messages (or are left to protobuf), whatever the rows or the
bytes; a transaction batch prepared from its bytes is the one prepared from protobuf's messages."""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from auris.agent.wire import varint
from auris.collector.broker import Broker
from auris.collector.feed_batch import ULB_VALUE_NAMES, TickColumns, TransactionColumns
from auris.collector.feed_wire import decode_ticks, decode_transactions
from auris.collector.feeds import FeedRequest, FeedRows, FeedServicer, FeedStore, _encoded_scores
from auris.collector.store import VerdictStore
from auris.v1 import feed_service_pb2

T = TypeVar("T")
_MODELS = [("", ""), ("tick-local-z", "2"), ("tx-ulb-gb", ""), ("modèle", "v" * 130)]


def _reference(feed_id: str, rows: FeedRows, first_id: int, only: Sequence[bool] | None) -> bytes:
    """The answer's scores set field by field (the collector's way before feed_wire)."""
    answer = feed_service_pb2.StreamTicksResponse()
    fields = zip(
        itertools.count(first_id), rows.record_ids, rows.entities, rows.seconds, rows.nanos, rows.model_ids,
        rows.model_versions, rows.scores, rows.anomalous, rows.explanations,
    )  # fmt: skip
    for row_id, record_id, entity, sec, nanos, model_id, version, score, anomalous, text in (
        fields if only is None else itertools.compress(fields, only)
    ):
        entry = answer.scores.add(
            id=row_id, feed_id=feed_id, record_id=record_id, entity=entity, anomalous=anomalous,
            explanation=text, score=math.nan if score is None else score,
        )  # fmt: skip
        entry.time.seconds = sec
        entry.time.nanos = nanos
        if model_id:
            entry.model.model_id = model_id
            entry.model.version = version
    return answer.SerializeToString()


@st.composite
def _rows(draw: st.DrawFn) -> tuple[str, FeedRows, int, list[bool] | None]:
    n = draw(st.integers(0, 40))

    def column(strategy: st.SearchStrategy[T]) -> list[T]:
        return draw(st.lists(strategy, min_size=n, max_size=n))

    models = column(st.sampled_from(_MODELS) if draw(st.booleans()) else st.just(_MODELS[1]))
    values = column(st.floats(allow_nan=True, allow_infinity=True))
    scores = [None if not model_id else score for (model_id, _), score in zip(models, values, strict=True)]
    rows = FeedRows(
        column(st.text(max_size=150)),
        column(st.text(max_size=20)),
        column(st.integers(-(1 << 63), (1 << 63) - 1)),
        column(st.integers(-(1 << 31), (1 << 31) - 1)),
        [b""] * n,
        [m for m, _ in models],
        [v for _, v in models],
        scores,
        column(st.booleans()),
        column(st.text(max_size=200) | st.just("")),
    )
    first_id = draw(st.integers(0, (1 << 63) - 1 - n))
    only = column(st.booleans()) if draw(st.booleans()) else None
    return draw(st.text(max_size=140)), rows, first_id, only


@settings(max_examples=300, deadline=None)
@given(_rows())
def test_encoded_scores_parse_to_the_messages_set_field_by_field(
    case: tuple[str, FeedRows, int, list[bool] | None],
) -> None:
    feed_id, rows, first_id, only = case
    answer = feed_service_pb2.StreamTicksResponse()
    answer.MergeFromString(_encoded_scores(feed_id, rows, first_id, only))
    assert answer.SerializeToString() == _reference(feed_id, rows, first_id, only)
    kept = len(rows.record_ids) if only is None else sum(only)
    assert [s.id for s in answer.scores] == [
        first_id + i for i in range(len(rows.record_ids)) if only is None or only[i]
    ]
    assert len(answer.scores) == kept


def test_encoded_scores_append_to_an_answer_with_scores_already() -> None:
    rows = FeedRows(["a@1", "b@2"], ["a", "b"], [1, 2], [0, 5], [b"", b""], ["m", "m"], ["1", "1"],
                    [0.5, 2.0], [False, True], ["", "z 4.0"])  # fmt: skip
    answer = feed_service_pb2.SubmitTicksResponse(accepted=2)
    answer.MergeFromString(_encoded_scores("f", rows, 10, None))
    answer.MergeFromString(_encoded_scores("g", rows, 20, [False, True]))
    assert [(s.feed_id, s.id, s.record_id, s.anomalous) for s in answer.scores] == [
        ("f", 10, "a@1", False), ("f", 11, "b@2", True), ("g", 21, "b@2", True),
    ]  # fmt: skip
    assert answer.scores[1].time.nanos == 5
    assert answer.scores[1].model.version == "1"
    assert answer.accepted == 2


def _same_columns(ours: TickColumns, protobufs: TickColumns) -> None:
    assert ours.feed_ids == protobufs.feed_ids
    assert ours.symbols == protobufs.symbols
    for name in ("seconds", "nanos", "is_bar", "open", "high", "low", "close", "volume", "price", "size"):
        a, b = getattr(ours, name), getattr(protobufs, name)
        assert a.dtype == b.dtype, name
        # Bit for bit: NaN payloads and the sign of zero included.
        assert a.tobytes() == b.tobytes(), name


_DOUBLES = ("price", "size", "open", "high", "low", "close", "volume")


@st.composite
def _ticks(draw: st.DrawFn) -> list[feed_service_pb2.Tick]:
    ticks = []
    for _ in range(draw(st.integers(0, 12))):
        tick = feed_service_pb2.Tick(
            feed_id=draw(st.text(max_size=70)), symbol=draw(st.text(max_size=70)), is_bar=draw(st.booleans())
        )
        if draw(st.booleans()):
            tick.time.seconds = draw(st.integers(-(1 << 63), (1 << 63) - 1))
            tick.time.nanos = draw(st.integers(-(1 << 31), (1 << 31) - 1))
        for name in _DOUBLES:
            if draw(st.booleans()):
                setattr(tick, name, draw(st.floats(allow_nan=True, allow_infinity=True)))
        ticks.append(tick)
    return ticks


@settings(max_examples=300, deadline=None)
@given(_ticks(), st.sampled_from(list(feed_service_pb2.AnswerScores.values())))
def test_decoded_ticks_are_the_columns_protobuf_reads(
    ticks: list[feed_service_pb2.Tick], answer: feed_service_pb2.AnswerScores.ValueType
) -> None:
    raw = feed_service_pb2.StreamTicksRequest(ticks=ticks, answer_scores=answer).SerializeToString()
    decoded = decode_ticks(raw)
    assert decoded is not None  # what protobuf writes is read without it
    assert decoded.answer_scores == answer
    _same_columns(TickColumns.decoded(decoded), TickColumns.of(ticks))
    spans = zip(decoded.starts.tolist(), decoded.ends.tolist(), strict=True)
    assert [raw[a:b] for a, b in spans] == [tick.SerializeToString() for tick in ticks]


def _field(number: int, wire: int, body: bytes) -> bytes:
    return varint(number << 3 | wire) + (varint(len(body)) + body if wire == 2 else body)


# Pieces of a Tick's encoding, right and wrong: fields in any order and any number of times, values
# of any width, unknown fields, wrong wire types, cut or overlong lengths.
_TICK_PIECES = st.one_of(
    st.builds(lambda n, s: _field(n, 2, s.encode()), st.integers(1, 2), st.text(max_size=140)),
    st.builds(lambda n, b: _field(n, 2, b), st.integers(1, 3), st.binary(max_size=12)),
    st.builds(lambda n, x: _field(n, 1, struct.pack("<d", x)), st.integers(4, 10), st.floats()),
    st.builds(lambda v: _field(11, 0, varint(v)), st.integers(0, (1 << 64) - 1)),
    st.builds(
        lambda s, n: _field(3, 2, _field(1, 0, varint(s)) + _field(2, 0, varint(n))),
        st.integers(0, (1 << 64) - 1),
        st.integers(0, (1 << 64) - 1),
    ),
    st.builds(
        lambda n, w, b: varint(n << 3 | w) + b, st.integers(0, 40), st.integers(0, 7), st.binary(max_size=10)
    ),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.lists(_TICK_PIECES, max_size=8).map(b"".join), max_size=6),
    st.binary(max_size=3),
)
def test_any_encoding_decodes_as_protobuf_reads_it_or_is_left_to_protobuf(
    bodies: list[bytes], tail: bytes
) -> None:
    raw = b"".join(_field(1, 2, body) for body in bodies) + tail
    try:
        message = feed_service_pb2.StreamTicksRequest.FromString(raw)
    except DecodeError:
        assert decode_ticks(raw) is None  # never read where protobuf refuses
        return
    decoded = decode_ticks(raw)
    if decoded is not None:
        _same_columns(TickColumns.decoded(decoded), TickColumns.of(message.ticks))
        assert decoded.answer_scores == message.answer_scores
        spans = zip(decoded.starts.tolist(), decoded.ends.tolist(), strict=True)
        assert [feed_service_pb2.Tick.FromString(raw[a:b]) for a, b in spans] == list(message.ticks)


def test_wide_varints_read_as_protobuf_truncates_them() -> None:
    """An int32 (nanos) sent as a varint wider than 32 bits keeps its low 32 bits, signed; a
    negative int64 (seconds) takes ten bytes."""
    for seconds, nanos, expected in (((1 << 64) - 1, (1 << 32) + 5, 5), (7, (1 << 64) - 5, -5)):
        time = _field(1, 0, varint(seconds)) + _field(2, 0, varint(nanos))
        raw = _field(1, 2, _field(2, 2, b"S") + _field(3, 2, time))
        decoded = decode_ticks(raw)
        assert decoded is not None
        message = feed_service_pb2.StreamTicksRequest.FromString(raw)
        assert decoded.nanos.tolist() == [message.ticks[0].time.nanos] == [expected]
        assert decoded.seconds.tolist() == [message.ticks[0].time.seconds]


def test_requests_beyond_what_an_encoder_writes_are_left_to_protobuf() -> None:
    """Fields repeated past what an encoder writes (each step of the reader costs the same whatever
    the batch: a million repeats must not cost a million steps), and varints over 64 bits."""
    tick = feed_service_pb2.Tick(feed_id="f", symbol="S", price=1.0, size=1.0).SerializeToString()
    normal = _field(1, 2, tick)
    assert decode_ticks(normal * 3) is not None
    for raw in (
        normal + _field(1, 2, tick + b"\x58\x00" * 1_000_000),  # is_bar a million times
        normal + _field(1, 2, tick + _field(2, 2, b"T")),  # a string twice
        normal + _field(1, 2, _field(3, 2, _field(1, 0, varint(5)) * 10)),  # a time's seconds ten times
        normal + _field(2, 0, varint(1)) * 3,  # answer_scores again and again
    ):
        feed_service_pb2.StreamTicksRequest.FromString(raw)  # protobuf reads them
        assert decode_ticks(raw) is None
    # A 10-byte varint whose last byte carries more than bit 64: as a length protobuf refuses it,
    # as a time's seconds it keeps the low 64 bits; the reader leaves both to protobuf.
    wide = bytes.fromhex("81808080808080808002")
    length = _field(1, 2, b"\x0a" + wide + b"x")
    with pytest.raises(DecodeError):
        feed_service_pb2.StreamTicksRequest.FromString(length)
    assert decode_ticks(length) is None
    seconds = _field(1, 2, _field(3, 2, b"\x08" + wide))
    assert feed_service_pb2.StreamTicksRequest.FromString(seconds).ticks[0].time.seconds == 1
    assert decode_ticks(seconds) is None


def _same_transaction_columns(ours: TransactionColumns, protobufs: TransactionColumns) -> None:
    for name in ("transaction_ids", "feed_ids", "customers", "terminals"):
        assert getattr(ours, name) == getattr(protobufs, name), name
    for name in ("seconds", "nanos", "amounts", "ulb_rows", "ulb_values", "other_features"):
        a, b = getattr(ours, name), getattr(protobufs, name)
        assert a.dtype == b.dtype, name
        assert a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name


@st.composite
def _transactions(draw: st.DrawFn) -> list[feed_service_pb2.Transaction]:
    records = []
    values = st.floats(allow_nan=True, allow_infinity=True)
    for _ in range(draw(st.integers(0, 10))):
        tx = feed_service_pb2.Transaction(
            feed_id=draw(st.text(max_size=70)), transaction_id=draw(st.text(max_size=70)),
            customer_id=draw(st.text(max_size=20)), terminal_id=draw(st.text(max_size=20)),
        )  # fmt: skip
        if draw(st.booleans()):
            tx.time.seconds = draw(st.integers(-(1 << 63), (1 << 63) - 1))
            tx.time.nanos = draw(st.integers(-(1 << 31), (1 << 31) - 1))
        if draw(st.booleans()):
            tx.amount = draw(values)
        if draw(st.booleans()):
            tx.feature_values.extend(draw(st.lists(values, min_size=28, max_size=28)))
        records.append(tx)
    return records


@settings(max_examples=200, deadline=None)
@given(_transactions(), st.booleans())
def test_decoded_transactions_are_the_columns_protobuf_reads(
    records: list[feed_service_pb2.Transaction], named: bool
) -> None:
    """Records with V1..V28 as feature_values (named by the request) or none: read with numpy as
    from protobuf's messages; any feature_values without the request's names are left to it."""
    names = list(ULB_VALUE_NAMES) if named else []
    raw = feed_service_pb2.StreamTransactionsRequest(
        transactions=records, feature_names=names
    ).SerializeToString()
    decoded = decode_transactions(raw, len(names))
    if not named and any(tx.feature_values for tx in records):
        assert decoded is None
        return
    assert decoded is not None
    blobs = [tx.SerializeToString() for tx in records]
    _same_transaction_columns(
        TransactionColumns.decoded(decoded), TransactionColumns.of(records, blobs, names)
    )
    spans = zip(decoded.starts.tolist(), decoded.ends.tolist(), strict=True)
    assert [raw[a:b] for a, b in spans] == blobs


def test_transactions_the_reader_leaves_to_protobuf() -> None:
    """A features map, names of a record's own, a count of values other than the request's names."""
    base = feed_service_pb2.Transaction(transaction_id="t", amount=1.0)
    for tx in (
        feed_service_pb2.Transaction(transaction_id="t", features={"V1": 1.0}),
        feed_service_pb2.Transaction(transaction_id="t", feature_values=[1.0], feature_names=["V1"]),
        feed_service_pb2.Transaction(transaction_id="t", feature_values=[1.0] * 27),
    ):
        raw = feed_service_pb2.StreamTransactionsRequest(
            transactions=[base, tx], feature_names=ULB_VALUE_NAMES
        ).SerializeToString()
        assert decode_transactions(raw, len(ULB_VALUE_NAMES)) is None


@pytest.fixture(scope="module")
def servicer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeedServicer]:
    store = VerdictStore(tmp_path_factory.mktemp("feed-wire") / "auris.db")
    with ThreadPoolExecutor(1) as pool:
        yield FeedServicer(FeedStore(store), pool, pool, Broker(16, 4))
    store.close()


@settings(max_examples=150, deadline=None)
@given(
    _transactions(),
    st.lists(st.sampled_from(["", "t1"]), max_size=10),
    st.lists(st.sampled_from([0, 1, 2]), max_size=10),
)
def test_a_transaction_batch_is_prepared_alike_from_its_bytes_and_from_protobuf(
    servicer: FeedServicer, records: list[feed_service_pb2.Transaction], ids: list[str], times: list[int]
) -> None:
    """Columns, rejects (index, reason, id) and the stored records are the same whether a batch is
    read with numpy or from protobuf's messages: empty ids, missing or out-of-range times, bad
    amounts and values included."""
    for tx, tid in zip(records, ids, strict=False):
        tx.transaction_id = tid
    for tx, how in zip(records, times, strict=False):
        if how == 0:
            tx.ClearField("time")
        elif how == 1:
            tx.time.FromSeconds(1_700_000_000)
    names = list(ULB_VALUE_NAMES)
    request = feed_service_pb2.StreamTransactionsRequest(transactions=records, feature_names=names)
    raw = request.SerializeToString()
    assert decode_transactions(raw, len(names)) is not None
    ours = servicer._prepare_transactions(FeedRequest(raw, request), names)
    theirs = servicer._prepare_transactions(FeedRequest(b"", request), names)
    assert isinstance(ours.columns, TransactionColumns)
    assert isinstance(theirs.columns, TransactionColumns)
    _same_transaction_columns(ours.columns, theirs.columns)
    assert [(r.index, r.reason, r.record_id) for r in ours.rejects] == [
        (r.index, r.reason, r.record_id) for r in theirs.rejects
    ]
    parse = feed_service_pb2.Transaction.FromString
    assert [parse(blob) for blob in ours.blobs] == [parse(blob) for blob in theirs.blobs]
