"""Offline scoring of a feed file: ``aurisctl feed score KIND FILE --out OUT``.

The same code as live ingest, without a collector: ``feed_files.open_records`` reads the rows,
``feeds.validate_transaction`` / ``validate_tick`` check them, and the feed models score them
through ``TransactionScorer`` / ``TickScorer`` with their windows built as the file goes (the file
is one feed, in time order). The output has one row per input row, in input order:

- ``row``: the input row number (the header is row 1); ``record_id``; ``entity`` (customer or
  symbol); ``time`` (ISO 8601, UTC);
- ``status``: ``scored``, ``rejected`` (``reason`` says why, as ingest would), or ``unscored``
  (no loaded model scores this record, or a trade whose bar never closed with a score);
- ``model`` (id@version), ``score``, ``anomalous``, ``explanation``;
- ``bar``: for trade ticks, the id of the one-minute bar the trade belongs to, whose score the
  trade carries (a trade bar is scored when it closes; the last ones when the file ends).

The format follows ``OUT``'s suffix: ``.csv`` (default), ``.jsonl`` / ``.json`` (JSON lines),
``.parquet``; ``-`` writes CSV to standard output.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as dt
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from auris.collector.feed_features import trade_bar_start_ns
from auris.collector.feed_files import FileFormat, open_records
from auris.collector.feed_models import FeedResult, TickScorer, TransactionScorer
from auris.collector.feeds import tick_record_id, validate_tick, validate_transaction
from auris.v1 import feed_service_pb2

__all__ = ["COLUMNS", "OfflineSummary", "score_file"]

COLUMNS = ("row", "record_id", "entity", "time", "status", "reason", "model", "score", "anomalous",
           "explanation", "bar")  # fmt: skip


@dataclasses.dataclass
class OfflineSummary:
    rows: int = 0
    scored: int = 0
    anomalous: int = 0
    rejected: int = 0
    unscored: int = 0
    seconds: float = 0.0
    # (row number, reason) of the first rejected rows.
    first_rejects: list[tuple[int, str]] = dataclasses.field(default_factory=list)


def _iso(time_ns: int) -> str:
    stamp = dt.datetime.fromtimestamp(time_ns // 1_000_000_000, dt.UTC).replace(
        microsecond=(time_ns % 1_000_000_000) // 1000
    )
    return stamp.isoformat().replace("+00:00", "Z")


class _Writer:
    """Rows to CSV, JSON lines or Parquet, by the output's suffix."""

    def __init__(self, out: Path | None, stdout: TextIO) -> None:
        self._parquet: Any = None
        self._buffer: list[dict[str, Any]] = []
        self._json = False
        self._file: TextIO
        if out is None:
            self._file = stdout
            self._own = False
        else:
            suffix = out.suffix.lower()
            self._own = True
            if suffix == ".parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                self._schema = pa.schema(
                    [("row", pa.int64()), ("record_id", pa.string()), ("entity", pa.string()),
                     ("time", pa.string()), ("status", pa.string()), ("reason", pa.string()),
                     ("model", pa.string()), ("score", pa.float64()), ("anomalous", pa.bool_()),
                     ("explanation", pa.string()), ("bar", pa.string())]
                )  # fmt: skip
                self._parquet = pq.ParquetWriter(out, self._schema)
                return
            self._json = suffix in (".jsonl", ".json", ".ndjson")
            self._file = out.open("w", newline="", encoding="utf-8")
        if not self._json:
            self._csv = csv.DictWriter(self._file, COLUMNS)
            self._csv.writeheader()

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        if self._parquet is not None:
            self._buffer.extend(rows)
            if len(self._buffer) >= 65_536:
                self._flush_parquet()
        elif self._json:
            for row in rows:
                score = row["score"]
                clean = {**row, "score": None if score is None or math.isnan(score) else score}
                self._file.write(json.dumps(clean, separators=(",", ":")) + "\n")
        else:
            self._csv.writerows(rows)

    def _flush_parquet(self) -> None:
        import pyarrow as pa

        if self._buffer:
            self._parquet.write_table(pa.Table.from_pylist(self._buffer, schema=self._schema))
            self._buffer = []

    def close(self) -> None:
        if self._parquet is not None:
            self._flush_parquet()
            self._parquet.close()
        elif self._own:
            self._file.close()
        else:
            self._file.flush()


def _row(number: int, record_id: str, entity: str, time_ns: int | None) -> dict[str, Any]:
    return {"row": number, "record_id": record_id, "entity": entity,
            "time": _iso(time_ns) if time_ns is not None else "", "status": "unscored", "reason": "",
            "model": "", "score": None, "anomalous": None, "explanation": "", "bar": ""}  # fmt: skip


def _fill(row: dict[str, Any], result: FeedResult) -> None:
    row.update(status="scored", model=f"{result.model_id}@{result.model_version}", score=result.score,
               anomalous=result.anomalous, explanation=result.explanation)  # fmt: skip


