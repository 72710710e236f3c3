"""Feed files: CSV (plain or gzip) and Parquet rows turned into Transaction and Tick records.

Columns map onto record fields by name (case-insensitive; ``--map COLUMN=FIELD`` for others).
A column that maps to nothing is an error for the whole file unless it is ignored or, for
transactions, taken as a numeric feature (``rest_as_features``): nothing is dropped silently.
A row whose value does not parse (a missing or non-numeric field, a bad time) is reported
with its row number (the header is row 1) and skipped; the rest of the file goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import gzip
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from auris.v1 import feed_service_pb2

__all__ = ["TICK_FIELDS", "TRANSACTION_FIELDS", "FeedFileError", "FileFormat", "open_records", "read_records"]

TRANSACTION_FIELDS = ("transaction_id", "time", "customer_id", "terminal_id", "amount")
TICK_FIELDS = ("symbol", "time", "price", "size", "open", "high", "low", "close", "volume")
_NUMERIC = {"amount", "price", "size", "open", "high", "low", "close", "volume"}
# Common column names of public data sets.
_ALIASES = {"ts": "time", "timestamp": "time", "tx_datetime": "time", "tx_amount": "amount",
            "customer": "customer_id", "terminal": "terminal_id", "tx_id": "transaction_id"}  # fmt: skip


class FeedFileError(ValueError):
    """The file cannot be read as asked (one line: line breaks from the file are escaped)."""

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


@dataclasses.dataclass(frozen=True)
class FileFormat:
    kind: str  # "transactions" or "ticks"
    feed_id: str
    # Column -> field, beyond names and aliases.
    mapping: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignore: Sequence[str] = ()
    # Transactions: unmapped numeric columns become features (ULB's V1..V28).
    rest_as_features: bool = False
    # Ticks: the symbol of every row when the file has no symbol column.
    symbol: str = ""
    # Numeric times: seconds, ms, us or ns since the epoch.
    time_unit: str = "s"


_UNIT = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}


def _time_ns(value: Any, unit: str) -> int:
    """A time in ns since the epoch; ValueError unless it is one SQLite can hold (1678 to 2261)."""
    ns = _parse_time_ns(value, unit)
    if not -(2**63) <= ns < 2**63:
        raise ValueError(f"time {str(value)[:40]!r} is out of range (years 1678 to 2261)")
    return ns


def _parse_time_ns(value: Any, unit: str) -> int:
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return int(stamp.timestamp()) * 1_000_000_000 + stamp.microsecond * 1000
    if isinstance(value, int | float):
        if not math.isfinite(value) or not math.isfinite(value * _UNIT[unit]):
            raise ValueError(f"time {value!r} is not a finite number")
        return int(value * _UNIT[unit])
    text = str(value).strip()
    if not text:
        raise ValueError("time is missing")
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return _parse_time_ns(number, unit)
    try:
        return _parse_time_ns(dt.datetime.fromisoformat(text), unit)
    except ValueError:
        raise ValueError(f"time {text[:40]!r} is neither a number nor an ISO 8601 time") from None


def _number(field: str, value: Any) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{field} is missing")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field} {str(value)[:40]!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{field} is not a finite number")
    return number


def _columns(header: Sequence[str], fmt: FileFormat) -> tuple[dict[str, str], list[str]]:
    """Column -> field for the known ones, and the feature columns; FeedFileError for the rest."""
    fields = TRANSACTION_FIELDS if fmt.kind == "transactions" else TICK_FIELDS
    explicit = {k: v for k, v in fmt.mapping.items()}
    bad = [v for v in explicit.values() if v not in fields]
    if bad:
        raise FeedFileError(f"--map names unknown field {bad[0]!r} (fields: {', '.join(fields)})")
    mapped: dict[str, str] = {}
    features: list[str] = []
    ignored = {c.lower() for c in fmt.ignore}
    for column in header:
        low = column.strip().lower()
        field = explicit.get(column) or (low if low in fields else _ALIASES.get(low, ""))
        if field in fields:
            mapped[column] = field
        elif low in ignored:
            continue
        elif fmt.kind == "transactions" and fmt.rest_as_features:
            features.append(column)
        else:
            raise FeedFileError(
                f"unknown column {column!r}: map it (--map {column}=FIELD), ignore it (--ignore {column})"
                + (" or take the rest as features (--rest-as-features)" if fmt.kind == "transactions" else "")
            )
    return mapped, features


def _rows(path: Path) -> tuple[list[str], Iterator[Sequence[Any]]]:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
            header = list(table.schema_arrow.names)
        except (OSError, pa.ArrowException) as exc:
            # ArrowInvalid for a file that is not Parquet at all (an empty one, say).
            raise FeedFileError(f"{path}: not a readable Parquet file ({exc})") from None

        def parquet_rows() -> Iterator[Sequence[Any]]:
            try:
                for batch in table.iter_batches(batch_size=10_000):
                    columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
                    yield from zip(*columns, strict=True)
            except pa.ArrowException as exc:  # corrupt data past the footer: the rows so far stand
                raise OSError(f"unreadable Parquet data: {exc}") from None

        return header, parquet_rows()
    try:
        text = gzip.open(path, "rt", newline="") if path.suffix == ".gz" else path.open(newline="")  # noqa: SIM115  # read lazily by the caller
    except OSError as exc:
        raise FeedFileError(f"{path}: {exc.strerror}") from None
    reader = csv.reader(text)
    try:
        header = next(reader)
    except (StopIteration, OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FeedFileError(f"{path}: no header row ({exc or 'empty file'})") from None
    return header, reader


Record = feed_service_pb2.Transaction | feed_service_pb2.Tick


def read_records(path: Path, fmt: FileFormat) -> Iterator[tuple[int, Record | str]]:
    """(row number, record or the reason the row is skipped), in file order; transactions' features
    in their map. FeedFileError when the file cannot be read as ``fmt`` says."""
    return open_records(path, fmt)[1]


def open_records(
    path: Path, fmt: FileFormat, *, packed: bool = False
) -> tuple[list[str], Iterator[tuple[int, Record | str]]]:
    """The names of the records' feature_values, and the rows as ``read_records`` gives them. With
    ``packed``, transactions carry their features as feature_values in the file's column order
    (named once per request by those names), unless a feature column has no name (a pandas
    index, say: the collector takes that only as a map key); else maps, and no names. The header
    is checked here: FeedFileError when the file cannot be read as ``fmt`` says."""
    header, rows = _rows(path)
    mapped, features = _columns(header, fmt)
    fields = set(mapped.values())
    if "time" not in fields:
        raise FeedFileError(f"{path}: no time column (map one with --map COLUMN=time)")
    if fmt.kind == "ticks" and "symbol" not in fields and not fmt.symbol:
        raise FeedFileError(f"{path}: no symbol column: pass --symbol")
    if len(set(features)) != len(features):
        twice = next(c for c in features if features.count(c) > 1)
        raise FeedFileError(f"{path}: feature column {twice!r} appears more than once in the header")
    is_bar = {"open", "high", "low", "close", "volume"} <= fields
    index = {c: i for i, c in enumerate(header)}
    packed = packed and "" not in features

    def records() -> Iterator[tuple[int, Record | str]]:
        number = 1
        try:
            for number, row in enumerate(rows, start=2):
                if len(row) != len(header):
                    yield number, f"row has {len(row)} fields, the header {len(header)}"
                    continue
                try:
                    yield number, _record(row, index, mapped, features, fmt, number, is_bar, packed)
                except ValueError as exc:
                    yield number, str(exc)
        except (csv.Error, UnicodeDecodeError, OSError) as exc:
            yield number + 1, f"unreadable row ({exc})"

    return features if packed else [], records()


def _record(
    row: Sequence[Any],
    index: Mapping[str, int],
    mapped: Mapping[str, str],
    features: Sequence[str],
    fmt: FileFormat,
    number: int,
    is_bar: bool,
    packed: bool = False,
) -> Record:
    values = {field: row[index[column]] for column, field in mapped.items()}
    time_ns = _time_ns(values["time"], fmt.time_unit)
    if fmt.kind == "transactions":
        tx = feed_service_pb2.Transaction(
            feed_id=fmt.feed_id,
            transaction_id=str(values.get("transaction_id") or f"row-{number}"),
            customer_id=str(values.get("customer_id") or ""),
            terminal_id=str(values.get("terminal_id") or ""),
            amount=_number("amount", values.get("amount")),
        )
        tx.time.FromNanoseconds(time_ns)
        cells = [row[index[column]] for column in features]
        try:  # the common case in one pass; any doubt goes value by value for the reason
            numbers = list(map(float, cells))
            if not all(map(math.isfinite, numbers)):
                raise ValueError
        except (TypeError, ValueError):
            numbers = [_number(column, cell) for column, cell in zip(features, cells, strict=True)]
        if packed:
            tx.feature_values.extend(numbers)
        else:
            tx.features.update(zip(features, numbers, strict=True))
        return tx
    tick = feed_service_pb2.Tick(
        feed_id=fmt.feed_id, symbol=str(values.get("symbol") or fmt.symbol), is_bar=is_bar
    )
    tick.time.FromNanoseconds(time_ns)
    for field in ("open", "high", "low", "close", "volume") if is_bar else ("price", "size"):
        setattr(tick, field, _number(field, values.get(field)))
    return tick
