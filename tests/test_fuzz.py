"""Hypothesis against every decoder the system owns, on real components.

A live collector (real CA, both ports, real SQLite) gets random protobuf messages (random fields,
sizes and meaningful values mixed in) and random bytes as raw payloads on every RPC it serves;
feed files (CSV, gzip, Parquet) go through feed_files.read_records; model manifests through
read_manifest; mutated and random pcaps through the agent's metering and scoring. The
properties: the collector keeps serving (health check), only declared gRPC statuses come back
(each with a one-line reason), nothing stored before is altered, and the parsers raise only
their declared exception types. About 30 s; AURIS_FUZZ_SCALE=N runs N times the examples.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import gzip
import hashlib
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from auris.agent.features import FEATURE_SETS
from auris.agent.manifest import ManifestError, read_manifest
from auris.agent.meter import FlowRecord, MeterStats, meter_flows
from auris.agent.scoring import ModelSet, load_models
from auris.agent.verdicts import MAX_TIME_SECONDS, build_verdict
from auris.collector import feeds
from auris.collector.feed_files import (
    TICK_FIELDS,
    TRANSACTION_FIELDS,
    FeedFileError,
    FileFormat,
    read_records,
)
from auris.collector.services import validate_batch
from auris.v1 import (
    admin_service_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    feed_service_pb2,
    flow_pb2,
    query_service_pb2,
)
from tests.conftest import MODELS, PCAPS, TEST_TRUST, make_verdict
from tests.test_security import Secure, secure_collector

AGENT_ID = "edge-fuzz"
# A deeper run (minutes, not seconds): AURIS_FUZZ_SCALE=20 multiplies every example budget.
_SCALE = max(1, int(os.environ.get("AURIS_FUZZ_SCALE", "1")))
# Every RPC the collector serves: the contract's, health checking and server reflection.
_SERVED = (
    agent_service_pb2,
    query_service_pb2,
    admin_service_pb2,
    feed_service_pb2,
    health_pb2,
    reflection_pb2,
)
METHODS: list[MethodDescriptor] = [
    method
    for module in _SERVED
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
# Server streams that stay open until the client leaves: a short deadline ends them.
_OPEN_ENDED = ("Subscribe", "Watch")
# What the collector may answer to anything; DEADLINE_EXCEEDED only for open-ended streams.
DECLARED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.ALREADY_EXISTS,
}
# Tables whose rows, once written, nothing a client sends may change. Analyst labels on
# verdicts are a legitimate change (LabelVerdicts) and are left out of the checksum.
_GUARDED = {
    "verdicts": "*",
    "feed_records": "*",
    "feed_rejects": "*",
    "audit": "*",
    "api_tokens": "*",
    "enrollment_tokens": "*",
    "models": "*",
}


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


@dataclasses.dataclass
class Live:
    secure: Secure
    agent: grpc.Channel
    api: grpc.Channel
    admin: tuple[tuple[str, str | bytes], ...]
    reader: tuple[tuple[str, str | bytes], ...]
    # Table -> highest rowid at the start: rows up to it are checked.
    watermarks: dict[str, int]
    checksum: str

    def stored_checksum(self) -> str:
        digest = hashlib.sha256()
        with contextlib.closing(
            sqlite3.connect(f"file:{self.secure.collector.store.path}?mode=ro", uri=True)
        ) as db:
            for table, mark in sorted(self.watermarks.items()):
                columns = [
                    row[1]
                    for row in db.execute(f"PRAGMA table_info({table})")
                    if not str(row[1]).startswith("analyst_")
                ]
                for row in db.execute(
                    f"SELECT {', '.join(columns)} FROM {table} WHERE rowid <= ? ORDER BY rowid", (mark,)
                ):
                    digest.update(repr(row).encode())
        return digest.hexdigest()

    def serving(self) -> bool:
        health = health_pb2_grpc.HealthStub(self.api)
        response = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("fuzz")
    # Small messages, so that "too large" is reachable; no rate limits to trip over.
    settings_ = {
        "max_message_mib": 1,
        "token_rate_limit": 0.0,
        "agent_rate_limit": 0.0,
        "peer_rate_limit": 0.0,
    }
    with secure_collector(tmp, **settings_) as secure:
        with secure.client(secure.admin_token) as admin:
            enrollment = admin.create_enrollment_token(ttl=dt.timedelta(minutes=5)).token
            reader_token, _ = admin.create_api_token("fuzz-reader", admin_service_pb2.ROLE_READER)
            transactions = []
            for i in range(20):
                tx = feed_service_pb2.Transaction(
                    feed_id="cards", transaction_id=f"t{i}", customer_id=f"c{i % 3}", terminal_id="1",
                    amount=10.0 + i,
                )  # fmt: skip
                tx.time.FromSeconds(1_700_000_000 + i)
                transactions.append(tx)
            transactions.append(
                feed_service_pb2.Transaction(feed_id="cards", transaction_id="bad", amount=-1)
            )
            admin.submit_transactions(transactions)
            tick = feed_service_pb2.Tick(feed_id="prices", symbol="BAC", price=30.5, size=100)
            tick.time.FromSeconds(1_700_000_000)
            admin.submit_ticks([tick])
        key_pem, cert_pem = secure.enroll(enrollment, AGENT_ID)
        agent = secure.agent_channel(key_pem, cert_pem)
        batches = [
            agent_service_pb2.StreamVerdictsRequest(
                agent_id=AGENT_ID,
                verdicts=[make_verdict(s, agent_id=AGENT_ID, anomalous=s % 5 == 0) for s in range(k, k + 10)],
            )
            for k in (1, 11, 21, 31)
        ]
        acks = list(agent_service_pb2_grpc.AgentServiceStub(agent).StreamVerdicts(iter(batches), timeout=10))
        assert acks[-1].acknowledged_sequence == 40
        api = secure.api_channel()
        with contextlib.closing(sqlite3.connect(secure.collector.store.path)) as db:
            watermarks = {
                table: int(db.execute(f"SELECT COALESCE(MAX(rowid), 0) FROM {table}").fetchone()[0])
                for table in _GUARDED
            }
        assert watermarks["verdicts"] == 40
        assert watermarks["feed_records"] >= 20
        live = Live(
            secure,
            agent,
            api,
            (("authorization", f"Bearer {secure.admin_token}"),),
            (("authorization", f"Bearer {reader_token}"),),
            watermarks,
            "",
        )
        live.checksum = live.stored_checksum()
        try:
            yield live
        finally:
            agent.close()
            api.close()


def call(
    channel: grpc.Channel,
    method: MethodDescriptor,
    payloads: Sequence[bytes],
    metadata: tuple[tuple[str, str | bytes], ...] = (),
) -> tuple[grpc.StatusCode, str]:
    """Send raw payloads to ``method`` (one for a unary request); the status and its details."""
    path = _path(method)
    open_ended = method.name.startswith(_OPEN_ENDED)
    timeout = 0.3 if open_ended else 10.0
    first = payloads[0] if payloads else b""
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(path, None, None)(
                iter(payloads), timeout=timeout, metadata=metadata
            ):
                pass
        elif method.client_streaming:
            channel.stream_unary(path, None, None)(iter(payloads), timeout=timeout, metadata=metadata)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, None, None)(first, timeout=timeout, metadata=metadata):
                pass
        else:
            channel.unary_unary(path, None, None)(first, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        if not isinstance(exc, grpc.Call):
            raise
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and open_ended:
            return grpc.StatusCode.OK, ""
        return code, exc.details() or ""
    return grpc.StatusCode.OK, ""


def _check_answer(live: Live, method: MethodDescriptor, code: grpc.StatusCode, details: str) -> None:
    assert code in DECLARED, f"{_path(method)} answered {code.name}: {details}"
    # The transport's refusal of oversized trailers (a reason quoting a huge request string).
    assert not details.startswith("Stream removed"), f"{_path(method)}: {details}"
    # (+ "x": a trailing line break counts too)
    assert len((details + "x").splitlines()) == 1, f"{_path(method)}: a multi-line reason: {details!r}"
    assert "Traceback" not in details
    assert live.serving()
    assert live.stored_checksum() == live.checksum, f"{_path(method)} altered stored rows"


# -- random protobuf messages --------------------------------------------------------------------

_F = FieldDescriptor
_INT_RANGES = {
    _F.TYPE_INT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _F.TYPE_INT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _F.TYPE_UINT32: (0, 2**32 - 1),
    _F.TYPE_FIXED32: (0, 2**32 - 1),
    _F.TYPE_UINT64: (0, 2**64 - 1),
    _F.TYPE_FIXED64: (0, 2**64 - 1),
}
# Values the collector gives meaning to, mixed into random strings so that requests get past
# the first checks (a known agent, feed, model, label, address, time).
_MEANINGFUL = [AGENT_ID, "", "cards", "prices", "BAC", "m", "1", "nfstream-rf", "benign", "attack",
               "10.0.0.1", "::1", "src_ip", "label", "agent_id", "2026-01-01T00:00:00Z", "*"]  # fmt: skip


def _sized(small: st.SearchStrategy[Any], unit: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly small values, sometimes a long repetition (kilobytes to ~100 KB)."""
    return st.one_of(small, st.tuples(unit, st.integers(100, 20_000)).map(lambda t: t[0] * t[1]))