def score_file(
    path: Path,
    fmt: FileFormat,
    scorer: TransactionScorer | TickScorer,
    out: Path | None,
    *,
    batch: int = 4096,
    stdout: TextIO = sys.stdout,
    progress: Callable[[int], None] | None = None,
) -> OfflineSummary:
    """Score every row of ``path`` with ``scorer``; write one output row per input row to ``out``
    (standard output when None). FeedFileError when the file cannot be read as asked."""
    summary = OfflineSummary()
    started = time.monotonic()
    names, rows = open_records(path, fmt, packed=True)
    first = next(rows, None)  # a file that cannot be read as asked fails here, before any output
    writer = _Writer(out, stdout)
    # Output rows in input order; a trade waits (with the rows after it) until its bar is scored.
    pending: collections.deque[tuple[dict[str, Any], str]] = collections.deque()
    bar_results: dict[str, FeedResult] = {}
    last_tick: dict[str, int] = {}
    records: list[tuple[dict[str, Any], Any]] = []

    def count(row: dict[str, Any]) -> None:
        status = row["status"]
        if status == "scored":
            summary.scored += 1
            summary.anomalous += bool(row["anomalous"])
        elif status == "rejected":
            summary.rejected += 1
            if len(summary.first_rejects) < 20:
                summary.first_rejects.append((row["row"], row["reason"]))
        else:
            summary.unscored += 1

    def release(final: bool = False) -> None:
        done: list[dict[str, Any]] = []
        while pending:
            row, bar = pending[0]
            if bar:
                result = bar_results.get(bar)
                if result is None and not final:
                    break
                if result is not None:
                    _fill(row, result)
            pending.popleft()
            count(row)
            done.append(row)
        writer.write(done)

    def score(batch_records: list[tuple[dict[str, Any], Any]]) -> None:
        if not batch_records:
            return
        messages = [record for _, record in batch_records]
        if isinstance(scorer, TransactionScorer):
            for (row, _), result in zip(batch_records, scorer.score_aligned(messages, names), strict=True):
                if result is not None:
                    _fill(row, result)
        else:
            for result in scorer.score(messages):
                row, record = batch_records[result.index]
                if record.is_bar:
                    _fill(row, result)
                else:
                    bar_results[result.record_id] = result
        release()

    try:
        stream: Iterable[tuple[int, Any]] = _chain(first, rows) if first is not None else ()
        for number, record in stream:
            summary.rows += 1
            if isinstance(record, str):
                row = _row(number, "", "", None)
                row.update(status="rejected", reason=record)
                pending.append((row, ""))
                continue
            reason: str | None
            if isinstance(record, feed_service_pb2.Transaction):
                row = _row(number, record.transaction_id, record.customer_id, record.time.ToNanoseconds())
                reason = validate_transaction(record, names)
                bar = ""
            else:
                row = _row(number, tick_record_id(record), record.symbol, record.time.ToNanoseconds())
                reason = validate_tick(record, last_tick.get(record.symbol))
                bar = ""
                if reason is None:
                    last_tick[record.symbol] = record.time.ToNanoseconds()
                    if not record.is_bar and isinstance(scorer, TickScorer):
                        t_s = record.time.seconds + record.time.nanos * 1e-9
                        bar = f"{record.symbol}@{trade_bar_start_ns(t_s, scorer.trades.seconds)}"
                        row["bar"] = bar
            if reason is not None:
                row.update(status="rejected", reason=reason)
                pending.append((row, ""))
                continue
            pending.append((row, bar))
            records.append((row, record))
            if len(records) >= batch:
                score(records)
                records = []
                if progress is not None:
                    progress(summary.rows)
        score(records)
        if isinstance(scorer, TickScorer):
            for result in scorer.flush():
                bar_results[result.record_id] = result
        release(final=True)
    finally:
        writer.close()
    summary.seconds = time.monotonic() - started
    return summary


def _chain(first: tuple[int, Any], rest: Iterable[tuple[int, Any]]) -> Iterable[tuple[int, Any]]:
    yield first
    yield from rest


def load_scorer(
    kind: str, models: Path, trust: Any, *, detector: str | None = None, threads: int = 1
) -> TransactionScorer | TickScorer:
    """The scorer ``aurisctl feed score`` uses: the feed models in ``models`` (ManifestError or
    ValueError, one line, when none is usable)."""
    if kind == "transactions":
        tx = TransactionScorer.load(models, trust, threads=threads)
        if not tx.models:
            why = "; ".join(tx.refused) or "none found"
            raise ValueError(f"{models}: no usable transaction model ({why})")
        return tx
    return TickScorer.load(models, trust, detector=detector, threads=threads)


def summary_lines(summary: OfflineSummary, path: Path, out: str) -> Sequence[str]:
    rate = summary.rows / summary.seconds if summary.seconds else 0.0
    lines = [
        f"{path}: {summary.rows:,} rows in {summary.seconds:.1f}s ({rate:,.0f} rows/s): {summary.scored:,}"
        f" scored ({summary.anomalous:,} anomalous), {summary.rejected:,} rejected,"
        f" {summary.unscored:,} unscored -> {out}"
    ]
    lines += [f"  row {number}: {reason}" for number, reason in summary.first_rejects]
    if summary.rejected > len(summary.first_rejects):
        lines.append(f"  ... {summary.rejected - len(summary.first_rejects)} more rejected rows in {out}")
    return lines
