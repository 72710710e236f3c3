"""Transaction and tick feeds on a real collector: files imported through aurisctl, rows rejected
with their row numbers and reasons while the rest is stored, identifiers hashed at ingest, tick
order kept across a restart, scores queried and streamed."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import json
import math
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from auris.agent.wire import length_delimited, varint
from auris.collector import ctl
from auris.collector.client import CollectorClient
from auris.collector.feed_batch import TickColumns, TransactionColumns
from auris.collector.feed_features import TX_ULB
from auris.collector.feed_files import FeedFileError, FileFormat, open_records, read_records
from auris.collector.feeds import (
    TICKS,
    TRANSACTIONS,
    FeedStore,
    Scored,
    hash_identifier,
    ticks_need_checking,
    transaction_suspects,
    validate_tick,
    validate_transaction,
)
from auris.collector.store import VerdictStore
from auris.v1 import feed_service_pb2
from tests.conftest import DATA, running_collector, wait_for

FILES = DATA / "feed-files"
FEED_FIXTURES = DATA / "feeds"


def _tx(**fields: object) -> feed_service_pb2.Transaction:
    tx = feed_service_pb2.Transaction(transaction_id="t1", amount=10.0)
    tx.time.FromSeconds(1_700_000_000)
    for name, value in fields.items():
        if value is None:
            tx.ClearField(name)  # type: ignore[arg-type]  # a field name from the test's keywords
        else:
            setattr(tx, name, value)
    return tx


def test_transactions_and_ticks_are_validated_field_by_field() -> None:
    assert validate_transaction(_tx()) is None
    assert validate_transaction(_tx(amount=None)) == "amount is missing"
    assert validate_transaction(_tx(amount=-1.0)) == "amount is negative (-1)"
    assert validate_transaction(_tx(amount=math.inf)) == "amount is not a finite number"
    assert validate_transaction(_tx(transaction_id="")) == "transaction_id is empty"
    nan = _tx()
    nan.features["V1"] = math.nan
    assert validate_transaction(nan) == "feature 'V1' is not a finite number"
    trade = feed_service_pb2.Tick(symbol="BAC", price=13.9, size=100)
    trade.time.FromSeconds(100)
    assert validate_tick(trade, None) is None
    assert "does not increase" in (validate_tick(trade, 100 * 10**9) or "")
    bar = feed_service_pb2.Tick(symbol="BAC", is_bar=True, open=10, high=9, low=8, close=9.5, volume=1)
    bar.time.FromSeconds(100)
    assert "inconsistent" in (validate_tick(bar, None) or "")
    bar.ClearField("volume")
    assert validate_tick(bar, None) == "volume is missing"


def test_files_map_columns_and_report_bad_rows(tmp_path: Path) -> None:
    fmt = FileFormat(
        "transactions", "cards", {"Time": "time", "Amount": "amount"}, ["Class"], rest_as_features=True
    )
    records = list(read_records(FILES / "ulb-40.csv", fmt))
    assert len(records) == 40
    bad = {number: reason for number, reason in records if isinstance(reason, str)}
    assert bad == {13: "V3 'n/a' is not a number", 19: "amount is missing"}  # the header is row 1
    good = [r for _, r in records if not isinstance(r, str)]
    assert isinstance(good[0], feed_service_pb2.Transaction)
    assert len(good[0].features) == 28
    assert good[0].transaction_id == "row-2"
    # Unmapped columns are not dropped silently.
    with pytest.raises(FeedFileError, match="unknown column 'V1'"):
        list(read_records(FILES / "ulb-40.csv", FileFormat("transactions", "cards", {"Amount": "amount"})))
    # The same rows from gzip and from Parquet.
    gz = tmp_path / "ulb.csv.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write((FILES / "ulb-40.csv").read_bytes())
    assert [n for n, _ in read_records(gz, fmt)] == [n for n, _ in records]
    ticks = FileFormat("ticks", "bac", ignore=["exchange", "condition", "suspicious"], symbol="BAC")
    parquet = tmp_path / "bac.parquet"
    trades = [
        r for _, r in read_records(FILES / "bac-trades-30.csv", ticks) if isinstance(r, feed_service_pb2.Tick)
    ]
    assert len(trades) == 30
    table = pa.table(
        {
            "ts": [r.time.ToDatetime() for r in trades],
            "price": [r.price for r in trades],
            "size": [r.size for r in trades],
        }
    )
    pq.write_table(table, parquet)
    from_parquet = [r for _, r in read_records(parquet, ticks) if isinstance(r, feed_service_pb2.Tick)]
    assert [(r.price, r.time.ToNanoseconds()) for r in from_parquet] == [
        (r.price, r.time.ToNanoseconds()) for r in trades
    ]


def test_feature_cells_are_read_in_one_pass_and_bad_ones_named(tmp_path: Path) -> None:
    """Feature cells: spaces around a number are fine; an empty, non-numeric or non-finite cell
    rejects its row with the column's name, whichever cell of the row it is."""
    path = tmp_path / "tx.csv"
    path.write_text(
        "Time,Amount,V1,V2\n0,1, 2 ,3\n1,1,1.5,inf\n2,1,,2\n3,1,x,nan\n4,1,1e3,-0\n", encoding="utf-8"
    )
    fmt = FileFormat("transactions", "cards", {"Time": "time", "Amount": "amount"}, rest_as_features=True)
    records = dict(read_records(path, fmt))
    assert {n: r for n, r in records.items() if isinstance(r, str)} == {
        3: "V2 is not a finite number",
        4: "V1 is missing",
        5: "V1 'x' is not a number",
    }
    good = {n: r for n, r in records.items() if isinstance(r, feed_service_pb2.Transaction)}
    assert [dict(good[n].features) for n in (2, 6)] == [{"V1": 2.0, "V2": 3.0}, {"V1": 1000.0, "V2": 0.0}]
    # Packed (as aurisctl sends them): the same values as feature_values, named by the columns.
    names, rows = open_records(path, fmt, packed=True)
    packed = {n: r for n, r in rows if isinstance(r, feed_service_pb2.Transaction)}
    assert names == ["V1", "V2"]
    assert [list(packed[n].feature_values) for n in (2, 6)] == [[2.0, 3.0], [1000.0, 0.0]]
    assert not packed[2].features
    # A column without a name (pandas' index) stays a map key, as the collector takes it.
    path.write_text(",Time,Amount,V1\n0,0,1,2\n", encoding="utf-8")
    names, rows = open_records(path, fmt, packed=True)
    assert names == []
    assert [dict(r.features) for _, r in rows if isinstance(r, feed_service_pb2.Transaction)] == [
        {"": 0, "V1": 2}
    ]
    # A feature column twice cannot name its values.
    path.write_text("Time,Amount,V1,V1\n0,1,2,3\n", encoding="utf-8")
    with pytest.raises(FeedFileError, match="'V1' appears more than once"):
        open_records(path, fmt)