_TEXT = _sized(st.one_of(st.sampled_from(_MEANINGFUL), st.text(max_size=40)), st.text(min_size=1, max_size=5))
_BYTES = _sized(st.binary(max_size=64), st.binary(min_size=1, max_size=5))
_DOUBLES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 1.0, -1.0, 1e300, 5e-324]),
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        return st.one_of(st.integers(low, high), st.integers(max(low, -3), min(high, 100)))
    if field.type in (_F.TYPE_DOUBLE, _F.TYPE_FLOAT):
        return _DOUBLES if field.type == _F.TYPE_DOUBLE else st.floats(width=32)
    if field.type == _F.TYPE_BOOL:
        return st.booleans()
    if field.type == _F.TYPE_STRING:
        return _TEXT
    if field.type == _F.TYPE_BYTES:
        return _BYTES
    if field.type == _F.TYPE_ENUM:
        # Open enums: unknown numbers are legal on the wire.
        assert field.enum_type is not None
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-2, 50))
    raise AssertionError(f"no strategy for field type {field.type}")


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of ``descriptor``'s type with a random subset of fields set to random values."""
    message: Any = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            key, value = kind.fields_by_name["key"], kind.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                k = draw(_scalar(key))
                if value.message_type is not None:
                    if depth < 3:
                        getattr(message, field.name)[k].CopyFrom(
                            draw(messages(value.message_type, depth + 1))
                        )
                else:
                    getattr(message, field.name)[k] = draw(_scalar(value))
        elif field.is_repeated:
            count = draw(st.one_of(st.integers(0, 3), st.integers(0, 300) if kind is None else st.just(0)))
            for _ in range(count):
                if kind is not None:
                    if depth < 3:
                        getattr(message, field.name).add().CopyFrom(draw(messages(kind, depth + 1)))
                else:
                    getattr(message, field.name).append(draw(_scalar(field)))
        elif kind is not None:
            if depth < 3:
                getattr(message, field.name).CopyFrom(draw(messages(kind, depth + 1)))
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message  # type: ignore[no-any-return]


@st.composite
def requests(draw: st.DrawFn) -> tuple[MethodDescriptor, list[bytes]]:
    method = draw(st.sampled_from(METHODS))
    count = draw(st.integers(0, 3)) if method.client_streaming else 1
    return method, [draw(messages(method.input_type)).SerializeToString() for _ in range(count)]


_FUZZ = settings(
    max_examples=400 * _SCALE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_FUZZ
@given(request=requests())
def test_random_messages_on_every_rpc(live: Live, request: tuple[MethodDescriptor, list[bytes]]) -> None:
    method, payloads = request
    # Revoking the fuzzing agent is legitimate, and would shut it out of the rest of the run.
    assume(not (method.name == "RevokeAgent" and any(AGENT_ID.encode() in p for p in payloads)))
    # Each RPC on the port and with the credentials that get furthest into its handler.
    if method.containing_service.name == "AgentService":
        code, details = call(live.agent, method, payloads)
    else:
        code, details = call(live.api, method, payloads, live.admin)
    event(code.name)  # --hypothesis-show-statistics: how far requests got
    _check_answer(live, method, code, details)


_CALLERS = ("agent", "admin", "reader", "nobody")


@_FUZZ
@given(
    method=st.sampled_from(METHODS),
    payloads=st.lists(
        _sized(st.binary(max_size=200), st.binary(min_size=1, max_size=8)), min_size=1, max_size=3
    ),
    caller=st.sampled_from(_CALLERS),
)
def test_random_bytes_on_every_rpc(
    live: Live, method: MethodDescriptor, payloads: list[bytes], caller: str
) -> None:
    channel = live.agent if caller == "agent" else live.api
    metadata = {"admin": live.admin, "reader": live.reader}.get(caller, ())
    code, details = call(channel, method, payloads, metadata)
    event(code.name)
    _check_answer(live, method, code, details)


def test_a_message_over_the_size_limit_is_refused_and_the_collector_goes_on(live: Live) -> None:
    (method,) = [m for m in METHODS if m.name == "SubmitTransactions"]
    request = feed_service_pb2.SubmitTransactionsRequest(
        transactions=[feed_service_pb2.Transaction(feed_id="cards", transaction_id="x" * (2 << 20))]
    )
    code, details = call(live.api, method, [request.SerializeToString()], live.admin)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    _check_answer(live, method, code, details)


# -- regressions: what the fuzzing above found -----------------------------------------------------


def test_ids_beyond_sqlite_integers_are_invalid_arguments(live: Live) -> None:
    # Was UNKNOWN ("Unexpected <class 'OverflowError'>") from the store.
    with live.secure.client(live.secure.admin_token) as admin, pytest.raises(grpc.RpcError) as caught:
        admin.explain_verdict(2**64 - 1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of range" in (caught.value.details() or "")


def test_feed_times_beyond_2262_are_refused_not_crashed_on(live: Live) -> None:
    # Stored in ns, such a time overflowed SQLite's integers: UNKNOWN for the whole batch.
    late = feed_service_pb2.Transaction(feed_id="cards-late", transaction_id="late", amount=1.0)
    late.time.seconds = 9_223_372_037
    fine = feed_service_pb2.Transaction(feed_id="cards-late", transaction_id="fine", amount=1.0)
    fine.time.FromSeconds(1_700_000_000)
    with live.secure.client(live.secure.admin_token) as admin:
        answer = admin.submit_transactions([late, fine])
        assert answer.accepted == 1
        assert [r.reason for r in answer.rejected] == ["time is out of range (seconds 9223372037, nanos 0)"]
        since = timestamp_pb2.Timestamp(seconds=9_223_372_037)
        request = feed_service_pb2.QueryFeedScoresRequest(feed_id="cards", since_time=since)
        (method,) = [m for m in METHODS if m.name == "QueryFeedScores"]
        code, details = call(live.api, method, [request.SerializeToString()], live.admin)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith("since_time is out of range")


def test_a_verdict_time_beyond_2262_refuses_its_batch_only(live: Live) -> None:
    # Its ns overflowed in the group commit: the whole group (every stream in it) failed.
    verdict = make_verdict(1_000, agent_id=AGENT_ID)
    verdict.scored_time.seconds = 9_223_372_037
    stub = agent_service_pb2_grpc.AgentServiceStub(live.agent)
    with pytest.raises(grpc.RpcError) as caught:
        list(
            stub.StreamVerdicts(
                iter([agent_service_pb2.StreamVerdictsRequest(agent_id=AGENT_ID, verdicts=[verdict])]),
                timeout=10,
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "verdict 0: scored_time is out of range"
    refusal = caught.value
    assert isinstance(refusal, grpc.Call)
    trailing = {key: value for key, value in refusal.trailing_metadata() or ()}
    assert trailing["auris-rejected-sequence"] == "1000"


def test_what_a_handler_lets_escape_is_a_status_not_an_exception(live: Live) -> None:
    # Timestamp.ToNanoseconds() raises ValueError out of range: was UNKNOWN with the class name.
    (method,) = [m for m in METHODS if m.name == "ListAuditEvents"]
    request = admin_service_pb2.ListAuditEventsRequest(
        since_time=timestamp_pb2.Timestamp(seconds=-62_135_596_801)
    )
    code, details = call(live.api, method, [request.SerializeToString()], live.admin)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("Timestamp is not valid: Seconds -62135596801 must be in range")


def test_health_checking_answers_like_the_rest(live: Live) -> None:
    # Health and reflection went past the interceptor untouched: bytes that do not parse got
    # UNKNOWN and the DecodeError's class. Now they are wrapped too; Watch (a handler that calls
    # context.write instead of yielding) still streams.
    (check,) = [m for m in METHODS if m.full_name == "grpc.health.v1.Health.Check"]
    code, details = call(live.api, check, [b"\x00"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("malformed request")
    watch = health_pb2_grpc.HealthStub(live.api).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_an_aggregation_bucket_beyond_int64_is_refused(live: Live) -> None:
    # SQLite took the bucket as a float: TypeError building the answer (INTERNAL).
    (method,) = [m for m in METHODS if m.name == "AggregateVerdicts"]
    request = query_service_pb2.AggregateVerdictsRequest()
    request.bucket.seconds = 9_223_372_037
    code, details = call(live.api, method, [request.SerializeToString()], live.admin)
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "bucket is out of range (at most 292 years)")


def test_reasons_quoting_a_clients_string_stay_one_line(live: Live) -> None:
    # "this certificate is for agent edge-fuzz, not x<newline>y" went out as two lines.
    stub = agent_service_pb2_grpc.AgentServiceStub(live.agent)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Heartbeat(agent_service_pb2.HeartbeatRequest(agent_id="x\ny"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == "this certificate is for agent edge-fuzz, not x\\ny"


def test_reasons_quoting_a_long_client_string_are_cut(live: Live) -> None:
    # "no agent 'xxx...'" with a 100 KB id overflowed the client's trailer limit: the client saw
    # RESOURCE_EXHAUSTED "Stream removed" instead of NOT_FOUND.
    with live.secure.client(live.secure.admin_token) as admin, pytest.raises(grpc.RpcError) as caught:
        admin.get_agent("x" * 100_000)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details() or ""
    assert details.startswith("no agent 'xxx")
    assert len(details) == 300
    assert details.endswith("…")


@pytest.mark.parametrize("payload", [b"\x00", b"\xff\xff\xff", b"\x0a\x05ab"])
def test_undecodable_requests_are_invalid_arguments(live: Live, payload: bytes) -> None:
    # gRPC answered a request that does not parse with UNKNOWN and the DecodeError's class.
    (method,) = [m for m in METHODS if m.name == "ListAgents"]
    code, details = call(live.api, method, [payload], live.admin)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("malformed request: Error parsing message")
    # Authentication still comes first.
    assert call(live.api, method, [payload])[0] == grpc.StatusCode.UNAUTHENTICATED


# -- feed files ----------------------------------------------------------------------------------

_COLUMN_NAMES = st.one_of(
    st.sampled_from(
        [*TRANSACTION_FIELDS, *TICK_FIELDS, "ts", "timestamp", "tx_amount", "customer", "V1", "Class"]
    ),
    st.text(max_size=8),
)
_CELLS = st.one_of(
    st.sampled_from(
        [
            "",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "1e300",
            "-1e300",
            "9" * 40,
            "0",
            "-1",
            "1.5",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00+05:00",
            "0001-01-01",
            "9999-12-31T23:59:59",
            "2026-13-45",
            "\x00",
        ]
    ),
    st.text(max_size=12),
    st.floats().map(repr),
    st.integers().map(str),
)
_FORMATS = st.builds(
    FileFormat,
    kind=st.sampled_from(["transactions", "ticks"]),
    feed_id=st.just("f"),
    ignore=st.lists(st.sampled_from(["Class", "V1", ""]), max_size=2),
    rest_as_features=st.booleans(),
    symbol=st.sampled_from(["", "BAC"]),
    time_unit=st.sampled_from(["s", "ms", "us", "ns"]),
)


def _read_all(path: Path, fmt: FileFormat) -> None:
    """read_records to the end: FeedFileError (one line) or rows of valid records and reasons."""
    try:
        rows = list(read_records(path, fmt))
    except FeedFileError as exc:
        error = str(exc)
    else:
        error = ""
    assert "\n" not in error
    if error:
        return
    for number, item in rows:
        assert number >= 2
        if isinstance(item, str):
            assert item
            assert "\n" not in item
        else:
            item.SerializeToString()  # a record the collector can be sent
            reason = (feeds.validate_transaction(item) if isinstance(item, feed_service_pb2.Transaction)
                      else feeds.validate_tick(item, None))  # fmt: skip
            assert reason is None or reason.startswith(_RECORD_REASONS), (reason, item)


# Reasons the collector may give for a record a file produced (values a file may legitimately hold).
_RECORD_REASONS = ("amount is negative", "price must be positive and size not negative", "volume is negative",
                   "bar is inconsistent (low <= open, close <= high does not hold)", "symbol is empty",
                   "transaction_id is empty")  # fmt: skip


_FILE_SETTINGS = settings(
    max_examples=150 * _SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_FILE_SETTINGS
@given(fmt=_FORMATS, packing=st.sampled_from(["csv", "gz"]), data=st.data())
def test_csv_feed_rows(fmt: FileFormat, packing: str, data: st.DataObject) -> None:
    # Random names, or the kind's own fields (so that rows get parsed field by field).
    fields = TRANSACTION_FIELDS if fmt.kind == "transactions" else TICK_FIELDS
    header = data.draw(
        st.one_of(
            st.lists(_COLUMN_NAMES, max_size=8),
            st.lists(st.sampled_from(fields), min_size=2, max_size=len(fields), unique=True).map(
                lambda known: ["time", *known] if "time" not in known else known
            ),
        )
    )
    # Mostly rows as wide as the header (parsed field by field), some ragged.
    width = st.one_of(st.just(len(header)), st.integers(0, 9))
    rows = data.draw(st.lists(width.flatmap(lambda n: st.lists(_CELLS, min_size=n, max_size=n)), max_size=6))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("feed.csv.gz" if packing == "gz" else "feed.csv")
        with gzip.open(path, "wt", newline="") if packing == "gz" else path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
        _read_all(path, fmt)


def test_feed_file_regressions(tmp_path: Path) -> None:
    """Found by the fuzzing above: each escaped read_records as an undeclared error."""
    fmt = FileFormat("transactions", "f")
    csv_file = tmp_path / "t.csv"
    # Times of inf and 1e300 s: int(inf) raised OverflowError.
    csv_file.write_text("time,amount,transaction_id\ninf,5,a\n1e300,5,b\n1e12,5,c\n1e9,5,d\n")
    got: list[tuple[int, str]] = []
    for number, record in read_records(csv_file, fmt):
        assert not isinstance(record, feed_service_pb2.Tick)
        got.append((number, record if isinstance(record, str) else record.transaction_id))
    assert got == [
        (2, "time inf is not a finite number"),
        (3, "time 1e+300 is not a finite number"),
        (4, "time '1e12' is out of range (years 1678 to 2261)"),
        (5, "d"),
    ]
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A column name with a line break made a multi-line error; an empty file raised ArrowInvalid.
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"time\nx": [1]}), parquet)
    with pytest.raises(FeedFileError, match=r"unknown column 'time\\nx'") as caught:
        list(read_records(parquet, fmt))
    assert "\n" not in str(caught.value)
    parquet.write_bytes(b"")
    with pytest.raises(FeedFileError, match="not a readable Parquet file"):
        list(read_records(parquet, fmt))


_PARQUET_COLUMNS = st.one_of(
    st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=4),
    st.lists(st.one_of(st.none(), st.floats()), min_size=1, max_size=4),
    st.lists(st.one_of(st.none(), st.text(max_size=12)), min_size=1, max_size=4),
    st.lists(st.one_of(st.none(), st.booleans()), min_size=1, max_size=4),
    st.lists(
        st.one_of(st.none(), st.datetimes(timezones=st.sampled_from([None, dt.UTC]))), min_size=1, max_size=4
    ),
)


@_FILE_SETTINGS
@given(columns=st.dictionaries(_COLUMN_NAMES, _PARQUET_COLUMNS, max_size=6), fmt=_FORMATS)
def test_parquet_feed_rows(columns: dict[str, list[Any]], fmt: FileFormat) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    length = min((len(c) for c in columns.values()), default=0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "feed.parquet"
        pq.write_table(pa.table({name: values[:length] for name, values in columns.items()}), path)
        _read_all(path, fmt)


@_FILE_SETTINGS
@given(data=st.binary(max_size=2000), suffix=st.sampled_from([".csv", ".csv.gz", ".parquet"]), fmt=_FORMATS)
def test_feed_files_of_random_bytes(data: bytes, suffix: str, fmt: FileFormat) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"feed{suffix}"
        path.write_bytes(data)
        _read_all(path, fmt)


# -- model manifests -----------------------------------------------------------------------------

_SHIPPED = json.loads((MODELS / "nfstream-rf.manifest.json").read_text())
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def _mutated_manifests(draw: st.DrawFn) -> Any:
    """The shipped manifest with keys dropped, replaced by random JSON, or nested values changed."""
    manifest = json.loads(json.dumps(_SHIPPED))
    for key in draw(st.lists(st.sampled_from(sorted(manifest)), max_size=4)):
        action = draw(st.sampled_from(["drop", "replace", "inner"]))
        if action == "drop":
            manifest.pop(key, None)
        elif action == "replace" or not isinstance(manifest.get(key), dict) or not manifest[key]:
            manifest[key] = draw(_JSON)
        else:
            inner = manifest[key]
            inner[draw(st.sampled_from(sorted(inner)))] = draw(_JSON)
    return manifest


@_FILE_SETTINGS
@given(
    document=st.one_of(_mutated_manifests(), _JSON),
    raw=st.one_of(st.none(), st.binary(max_size=300)),
    verify_file=st.booleans(),
)
def test_manifests(document: Any, raw: bytes | None, verify_file: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.manifest.json"
        path.write_bytes(raw if raw is not None else json.dumps(document).encode())
        (Path(folder) / "nfstream-rf.onnx").write_bytes(b"not onnx")
        try:
            manifest = read_manifest(path, verify_file=verify_file)
        except ManifestError as exc:
            error = str(exc)
        else:
            error = ""
        assert "\n" not in error
        event("refused" if error else "parsed")
        if error:
            return
        # What parses is checked by signature next, with the same declared error.
        with pytest.raises(ManifestError):
            TEST_TRUST.verify(manifest, str(path))


# -- pcaps through the agent ---------------------------------------------------------------------

_PCAP_SEEDS = [
    (PCAPS / name).read_bytes()
    for name in ("malformed_icmp.pcap", "tls-esni-fuzzed.pcap", "malformed_dns.pcap")
]
_PCAP_HEADER = bytes.fromhex("d4c3b2a1020004000000000000000000ffff000001000000")


@pytest.fixture(scope="module")
def agent_models() -> ModelSet:
    models, refused = load_models(MODELS)
    assert not refused
    return models


@settings(max_examples=50 * _SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(range(len(_PCAP_SEEDS) + 1)),
    flips=st.lists(st.tuples(st.integers(0, 6000), st.integers(0, 255)), max_size=24),
    cut=st.one_of(st.none(), st.integers(0, 6000)),
    tail=st.binary(max_size=300),
)
def test_pcaps_through_metering_scoring_and_the_collectors_checks(
    agent_models: ModelSet, seed: int, flips: list[tuple[int, int]], cut: int | None, tail: bytes
) -> None:
    # A real capture mutated byte by byte (or a bare pcap header and random bytes), then what the
    # agent does with a capture: meter it, score the flows, build verdicts; the collector must
    # accept every verdict (a refused batch is dropped by the agent).
    data = bytearray(_PCAP_SEEDS[seed] if seed < len(_PCAP_SEEDS) else _PCAP_HEADER)
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    data = data[:cut] + tail if cut is not None else data + tail
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "capture.pcap"
        path.write_bytes(bytes(data))
        stats = MeterStats()
        flows = list(meter_flows([str(path)], list(FEATURE_SETS.values()), stats=stats))
    assert stats.sources_failed in (0, 1)
    assert all("\n" not in error for error in stats.errors)
    event("unreadable" if stats.sources_failed else f"{min(len(flows), 3)}+ flows")
    if not flows:
        return
    scores = agent_models.score([f.features for f in flows])
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    sets = agent_models.feature_sets
    verdicts = [
        build_verdict(agent_id=AGENT_ID, sequence=i + 1, flow=flow, scores=s, hostname="h", scored_time=now,
                      feature_sets=[(fs.name, fs.version) for fs in sets])
        for i, (flow, s) in enumerate(zip(flows, scores, strict=True))
    ]  # fmt: skip
    top, rows = validate_batch(
        agent_service_pb2.StreamVerdictsRequest(agent_id=AGENT_ID, verdicts=verdicts), 0
    )
    assert (top, len(rows)) == (len(verdicts), len(verdicts))
    assert agent_models.errors == 0


def test_a_flow_time_from_a_corrupt_capture_is_clamped_not_fatal() -> None:
    # Found by the pcap fuzzing: nfstream reports a record time before 1970 as a huge unsigned
    # number; building the verdict raised ValueError, which ended the agent's scoring loop.
    flow = FlowRecord("10.0.0.1", "10.0.0.2", 1, 2, 6, 4, 0, 2**64 - 2_131_475_339_940, 10**15, 1, 1, 60, 60,
                      "", flow_pb2.FLOW_END_REASON_IDLE_TIMEOUT, "x.pcap", {})  # fmt: skip
    now = timestamp_pb2.Timestamp(seconds=1_700_000_000)
    verdict = build_verdict(
        agent_id=AGENT_ID, sequence=1, flow=flow, scores=[], hostname="h", scored_time=now
    )
    assert verdict.first_seen_time.seconds == 0
    assert verdict.last_seen_time.seconds == MAX_TIME_SECONDS
    # ... and the collector takes it.
    validate_batch(agent_service_pb2.StreamVerdictsRequest(agent_id=AGENT_ID, verdicts=[verdict]), 0)