def test_feeds_on_a_real_collector(tmp_path: Path) -> None:
    key = tmp_path / "feed.key"
    key.write_bytes(b"0123456789abcdef-secret")
    db = tmp_path / "auris.db"
    ulb = tmp_path / "ulb.csv"
    shutil.copy(FILES / "ulb-40.csv", ulb)
    with running_collector(db, feed_hash_key_file=str(key)) as collector:
        base = ["--collector", collector.address, "--insecure", "feed"]
        with CollectorClient(collector.address, insecure=True) as client:
            seen: list[feed_service_pb2.FeedScore] = []
            stream = client.subscribe_feed_scores("cards")

            def follow() -> None:
                with contextlib.suppress(grpc.RpcError):  # the collector stops at the end of the test
                    for score in stream:
                        seen.append(score)

            threading.Thread(target=follow, daemon=True).start()
            out = io.StringIO()
            args = [*base, "import", "transactions", str(ulb), "--feed", "cards", "--map", "Time=time",
                    "--map", "Amount=amount", "--ignore", "Class", "--rest-as-features",
                    "--batch", "16"]  # fmt: skip
            assert ctl.main(args, out) == 0, out.getvalue()
            text = out.getvalue()
            assert "40 rows, 37 accepted, 3 rejected" in text
            # Rejected by the collector, reported with the file's row number.
            assert "row 7: amount is negative (-3.5)" in text
            assert "row 13: V3 'n/a' is not a number" in text
            assert "row 19: amount is missing" in text
            assert wait_for(lambda: len(seen) == 37, 10)
            stored = list(client.feed_scores("cards", limit=100))
            assert len(stored) == 37
            assert [s.id for s in stored] == sorted((s.id for s in stored), reverse=True)
            rejects = list(client.feed_rejects("cards"))
            assert [r.record.reason for r in rejects] == ["amount is negative (-3.5)"]
            (info,) = client.list_feeds()
            assert (info.feed_id, info.records_accepted, info.records_rejected) == ("cards", 37, 1)

            # A customer id never reaches the database in the clear.
            tx = feed_service_pb2.Transaction(
                feed_id="cards",
                transaction_id="x1",
                customer_id="alice@example.org",
                terminal_id="T-9",
            )
            tx.amount = 5
            tx.time.FromSeconds(1_700_000_000)
            (score,) = client.submit_transactions([tx]).scores
            assert score.entity == hash_identifier(b"0123456789abcdef-secret", "alice@example.org")
            files = b"".join(path.read_bytes() for path in db.parent.glob("auris.db*"))
            assert b"alice@example.org" not in files
            with sqlite3.connect(db) as conn:
                blobs = [row[0] for row in conn.execute("SELECT record_pb FROM feed_records")]
            assert all(b"alice@example.org" not in blob and b"T-9" not in blob for blob in blobs)

            ticks = [*base, "import", "ticks", str(FILES / "bac-trades-30.csv"), "--feed", "bac",
                     "--symbol", "BAC", "--ignore", "exchange", "--ignore", "condition",
                     "--ignore", "suspicious"]  # fmt: skip
            # Real prints share milliseconds; with the swapped pair, every row whose time is not past
            # the latest before it is refused.
            fmt = FileFormat("ticks", "bac", ignore=["exchange", "condition", "suspicious"], symbol="BAC")
            latest, expected = 0, []
            for number, tick in read_records(FILES / "bac-trades-30.csv", fmt):
                assert not isinstance(tick, str)
                if tick.time.ToNanoseconds() <= latest:
                    expected.append(number)
                latest = max(latest, tick.time.ToNanoseconds())
            assert 23 in expected
            out = io.StringIO()
            assert ctl.main(ticks, out) == 0
            assert f"30 rows, {30 - len(expected)} accepted, {len(expected)} rejected" in out.getvalue()
            for number in expected:
                assert f"row {number}: time does not increase within BAC" in out.getvalue()
    # After a restart the collector still knows each symbol's last time: the same file again is refused.
    with running_collector(db, feed_hash_key_file=str(key)) as collector:
        out = io.StringIO()
        ticks[1] = collector.address
        assert ctl.main(ticks, out) == 0
        assert "30 rows, 0 accepted, 30 rejected" in out.getvalue()


def test_feed_import_reads_the_file_before_it_opens_a_stream(tmp_path: Path) -> None:
    """A file that cannot be read as asked fails with its own error, and one without a valid row
    sends nothing: neither needs the collector (here: nothing listens)."""
    base = ["--collector", "127.0.0.1:1", "--insecure", "feed", "import", "transactions"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = ctl.main([*base, str(FILES / "ulb-40.csv"), "--feed", "cards"], io.StringIO())
    assert code == ctl.EXIT_USAGE
    assert "unknown column" in err.getvalue()
    bad = tmp_path / "bad.csv"
    bad.write_text("Time,Amount\nnoon,1\n1,lots\n")
    out = io.StringIO()
    code = ctl.main([*base, str(bad), "--feed", "cards", "--map", "Time=time", "--map", "Amount=amount"], out)
    assert code == ctl.EXIT_OK, out.getvalue()
    assert "2 rows, 0 accepted, 2 rejected" in out.getvalue()


def test_a_feed_import_whose_stream_breaks_says_what_was_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collector refuses a request (a batch over its limit, lowered here): aurisctl sums up
    what it knows before the error, including the rows it sent without an answer."""
    from auris.collector import feeds

    monkeypatch.setattr(feeds, "MAX_BATCH", 10)
    with running_collector(tmp_path / "auris.db") as collector:
        out, err = io.StringIO(), io.StringIO()
        args = ["--collector", collector.address, "--insecure", "feed", "import", "transactions",
                str(FILES / "ulb-40.csv"), "--feed", "cards", "--map", "Time=time", "--map", "Amount=amount",
                "--ignore", "Class", "--rest-as-features", "--batch", "16"]  # fmt: skip
        with contextlib.redirect_stderr(err):
            code = ctl.main(args, out)
    assert code != ctl.EXIT_OK
    assert "the stream broke after" in out.getvalue()
    assert "0 accepted" in out.getvalue()
    assert "no batch was answered" in out.getvalue()
    assert "more than 10 records in one request" in err.getvalue()


def test_feed_alert_rules_group_anomalous_scores_by_entity(tmp_path: Path) -> None:
    from auris.collector.alerts import AlertRule, Alerts
    from auris.collector.feeds import FeedStore, Scored
    from auris.collector.store import VerdictStore

    store = VerdictStore(tmp_path / "auris.db")
    rule = AlertRule(name="fraud", feed="cards", anomalous=True, count=2, window_minutes=60)
    assert rule.group_by == ("feed_id", "entity")
    alerts = Alerts(store, [rule], [])
    feeds = FeedStore(store, alerts.evaluate_feed)

    def record(n: int, who: str, anomalous: bool) -> tuple[str, str, int, bytes, Scored]:
        return f"t{n}", who, 1_700_000_000_000_000_000 + n, b"", Scored("tx-model", "1", 0.9, anomalous)

    _, changed = feeds.add("cards", 1, [record(1, "h:alice", True), record(2, "h:bob", True)], [], 1)
    assert changed == []  # one each: below the count of 2
    _, changed = feeds.add("cards", 1, [record(3, "h:alice", True), record(4, "h:bob", False)], [], 2)
    (alert,) = alerts.get(changed)
    assert (alert.rule, alert.key, alert.events) == ("fraud", "feed_id=cards entity=h:alice", 2)
    _, changed = feeds.add("other", 1, [record(5, "h:alice", True), record(6, "h:alice", True)], [], 3)
    assert changed == []  # another feed
    with pytest.raises(ValueError, match="feed rule"):
        AlertRule(name="bad", feed="cards", labels=("x",))
    store.close()


def test_the_shipped_feed_models_score_at_ingest(tmp_path: Path) -> None:
    """Real ULB rows through aurisctl into a collector that scores them with the shipped, signed
    transaction models: every valid row is scored, and the frauds score higher than the rest (early
    rows of the set, which the model may have trained on: a functional check, not an evaluation)."""
    from tests.conftest import MODELS

    with running_collector(tmp_path / "auris.db", feed_models_dir=str(MODELS / "feeds")) as collector:
        out = io.StringIO()
        args = ["--collector", collector.address, "--insecure", "feed", "import", "transactions",
                str(FILES / "ulb-40.csv"), "--feed", "cards", "--map", "Time=time", "--map", "Amount=amount",
                "--ignore", "Class", "--rest-as-features"]  # fmt: skip
        assert ctl.main(args, out) == 0, out.getvalue()
        with CollectorClient(collector.address, insecure=True) as client:
            stored = list(client.feed_scores("cards", limit=100))
    assert len(stored) == 37
    assert all(s.model.model_id for s in stored)
    fraud_rows = {
        f"row-{number}"
        for number, line in enumerate((FILES / "ulb-40.csv").read_text().splitlines()[1:], start=2)
        if line.rsplit(",", 1)[1] == "1"
    }
    fraud = [s.score for s in stored if s.record_id in fraud_rows]
    normal = [s.score for s in stored if s.record_id not in fraud_rows]
    assert fraud
    assert normal
    assert sum(fraud) / len(fraud) > sum(normal) / len(normal)


def test_a_mixed_batch_keeps_each_reject_under_its_own_feed(tmp_path: Path) -> None:
    good = _tx(transaction_id="ok")
    good.feed_id = "a"
    bad = _tx(transaction_id="neg", amount=-2.0)
    bad.feed_id = "b"
    with (
        running_collector(tmp_path / "auris.db") as collector,
        CollectorClient(collector.address, insecure=True) as client,
    ):
        response = client.submit_transactions([good, bad])
        assert response.accepted == 1
        assert [(r.index, r.record_id) for r in response.rejected] == [(1, "neg")]
        assert list(client.feed_rejects("a")) == []
        assert [r.record.record_id for r in client.feed_rejects("b")] == ["neg"]
        assert {f.feed_id: (f.records_accepted, f.records_rejected) for f in client.list_feeds()} == {
            "a": (1, 0),
            "b": (0, 1),
        }


def _fixture_records(
    name: str, fmt: FileFormat, folder: Path = FEED_FIXTURES
) -> list[feed_service_pb2.Transaction | feed_service_pb2.Tick]:
    records = [r for _, r in read_records(folder / name, fmt) if not isinstance(r, str)]
    assert records
    return records


def _scores_by_record(
    db: Path, batches: list[list[feed_service_pb2.Transaction | feed_service_pb2.Tick]]
) -> dict[str, tuple[float, str]]:
    """Send the batches to a collector with the shipped feed models on ``db``; every score it
    answered with, by record id (the model's explanation beside it)."""
    from tests.conftest import MODELS

    out: dict[str, tuple[float, str]] = {}
    with (
        running_collector(db, feed_models_dir=str(MODELS / "feeds")) as collector,
        CollectorClient(collector.address, insecure=True) as client,
    ):
        for batch in batches:
            if isinstance(batch[0], feed_service_pb2.Transaction):
                tx_answer = client.submit_transactions(batch)  # type: ignore[arg-type]
                scores = tx_answer.scores
            else:
                tick_answer = client.submit_ticks(batch)  # type: ignore[arg-type]
                scores = tick_answer.scores
            for s in scores:
                if s.model.model_id:
                    out[f"{s.feed_id}/{s.record_id}"] = (s.score, s.explanation)
    return out


def test_transactions_sent_as_feature_values_score_and_store_as_their_maps(tmp_path: Path) -> None:
    """The ULB fixture rows sent with V1..V28 as feature_values (named once per request, or by
    each record) score exactly as the same rows sent with maps; stored records carry the names of
    their values; a record whose values do not fit its names is rejected, the rest stored."""
    from tests.conftest import MODELS

    fmt = FileFormat(
        "transactions", "x", {"Time": "time", "Amount": "amount"}, ["Class"], rest_as_features=True
    )
    txs = [
        tx for tx in _fixture_records("ulb-sample.csv", fmt) if isinstance(tx, feed_service_pb2.Transaction)
    ]
    v = list(TX_ULB.columns[:-1])
    half = len(txs) // 2
    maps = _scores_by_record(tmp_path / "maps.db", [txs[:half], txs[half:]])  # type: ignore[list-item]
    db = tmp_path / "values.db"
    bad = _as_values(txs[0], v)
    bad.transaction_id = "short"
    del bad.feature_values[-1]
    with (
        running_collector(db, feed_models_dir=str(MODELS / "feeds")) as collector,
        CollectorClient(collector.address, insecure=True) as client,
    ):
        first = client.submit_transactions([_as_values(tx, v) for tx in txs[:half]], feature_names=v)
        second = client.submit_transactions(
            [_as_values(tx, None) for tx in txs[half:]] + [bad], feature_names=v
        )
    assert first.accepted == half
    assert second.accepted == len(txs) - half
    (reject,) = second.rejected
    assert reject.record_id == "short"
    assert reject.reason == "feature_values has 27 values for the 28 names of the request's feature_names"
    # In-process scoring names the values the same way.
    from auris.agent.signing import ModelTrust
    from auris.collector.feed_models import TransactionScorer

    scorer = TransactionScorer.load(MODELS / "feeds", ModelTrust.load([]))
    in_process = scorer.score([_as_values(tx, v) for tx in txs[:half]], feature_names=v)
    assert [(r.record_id, r.score) for r in in_process] == [(s.record_id, s.score) for s in first.scores]
    values = {f"{s.feed_id}/{s.record_id}": (s.score, s.explanation) for s in [*first.scores, *second.scores]}
    assert values == maps
    assert len(values) == len(txs)
    with sqlite3.connect(db) as conn:
        stored = [
            feed_service_pb2.Transaction.FromString(b)
            for (b,) in conn.execute("SELECT record_pb FROM feed_records ORDER BY id")
        ]
    assert len(stored) == len(txs)
    for tx, kept in zip(txs, stored, strict=True):
        assert list(kept.feature_names) == v
        assert dict(zip(kept.feature_names, kept.feature_values, strict=True)) == dict(tx.features)


def test_window_state_is_rebuilt_from_the_store_after_a_restart(tmp_path: Path) -> None:
    """Entity windows (transactions with customer and terminal ids), bar windows and the open trade
    bar (ticks) are replayed from the stored records when a restarted collector meets a feed
    again: the records after the restart score exactly as in one uninterrupted run, and a collector
    that starts empty (what a restart did before) scores many of them differently."""
    transactions = _fixture_records(
        "handbook-sample.csv",
        FileFormat("transactions", "cards", ignore=("TX_FRAUD", "TX_FRAUD_SCENARIO")),
    )
    bars = _fixture_records("bars-sample.csv", FileFormat("ticks", "bars"))
    trades = _fixture_records(
        "trades-sample.csv.gz",
        FileFormat("ticks", "trades", symbol="IBM", ignore=("exchange", "condition", "suspicious")),
    )

    def halves(records: list) -> tuple[list[list], list[list]]:  # type: ignore[type-arg]
        """Each symbol's (or the whole feed's) first half, then the second, in batches of 97."""
        first: list = []  # type: ignore[type-arg]
        second: list = []  # type: ignore[type-arg]
        for symbol in dict.fromkeys(getattr(r, "symbol", "") for r in records):
            mine = [r for r in records if getattr(r, "symbol", "") == symbol]
            first += mine[: len(mine) // 2]
            second += mine[len(mine) // 2 :]
        return [first[i : i + 97] for i in range(0, len(first), 97)], [
            second[i : i + 97] for i in range(0, len(second), 97)
        ]

    firsts, seconds = zip(*(halves(r) for r in (transactions, bars, trades)), strict=True)
    before = [b for part in firsts for b in part]
    after = [b for part in seconds for b in part]
    whole = _scores_by_record(tmp_path / "whole.db", before + after)
    _scores_by_record(tmp_path / "restarted.db", before)
    with (
        contextlib.closing(sqlite3.connect(tmp_path / "restarted.db")) as source,
        contextlib.closing(sqlite3.connect(tmp_path / "migrated.db")) as copy,
    ):
        source.backup(copy)  # the WAL's pages too
    links = _feed_links(tmp_path / "migrated.db")
    _as_schema_13(tmp_path / "migrated.db")
    restarted = _scores_by_record(tmp_path / "restarted.db", after)
    fresh = _scores_by_record(tmp_path / "fresh.db", after)
    # A database of schema 13 (before the links) is migrated to the very links the collector
    # writes, and rebuilds the windows from them as well.
    VerdictStore(tmp_path / "migrated.db").close()
    assert _feed_links(tmp_path / "migrated.db") == links
    assert links[1]
    assert any(prev is not None for _, prev in links[0])
    migrated = _scores_by_record(tmp_path / "migrated.db", after)

    for feed in ("cards", "bars", "trades"):
        keys = [k for k in restarted if k.startswith(feed + "/")]
        assert len(keys) > (10 if feed == "trades" else 100), (feed, len(keys))
        assert {k: restarted[k] for k in keys} == {k: whole[k] for k in keys}, feed
        assert {k: migrated[k] for k in keys} == {k: whole[k] for k in keys}, feed
        differs = sum(fresh.get(k) != whole[k] for k in keys)
        assert differs > len(keys) // 4, (feed, differs, len(keys))


def _feed_links(path: Path) -> list[list[tuple[object, ...]]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [
            conn.execute(query).fetchall()
            for query in (
                "SELECT id, prev_id FROM feed_records ORDER BY id",
                "SELECT * FROM feed_symbols ORDER BY feed_id, entity",
                "SELECT * FROM feed_totals ORDER BY feed_id, kind",
            )
        ]


def _as_schema_13(path: Path) -> None:
    """Make a database schema 13 again: feed records without links, symbols or totals, with the
    (feed, kind, entity, time) index."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TABLE feed_symbols")
        conn.execute("DROP TABLE feed_totals")
        conn.execute("ALTER TABLE feed_records DROP COLUMN prev_id")
        conn.execute("CREATE INDEX feed_records_entity ON feed_records (feed_id, kind, entity, time_ns)")
        conn.execute("UPDATE meta SET value = '13' WHERE key = 'schema_version'")
        conn.commit()


def test_feed_score_writes_one_row_per_input_row_with_the_collectors_scores(tmp_path: Path) -> None:
    """`aurisctl feed score` runs the file through the same reader, validation and scorers as
    ingest, on this host: one output row per input row in input order, rejected rows with their
    reason, and the very scores a live collector gives the same records."""
    source = tmp_path / "cards.csv"
    lines = (FEED_FIXTURES / "handbook-sample.csv").read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 3)[0] + ",-3.5,0,0"  # a negative amount: rejected at ingest
    lines[9] = lines[9].rsplit(",", 3)[0] + ",lots,0,0"  # not a number: the file reader's reject
    source.write_text("\n".join(lines) + "\n")
    ignore = ["--ignore", "TX_FRAUD", "--ignore", "TX_FRAUD_SCENARIO"]
    out = io.StringIO()
    assert ctl.main(["feed", "score", "transactions", str(source), "--feed", "cards", "--out",
                     str(tmp_path / "scores.csv"), *ignore], out) == 0, out.getvalue()  # fmt: skip
    assert "796 rows" in out.getvalue()
    assert "794 scored" in out.getvalue()
    assert "2 rejected" in out.getvalue()
    with (tmp_path / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["row"]) for r in rows] == list(range(2, 798))
    assert (rows[4]["status"], rows[8]["status"]) == ("rejected", "rejected")
    assert "amount is negative" in rows[4]["reason"]
    assert "not a number" in rows[8]["reason"]

    fmt = FileFormat("transactions", "cards", ignore=("TX_FRAUD", "TX_FRAUD_SCENARIO"))
    records = _fixture_records("cards.csv", fmt, folder=tmp_path)
    live = _scores_by_record(
        tmp_path / "auris.db", [records[i : i + 100] for i in range(0, len(records), 100)]
    )
    offline = {f"cards/{r['record_id']}": float(r["score"]) for r in rows if r["status"] == "scored"}
    assert len(offline) == 794
    assert offline == pytest.approx({k: v[0] for k, v in live.items()}, rel=1e-6)

    # The same through JSON lines and Parquet; trades carry the score of their one-minute bar.
    trades = ["feed", "score", "ticks", str(FEED_FIXTURES / "trades-sample.csv.gz"), "--symbol", "IBM",
              "--ignore", "exchange", "--ignore", "condition", "--ignore", "suspicious"]  # fmt: skip
    assert ctl.main([*trades, "--out", str(tmp_path / "t.jsonl")], io.StringIO()) == 0
    assert ctl.main([*trades, "--out", str(tmp_path / "t.parquet")], io.StringIO()) == 0
    as_json = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    as_parquet = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert len(as_json) == len(as_parquet) == 3000
    assert [r["score"] for r in as_json] == [r["score"] for r in as_parquet]
    by_bar: dict[str, set[object]] = {}
    for r in as_json:
        if r["status"] == "scored":
            by_bar.setdefault(r["bar"], set()).add(r["score"])
    assert len(by_bar) > 50
    assert all(len(scores) == 1 for scores in by_bar.values())

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = ctl.main(
            ["feed", "score", "transactions", str(source), "--out", str(tmp_path / "x.csv")], io.StringIO()
        )
    assert code == ctl.EXIT_USAGE
    assert "unknown column 'TX_FRAUD'" in err.getvalue()
    assert not (tmp_path / "x.csv").exists()


# Field values that validation must judge (None: the field is left unset).
_NUMBERS = st.sampled_from([None, 0.0, -0.0, 1.5, -2.0, math.nan, math.inf, -math.inf, 1e300])
_SECONDS = st.sampled_from([None, 0, 1_700_000_000, -1, 9_223_372_036, -9_223_372_037, 2**62])
_NANOS = st.sampled_from([0, 1, 854_775_807, 854_775_808, 999_999_999])


def _stamp(
    message: feed_service_pb2.Transaction | feed_service_pb2.Tick, seconds: int | None, nanos: int
) -> None:
    if seconds is not None:
        message.time.seconds = seconds
        message.time.nanos = nanos


@st.composite
def _transactions(draw: st.DrawFn) -> feed_service_pb2.Transaction:
    tx = feed_service_pb2.Transaction(transaction_id=draw(st.sampled_from(["", "t1"])))
    _stamp(tx, draw(_SECONDS), draw(_NANOS))
    amount = draw(_NUMBERS)
    if amount is not None:
        tx.amount = amount
    names = draw(st.sampled_from(["none", "ulb", "ulb+x", "28 without V28", "some"]))
    v = TX_ULB.columns[:-1]
    columns = {
        "none": [],
        "ulb": v,
        "ulb+x": [*v, "x"],
        "28 without V28": [*v[:-1], "x"],
        "some": ["V1", "y"],
    }
    for name in columns[names]:
        tx.features[name] = (
            draw(st.sampled_from([0.5, -3.0, math.nan, math.inf])) if draw(st.booleans()) else 1.0
        )
    return tx


@st.composite
def _ticks(draw: st.DrawFn) -> feed_service_pb2.Tick:
    tick = feed_service_pb2.Tick(
        feed_id=draw(st.sampled_from(["a", "b"])), symbol=draw(st.sampled_from(["", "X", "Y"]))
    )
    _stamp(tick, draw(st.one_of(_SECONDS, st.integers(1_700_000_000, 1_700_000_005))), draw(_NANOS))
    tick.is_bar = draw(st.booleans())
    fields = ("open", "high", "low", "close", "volume") if tick.is_bar else ("price", "size")
    for name in fields:
        value = draw(st.one_of(_NUMBERS, st.floats(1.0, 3.0)))
        if value is not None:
            setattr(tick, name, value)
    return tick


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(_transactions(), max_size=12))
def test_column_checks_find_every_transaction_that_validation_rejects(
    batch: list[feed_service_pb2.Transaction],
) -> None:
    """The batch path looks at one record on its own only where its columns say it might be bad:
    that must cover every record ``validate_transaction`` rejects (and leave the records as sent)."""
    before = [tx.SerializeToString() for tx in batch]
    looked_up = TransactionColumns.of(batch)
    indexed = TransactionColumns.of(batch, before)  # indexes the maps, restores those it changed
    assert batch == [feed_service_pb2.Transaction.FromString(blob) for blob in before]
    assert looked_up.ulb_rows.tolist() == indexed.ulb_rows.tolist()
    assert looked_up.other_features.tolist() == indexed.other_features.tolist()
    np.testing.assert_array_equal(looked_up.ulb_values, indexed.ulb_values)
    suspects = set(transaction_suspects(indexed))
    rejected = {i for i, tx in enumerate(batch) if validate_transaction(tx) is not None}
    assert rejected <= suspects


def _as_values(tx: feed_service_pb2.Transaction, names: list[str] | None) -> feed_service_pb2.Transaction:
    """``tx`` with its map's V1..V28 (whatever of them it has) as feature_values: named by the
    record itself when ``names`` is None, else left to the request's names. Other keys stay."""
    out = feed_service_pb2.Transaction()
    out.CopyFrom(tx)
    v = list(TX_ULB.columns[:-1])
    present = [name for name in v if name in tx.features]
    for name in present:
        del out.features[name]
    out.feature_values.extend(tx.features[name] for name in present)
    if names is None:
        out.feature_names.extend(present)
    return out


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(
        st.tuples(_transactions(), st.sampled_from(["request", "own", "reversed", "names only"])), max_size=12
    ),
    names=st.sampled_from([list(TX_ULB.columns[:-1]), ["V1", "y"], []]),
)
def test_feature_values_read_as_their_maps_and_column_checks_cover_validation(
    batch: list[tuple[feed_service_pb2.Transaction, str]], names: list[str]
) -> None:
    """Records with feature_values (named by the request, or by themselves in any order) give the
    columns the same records with maps give, read from the blobs' packed tails or value by value
    alike; every record ``validate_transaction`` rejects is a suspect (names without values too)."""
    records = []
    for tx, form in batch:
        record = _as_values(tx, None if form != "request" else names)
        if form == "reversed":
            pairs = list(zip(record.feature_names, record.feature_values, strict=True))[::-1]
            del record.feature_names[:], record.feature_values[:]
            record.feature_names.extend(n for n, _ in pairs)
            record.feature_values.extend(v for _, v in pairs)
        elif form == "names only":
            del record.feature_values[:]
        records.append(record)
    blobs = [tx.SerializeToString() for tx in records]
    from_blobs = TransactionColumns.of(records, blobs, names)
    looked_up = TransactionColumns.of(records, None, names)
    assert [tx.SerializeToString() for tx in records] == blobs  # the records stay as sent
    assert from_blobs.ulb_rows.tolist() == looked_up.ulb_rows.tolist()
    assert from_blobs.other_features.tolist() == looked_up.other_features.tolist()
    np.testing.assert_array_equal(from_blobs.ulb_values, looked_up.ulb_values)
    # Wherever the values carry their true names, V1..V28 rows are the map form's rows.
    maps = TransactionColumns.of([tx for tx, _ in batch])
    true_names = [i for i, (_, form) in enumerate(batch) if form in ("own", "reversed")]
    if names == list(TX_ULB.columns[:-1]):
        true_names = [i for i, (_, form) in enumerate(batch) if form != "names only"]
    map_rows = dict(zip(maps.ulb_rows.tolist(), maps.ulb_values, strict=True))
    value_rows = dict(zip(from_blobs.ulb_rows.tolist(), from_blobs.ulb_values, strict=True))
    for i in true_names:
        assert (i in map_rows) == (i in value_rows), i
        if i in map_rows:
            np.testing.assert_array_equal(map_rows[i], value_rows[i])
    suspects = set(transaction_suspects(from_blobs))
    rejected = {i for i, tx in enumerate(records) if validate_transaction(tx, names) is not None}
    assert rejected <= suspects


def test_feature_values_are_checked_record_by_record() -> None:
    v = list(TX_ULB.columns[:-1])

    def values(
        tx: feed_service_pb2.Transaction, vals: list[float], own: list[str] | None = None
    ) -> str | None:
        tx.feature_values.extend(vals)
        if own is not None:
            tx.feature_names.extend(own)
        return validate_transaction(tx, v)

    assert values(_tx(), [1.0] * 28) is None
    assert values(_tx(), [1.0, 2.0], ["a", "b"]) is None
    assert (
        values(_tx(), [1.0] * 27)
        == "feature_values has 27 values for the 28 names of the request's feature_names"
    )
    assert (
        values(_tx(), [1.0], ["a", "b"]) == "feature_values has 1 values for the 2 names of its feature_names"
    )
    assert values(_tx(), [1.0, 2.0], ["a", "a"]) == "feature 'a' is named twice"
    assert values(_tx(), [1.0, 2.0], ["a", ""]) == "a feature name is empty"
    assert values(_tx(), [1.0, math.nan], ["a", "b"]) == "feature 'b' is not a finite number"
    both = _tx()
    both.features["a"] = 1.0
    assert values(both, [1.0], ["a"]) == "feature 'a' is given twice (in features and feature_values)"
    assert validate_transaction(_as_values(_tx(), None), []) is None  # no values, no names


@settings(max_examples=300, deadline=None)
@given(batch=st.lists(_ticks(), max_size=12), stored=st.sampled_from([None, 1_700_000_002 * 10**9]))
def test_column_checks_pass_a_tick_batch_only_when_validation_accepts_every_tick(
    batch: list[feed_service_pb2.Tick], stored: int | None
) -> None:
    latest: dict[tuple[str, str], int] = {}
    rejected = 0
    for tick in batch:
        key = (tick.feed_id, tick.symbol)
        if validate_tick(tick, latest.get(key, stored if tick.symbol else None)) is None:
            latest[key] = tick.time.seconds * 10**9 + tick.time.nanos
        else:
            rejected += 1
    if not ticks_need_checking(TickColumns.of(batch), lambda feed, symbol: stored):
        assert rejected == 0


def test_streams_answer_batch_by_batch_in_order_and_score_as_the_scorers_do(tmp_path: Path) -> None:
    """A client that sends the next request only after the answer to the one before gets every
    answer (batches are read ahead, never waited for); a tick batch prepared while the one before
    was being stored is still checked against it; scores equal the scorers' own on the same
    records, across feeds sharing a batch."""
    from auris.agent.signing import ModelTrust
    from auris.collector.feed_models import TickScorer, TransactionScorer
    from auris.v1 import feed_service_pb2_grpc
    from tests.conftest import MODELS

    ulb = _fixture_records(
        "ulb-sample.csv",
        FileFormat(
            "transactions", "x", {"Time": "time", "Amount": "amount"}, ["Class"], rest_as_features=True
        ),
    )
    txs: list[feed_service_pb2.Transaction] = []
    for i, tx in enumerate(ulb):
        assert isinstance(tx, feed_service_pb2.Transaction)
        tx.feed_id = "ab"[i % 2]
        txs.append(tx)
    bars = [
        b
        for b in _fixture_records("bars-sample.csv", FileFormat("ticks", "bars"))
        if isinstance(b, feed_service_pb2.Tick)
    ]
    tx_batches = [txs[i : i + 50] for i in range(0, len(txs), 50)]
    # The third bar batch repeats the last bar of the second: rejected, whichever batch was stored.
    bar_batches = [bars[:150], bars[150:300], [bars[299], *bars[300:400]]]

    def lockstep(requests: list, answered: list) -> Iterator:  # type: ignore[type-arg]
        for sent, request in enumerate(requests, 1):
            yield request
            deadline = time.monotonic() + 30
            while len(answered) < sent:
                assert time.monotonic() < deadline, "no answer before the next request"
                time.sleep(0.005)

    with (
        running_collector(tmp_path / "auris.db", feed_models_dir=str(MODELS / "feeds")) as collector,
        grpc.insecure_channel(collector.address) as channel,
    ):
        stub = feed_service_pb2_grpc.FeedServiceStub(channel)
        tx_answers: list[feed_service_pb2.StreamTransactionsResponse] = []
        requests = [feed_service_pb2.StreamTransactionsRequest(transactions=b) for b in tx_batches]
        for answer in stub.StreamTransactions(lockstep(requests, tx_answers), timeout=60):
            tx_answers.append(answer)
        bar_answers: list[feed_service_pb2.StreamTicksResponse] = []
        tick_requests = [feed_service_pb2.StreamTicksRequest(ticks=b) for b in bar_batches]
        # Sent all at once: batches are read ahead of the one being stored.
        bar_answers = list(stub.StreamTicks(iter(tick_requests), timeout=60))

    assert [a.accepted for a in tx_answers] == [len(b) for b in tx_batches]
    assert [a.accepted for a in bar_answers] == [150, 150, 100]
    (reject,) = bar_answers[2].rejected
    assert reject.index == 0
    assert "does not increase" in reject.reason
    trust = ModelTrust.load([])
    for feed in "ab":
        scorer = TransactionScorer.load(MODELS / "feeds", trust)
        mine = [tx for tx in txs if tx.feed_id == feed]
        want = [(r.record_id, r.score, r.explanation) for r in scorer.score(mine)]
        got = [
            (s.record_id, s.score, s.explanation) for a in tx_answers for s in a.scores if s.feed_id == feed
        ]
        assert len(got) == len(mine)
        assert got == want
    tick_scorer = TickScorer.load(MODELS / "feeds", trust)
    want_bars = [(r.record_id, r.score, r.explanation) for r in tick_scorer.score(bars[:400])]
    got_bars = [(s.record_id, s.score, s.explanation) for a in bar_answers for s in a.scores]
    assert got_bars == want_bars


def test_ticks_are_stored_as_the_bytes_the_client_sent(tmp_path: Path) -> None:
    """A tick request read without protobuf objects stores each tick's bytes as they came (here
    with their fields in reverse order, which protobuf would re-serialise in order); a request
    that reader leaves to protobuf (a field this collector does not know) is stored as protobuf
    re-serialises it. Both are accepted and scored."""
    from tests.conftest import MODELS

    bars = [
        b
        for b in _fixture_records("bars-sample.csv", FileFormat("ticks", "bars"))
        if isinstance(b, feed_service_pb2.Tick)
    ][:120]

    def reversed_fields(tick: feed_service_pb2.Tick) -> bytes:
        fields = [feed_service_pb2.Tick(**{f.name: v}).SerializeToString() for f, v in tick.ListFields()]
        return b"".join(fields[::-1])

    sent = [reversed_fields(tick) for tick in bars[:60]]
    assert all(feed_service_pb2.Tick.FromString(b) == t for b, t in zip(sent, bars, strict=False))
    assert sent[0] != bars[0].SerializeToString()
    unknown = varint(15 << 3) + varint(1)  # field 15, a varint
    later = [tick.SerializeToString() + unknown for tick in bars[60:]]
    requests = [b"".join(length_delimited(b"\x0a", tick) for tick in batch) for batch in (sent, later)]
    with (
        running_collector(tmp_path / "auris.db", feed_models_dir=str(MODELS / "feeds")) as collector,
        grpc.insecure_channel(collector.address) as channel,
    ):
        call = channel.stream_stream("/auris.v1.FeedService/StreamTicks", None, None)
        replies = call(iter(requests), timeout=60)
        answers = [feed_service_pb2.StreamTicksResponse.FromString(reply) for reply in replies]
    assert [a.accepted for a in answers] == [60, 60]
    assert sum(1 for a in answers for s in a.scores if s.model.model_id) == 120
    with contextlib.closing(sqlite3.connect(tmp_path / "auris.db")) as conn:
        stored = [blob for (blob,) in conn.execute("SELECT record_pb FROM feed_records ORDER BY id")]
    assert stored[:60] == sent
    assert stored[60:] == [feed_service_pb2.Tick.FromString(b).SerializeToString() for b in later]


def test_answers_carry_the_scores_the_request_asks_for(tmp_path: Path) -> None:
    """ANSWER_SCORES_ANOMALOUS answers with the anomalous records' scores only and NONE with none;
    either way every record is stored with its score and published to subscribers, and the
    default answers with all."""
    from auris.v1 import feed_service_pb2_grpc
    from tests.conftest import MODELS

    txs = [
        tx
        for tx in _fixture_records(
            "ulb-sample.csv",
            FileFormat(
                "transactions", "x", {"Time": "time", "Amount": "amount"}, ["Class"], rest_as_features=True
            ),
        )
        if isinstance(tx, feed_service_pb2.Transaction)
    ]
    assert len(txs) >= 60
    batches = [txs[i : i + 20] for i in range(0, 60, 20)]
    modes = [
        feed_service_pb2.ANSWER_SCORES_ANOMALOUS,
        feed_service_pb2.ANSWER_SCORES_NONE,
        feed_service_pb2.ANSWER_SCORES_UNSPECIFIED,
    ]
    with (
        running_collector(tmp_path / "auris.db", feed_models_dir=str(MODELS / "feeds")) as collector,
        CollectorClient(collector.address, insecure=True) as client,
        grpc.insecure_channel(collector.address) as channel,
    ):
        seen: list[feed_service_pb2.FeedScore] = []
        stream = client.subscribe_feed_scores("x")

        def follow() -> None:
            with contextlib.suppress(grpc.RpcError):  # the collector stops at the end of the test
                for score in stream:
                    seen.append(score)

        threading.Thread(target=follow, daemon=True).start()
        running = collector.collector
        assert running is not None
        assert wait_for(lambda: running.feed_broker.active, 10)
        stub = feed_service_pb2_grpc.FeedServiceStub(channel)
        answers = [
            stub.SubmitTransactions(
                feed_service_pb2.SubmitTransactionsRequest(transactions=batch, answer_scores=mode),
                timeout=30,
            )
            for batch, mode in zip(batches, modes, strict=True)
        ]
        assert wait_for(lambda: len(seen) == 60, 10)
        stored = {s.record_id: s for s in client.feed_scores("x")}
    assert [a.accepted for a in answers] == [20, 20, 20]
    anomalous = [s.record_id for s in seen[:20] if s.anomalous]
    assert anomalous, "the fixture's frauds: some records of the first batch are anomalous"
    assert [s.record_id for s in answers[0].scores] == anomalous
    assert all(s.model.model_id and s.id for s in answers[0].scores)
    assert len(answers[1].scores) == 0
    assert [s.record_id for s in answers[2].scores] == [s.record_id for s in seen[40:]]
    assert len(stored) == 60
    assert all(stored[s.record_id].score == s.score for s in seen)
    # Without subscribers (nor alert rules) only the anomalous records' scores are built at all.
    with (
        running_collector(tmp_path / "quiet.db", feed_models_dir=str(MODELS / "feeds")) as collector,
        grpc.insecure_channel(collector.address) as channel,
    ):
        quiet = feed_service_pb2_grpc.FeedServiceStub(channel).SubmitTransactions(
            feed_service_pb2.SubmitTransactionsRequest(transactions=batches[0], answer_scores=modes[0]),
            timeout=30,
        )
    assert quiet.accepted == 20
    assert [(s.record_id, s.score, s.explanation) for s in quiet.scores] == [
        (s.record_id, s.score, s.explanation) for s in answers[0].scores
    ]


_FEED_COLUMNS = ["kind", "record_id", "entity", "time_ns", "received_ns", "model_id", "model_version",
                 "score", "anomalous", "explanation", "record_pb"]  # fmt: skip
_STORED = (
    f"SELECT {', '.join(f'typeof({c}), {c}' for c in _FEED_COLUMNS)} FROM feed_records WHERE feed_id = ?"
    " ORDER BY id"
)


@pytest.fixture(scope="module")
def feed_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VerdictStore, FeedStore]]:
    store = VerdictStore(tmp_path_factory.mktemp("feed-store") / "auris.db")
    yield store, FeedStore(store)
    store.close()


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(
        st.tuples(
            st.text(),
            st.one_of(st.sampled_from(["s", "t", "ü"]), st.text()),  # symbols repeat
            st.integers(-(2**63), 2**63 - 1),
            st.binary(),
            st.one_of(
                st.none(),
                st.builds(
                    Scored,
                    st.sampled_from(["tx-ulb-gb", "tick-local-z", "ünïcode"]),
                    st.sampled_from(["1", "2"]),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.booleans(),
                    st.text(),
                ),
            ),
        ),
        min_size=1,
        max_size=8,
    ),
    feed_id=st.text(min_size=1),
    limits=st.sampled_from([None, (1, 1 << 20), (8, 40)]),
    kind=st.sampled_from([TICKS, TRANSACTIONS]),
    split=st.integers(0, 8),
)
@example(  # scores JSON cannot carry, beside ones it can: every one stored as bound
    records=[("a", "s", 1, b"x", Scored("m", "1", x, False, "")) for x in (1, math.inf, -math.inf, math.nan)],
    feed_id="f",
    limits=None,
    kind=TICKS,
    split=0,
)
@example(
    records=[("a\x00b", "s", 1, b"", None), ("c", "s", 2, b"y", None), ("d", "t", 3, b"", None)],
    feed_id="f",
    limits=None,
    kind=TICKS,
    split=1,
)
@example(  # a symbol JSON cannot carry to SQLite
    records=[("a", "\x00", 1, b"", None), ("b", "\x00", 2, b"", None)],
    feed_id="f",
    limits=None,
    kind=TICKS,
    split=1,
)
def test_a_batch_is_stored_as_row_by_row_inserts_store_it(
    feed_store: tuple[VerdictStore, FeedStore],
    records: list[tuple[str, str, int, bytes, Scored | None]],
    feed_id: str,
    limits: tuple[int, int] | None,
    kind: int,
    split: int,
) -> None:
    """A batch goes to SQLite in as few statements as its size allows (rows as JSON, records as one
    blob): what it stores (any text, NUL and non-ASCII included, any time, score, blob; one model
    or several; cut into statements by record bytes, or row by row past a text size) is what
    inserting the rows one by one with bound values stores, type for type, in the batch's order.
    Each tick links to its symbol's record before it, also across batches, and the feed's symbols
    and totals are noted."""
    from auris.collector import feeds as module

    store, feeds = feed_store
    with store.writing() as conn:
        for table in ("feed_records", "feed_symbols", "feed_totals"):
            conn.execute(f"DELETE FROM {table}")
    before = module._STATEMENT_BYTES, module._TEXT_LIMIT
    answer = []
    try:
        if limits is not None:
            module._STATEMENT_BYTES, module._TEXT_LIMIT = limits
        for part in (records[:split], records[split:]):
            if part:
                answer += feeds.add(feed_id, kind, part, [], 7)[0]
    finally:
        module._STATEMENT_BYTES, module._TEXT_LIMIT = before
    with store.writing() as conn:
        conn.executemany(
            module._INSERT_ROWS,
            [(None, f"row by row {feed_id}", kind, rid, entity, time_ns, 7, s.model_id if s else "",
              s.model_version if s else "", s.score if s else None, bool(s and s.anomalous),
              s.explanation if s else "", blob, None)
             for rid, entity, time_ns, blob, s in records],
        )  # fmt: skip
    read = store.reader().execute
    stored = read(_STORED, (feed_id,)).fetchall()
    assert stored == read(_STORED, (f"row by row {feed_id}",)).fetchall()
    assert [row[1::2] for row in stored] == [
        (kind, rid, entity, time_ns, 7, s.model_id if s else "", s.model_version if s else "",
         None if s is None or math.isnan(s.score) else s.score, int(bool(s and s.anomalous)),
         s.explanation if s else "", blob)
        for rid, entity, time_ns, blob, s in records
    ]  # fmt: skip
    ids = [row[0] for row in read("SELECT id FROM feed_records WHERE feed_id = ? ORDER BY id", (feed_id,))]
    assert [(a.id, a.record_id) for a in answer] == list(zip(ids, (r[0] for r in records), strict=True))
    # The links, the symbols' latest and the feed's totals, from the records as sent.
    last: dict[str, int] = {}
    links: list[int | None] = []
    for row_id, (_, entity, _, _, _) in zip(ids, records, strict=True):
        links.append(last.get(entity) if kind == TICKS else None)
        last[entity] = row_id
    linked = read("SELECT prev_id FROM feed_records WHERE feed_id = ? ORDER BY id", (feed_id,))
    assert [prev for (prev,) in linked] == links
    # A symbol's latest time: its last tick's in a batch (ticks' times increase within a symbol),
    # kept where an earlier batch's was later.
    latest: dict[str, int] = {}
    for part in (records[:split], records[split:]):
        for entity, time_ns in {r[1]: r[2] for r in part}.items():
            latest[entity] = max(time_ns, latest.get(entity, time_ns))
    symbols = {entity: (latest[entity], last[entity]) for entity in last} if kind == TICKS else {}
    noted = read("SELECT entity, latest_ns, last_id FROM feed_symbols WHERE feed_id = ?", (feed_id,))
    assert {entity: (latest, last_id) for entity, latest, last_id in noted} == symbols
    totals = read("SELECT kind, records, latest_ns FROM feed_totals WHERE feed_id = ?", (feed_id,))
    assert totals.fetchall() == [(kind, len(records), max(r[2] for r in records))]


def test_a_symbols_ticks_are_walked_back_along_their_links(tmp_path: Path) -> None:
    """The warm-up reads each symbol's last bars along the links from its latest record, past
    other symbols' rows; a link to a record that is not the symbol's (rows deleted, their ids
    taken again) ends the walk."""
    store = VerdictStore(tmp_path / "auris.db")
    feeds = FeedStore(store)
    for start in range(0, 40, 8):  # A and B interleaved, 8 ticks a batch
        batch = [(f"r{i}", "AB"[i % 2], i, feed_service_pb2.Tick(symbol="AB"[i % 2], is_bar=True,
                  close=float(i)).SerializeToString(), None) for i in range(start, start + 8)]  # fmt: skip
        feeds.add("f", TICKS, batch, [], 1)
    walked = {chunk[0].symbol: [t.close for t in chunk] for chunk in feeds.recent_ticks("f", 7, 60.0)}
    assert walked == {"A": [float(i) for i in range(26, 40, 2)], "B": [float(i) for i in range(27, 40, 2)]}
    with store.writing() as conn:  # A's record of close 30 replaced by one of B under its id
        row_id, prev_id = conn.execute(
            "SELECT id, prev_id FROM feed_records WHERE record_id = 'r30'"
        ).fetchone()
        conn.execute("DELETE FROM feed_records WHERE id = ?", (row_id,))
        conn.execute(
            "INSERT INTO feed_records SELECT ?, feed_id, kind, 'x', 'B', time_ns, received_ns, model_id,"
            " model_version, score, anomalous, explanation, record_pb, ? FROM feed_records"
            " WHERE record_id = 'r31'",
            (row_id, prev_id),  # linked on to A's records
        )
    walked = {chunk[0].symbol: [t.close for t in chunk] for chunk in feeds.recent_ticks("f", 7, 60.0)}
    assert walked["A"] == [32.0, 34.0, 36.0, 38.0]
    with store.writing() as conn:  # a link that does not go back (a deleted latest id taken again)
        conn.execute("UPDATE feed_records SET prev_id = id WHERE record_id = 'r38'")
    walked = {chunk[0].symbol: [t.close for t in chunk] for chunk in feeds.recent_ticks("f", 7, 60.0)}
    assert walked["A"] == [38.0]
    store.close()


def test_migration_14_ends_each_symbols_links_at_its_last_record(tmp_path: Path) -> None:
    """Ticks of one symbol at one time (stored before validation said otherwise) are linked in
    (time, id) order by the migration, and the symbol's latest is the last of them."""
    store = VerdictStore(tmp_path / "auris.db")
    bar = feed_service_pb2.Tick(symbol="S", is_bar=True)
    ticks = []
    for i, time_ns in enumerate([10, 15, 15]):
        bar.close = float(i)
        ticks.append((f"r{i}", "S", time_ns, bar.SerializeToString(), None))
    FeedStore(store).add("f", TICKS, ticks, [], 1)
    store.close()
    _as_schema_13(tmp_path / "auris.db")
    store = VerdictStore(tmp_path / "auris.db")
    assert [
        close for chunk in FeedStore(store).recent_ticks("f", 10, 60.0) for close in (t.close for t in chunk)
    ] == [0.0, 1.0, 2.0]
    assert store.reader().execute("SELECT latest_ns, last_id FROM feed_symbols").fetchall() == [(15, 3)]
    store.close()


def test_a_stream_stores_nothing_behind_a_batch_that_failed(tmp_path: Path) -> None:
    """A stream whose second batch fails to store (the alert rules raising in its transaction)
    ends with that error, and the batches sent behind it are neither scored nor stored: the client
    resends from the failed batch, and every tick is accepted once, in order."""
    from concurrent.futures import ThreadPoolExecutor

    from auris.collector.broker import Broker
    from auris.collector.feeds import FeedServicer

    store = VerdictStore(tmp_path / "auris.db")
    stores: list[int] = []

    def alert_rules(
        conn: sqlite3.Connection, scores: list[feed_service_pb2.FeedScore], now_ns: int
    ) -> list[int]:
        stores.append(len(scores))
        if len(stores) == 2:
            raise RuntimeError("alert rules failed")
        return []

    feeds = FeedStore(store, on_store=alert_rules, wants_scores=lambda: True)
    writer, preparer, scorer, answerer = (ThreadPoolExecutor(1) for _ in range(4))
    servicer = FeedServicer(
        feeds, writer, writer, Broker(16, 4), preparer=preparer, scorer=scorer, answerer=answerer
    )

    def batch(i: int) -> feed_service_pb2.StreamTicksRequest:
        request = feed_service_pb2.StreamTicksRequest()
        for j in range(5):
            tick = request.ticks.add(feed_id="f", symbol="S", price=1.0 + j, size=1.0)
            tick.time.FromSeconds(1_700_000_000 + 5 * i + j)
        return request

    async def send(first: int) -> list[object]:
        async def requests() -> AsyncIterator[feed_service_pb2.StreamTicksRequest]:
            for i in range(first, 4):
                yield batch(i)

        answers: list[object] = []
        stream = servicer._stream(TICKS, requests(), None, feed_service_pb2.StreamTicksResponse)  # type: ignore[arg-type]
        try:
            async for answer in stream:
                answers.append(answer.accepted)
        except RuntimeError as exc:
            answers.append(str(exc))
        for stage in (preparer, scorer, writer, answerer):  # what is still in the pipeline goes through
            await asyncio.get_running_loop().run_in_executor(stage, lambda: None)
        return answers

    def stored() -> list[int]:
        rows = store.reader().execute("SELECT time_ns FROM feed_records ORDER BY id")
        return [t // 1_000_000_000 - 1_700_000_000 for (t,) in rows]

    assert asyncio.run(send(0)) == [5, "alert rules failed"]
    assert stored() == list(range(5))
    assert asyncio.run(send(1)) == [5, 5, 5]
    assert stored() == list(range(20))
    for pool in (preparer, scorer, writer, answerer):
        pool.shutdown()
    store.close()


def test_an_answer_keeps_its_feeds_order_while_alert_rules_come(tmp_path: Path) -> None:
    """A batch of two feeds stored while feed alert rules appear (SIGHUP) between them: the answer
    still has the first feed's scores, then the second's; the second's went to the rules."""
    from auris.collector.feeds import FeedRows

    store = VerdictStore(tmp_path / "auris.db")
    asked: list[bool] = []
    seen: list[list[str]] = []

    def rules(conn: sqlite3.Connection, scores: list[feed_service_pb2.FeedScore], now: int) -> list[int]:
        seen.append([s.record_id for s in scores])
        return []

    def wants() -> bool:  # no rules for the first feed, rules by the second
        asked.append(True)
        return len(asked) > 1

    feeds = FeedStore(store, rules, wants)
    answer = feed_service_pb2.StreamTicksResponse()
    later: list[Callable[[], None]] = []
    for feed, symbol in (("A", "a"), ("B", "b")):
        rows = FeedRows([f"{symbol}@{i}" for i in range(3)], [symbol] * 3, [100, 101, 102], [0] * 3,
                        [b"x"] * 3, ["m"] * 3, ["1"] * 3, [0.5] * 3, [False] * 3, [""] * 3)  # fmt: skip
        feeds.add_rows(feed, TICKS, rows, [], 1, answer, later=later)
    for fill in later:
        fill()
    store.close()
    assert [(s.feed_id, s.record_id) for s in answer.scores] == [
        ("A", "a@0"), ("A", "a@1"), ("A", "a@2"), ("B", "b@0"), ("B", "b@1"), ("B", "b@2"),
    ]  # fmt: skip
    assert seen == [["b@0", "b@1", "b@2"]]
