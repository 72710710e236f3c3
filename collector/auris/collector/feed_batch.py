"""A batch of feed records as columns.

Validation and the scorers read a batch's fields from these arrays and lists, filled in one pass
over the protobuf messages, rather than each walking the messages (and a transaction's feature
map) on its own: per-record attribute access is most of what a batch costs in Python.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from google.protobuf.unknown_fields import UnknownFieldSet

from auris.agent.wire import field_tag, varint
from auris.collector.feed_features import TX_ULB
from auris.collector.feed_wire import DecodedTicks, DecodedTransactions
from auris.v1 import feed_service_pb2

__all__ = ["ULB_VALUE_NAMES", "TickColumns", "TransactionColumns"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Rows = npt.NDArray[np.intp]
Mask = npt.NDArray[np.bool_]

_V_COLUMNS = TX_ULB.columns[:-1]
# The names a request gives its records' feature_values when they are V1..V28 of the ULB set.
ULB_VALUE_NAMES = _V_COLUMNS
_GET_V = operator.itemgetter(*_V_COLUMNS)
# How a record's 28 packed feature_values end its serialisation when no field after them is set:
# their tag (length-delimited), the byte length, then little-endian doubles.
_PACKED_V_HEADER = field_tag(feed_service_pb2.Transaction, "feature_values") + varint(8 * len(_V_COLUMNS))
_PACKED_V_SIZE = len(_PACKED_V_HEADER) + 8 * len(_V_COLUMNS)


class _Times:
    """Record times of a batch of columns (seconds and nanos since the epoch)."""

    seconds: I64
    nanos: I64

    @property
    def times_s(self) -> F64:
        # As seconds + nanos * 1e-9 in Python floats: the same double for every record.
        return self.seconds.astype(np.float64) + self.nanos * 1e-9

    @property
    def time_ns(self) -> I64:
        """Nanoseconds since the epoch (meaningful for records whose time is in range)."""
        return self.seconds * 1_000_000_000 + self.nanos


@dataclasses.dataclass
class TransactionColumns(_Times):
    """A batch of transactions as columns, read from the messages in one pass: what validation
    and the scorer look at, so that neither walks the messages (and their feature maps) again."""

    transaction_ids: list[str]
    feed_ids: list[str]
    customers: list[str]
    terminals: list[str]
    seconds: I64
    nanos: I64
    # 0.0 where the field is missing (validation tells the two apart on the message).
    amounts: F64
    # Records whose features hold V1..V28, and those values in that order.
    ulb_rows: Rows
    ulb_values: F64
    # Records with features other than exactly V1..V28 (not all of them are in ulb_values).
    other_features: Rows

    @classmethod
    def of(
        cls,
        transactions: Sequence[feed_service_pb2.Transaction],
        blobs: Sequence[bytes] | None = None,
        names: Sequence[str] = (),
    ) -> TransactionColumns:
        """The columns of ``transactions``; ``names`` name the feature_values of records that do
        not name their own (the request's feature_names).

        With ``blobs`` (each record serialised), V1..V28 given as a map are read by indexing,
        which inserts a missing key: a record found changed that way is restored from its blob;
        given as feature_values, they are read from the end of the blob, where a record's packed
        values are serialised last (checked on each blob's bytes; any other record is read value
        by value). Without blobs, each value is looked up (slower), the records untouched."""
        n = len(transactions)
        stamps = [tx.time for tx in transactions]
        width = len(_V_COLUMNS)
        request_ulb = tuple(names) == _V_COLUMNS
        ulb_rows: list[int] = []
        ulb_values: list[float] = []
        packed_rows: list[int] = []  # V1..V28 as feature_values, from the blobs' tails
        packed_tails: list[bytes] = []
        other: list[int] = []
        for i, tx in enumerate(transactions):
            values, own = tx.feature_values, tx.feature_names
            if values or own:
                named = own or names
                exact = (own and tuple(own) == _V_COLUMNS) or (not own and request_ulb)
                if exact and len(values) == width and not tx.features:
                    # Known fields serialise in field-number order, unknown ones after them: with
                    # neither feature_names nor unknown fields set, the packed values come last.
                    tail = blobs[i][-_PACKED_V_SIZE:] if blobs is not None and not own else b""
                    if tail[: len(_PACKED_V_HEADER)] == _PACKED_V_HEADER and not len(UnknownFieldSet(tx)):
                        packed_rows.append(i)
                        packed_tails.append(tail[len(_PACKED_V_HEADER) :])
                    else:
                        ulb_rows.append(i)
                        ulb_values += values
                    continue
                # Anything else is checked on the record; V1..V28 found by name among its values
                # and its map (as a map holding them all would be) still go to their model.
                other.append(i)
                if len(named) == len(values):
                    found = dict(tx.features)
                    found.update(zip(named, values, strict=True))
                    if all(name in found for name in _V_COLUMNS):
                        ulb_rows.append(i)
                        ulb_values += _GET_V(found)
                continue
            features = tx.features
            size = len(features)
            if size >= width:
                if blobs is not None:
                    got = _GET_V(features)
                    if len(features) != size:  # keys were missing (and are now inserted)
                        tx.ParseFromString(blobs[i])
                        other.append(i)
                        continue
                else:
                    looked = list(map(features.get, _V_COLUMNS))
                    if None in looked:
                        other.append(i)
                        continue
                    got = looked
                ulb_rows.append(i)
                ulb_values += got
                if size != width:
                    other.append(i)
            elif size:
                other.append(i)
        values_array = np.asarray(ulb_values, dtype=np.float64).reshape(len(ulb_rows), width)
        rows = np.asarray(ulb_rows, dtype=np.intp)
        if packed_rows:
            packed = np.frombuffer(b"".join(packed_tails), dtype="<f8").reshape(len(packed_rows), width)
            rows = np.concatenate([rows, np.asarray(packed_rows, dtype=np.intp)])
            values_array = np.concatenate([values_array, packed])
            order = np.argsort(rows, kind="stable")
            rows, values_array = rows[order], values_array[order]
        return cls(
            [tx.transaction_id for tx in transactions],
            [tx.feed_id for tx in transactions],
            [tx.customer_id for tx in transactions],
            [tx.terminal_id for tx in transactions],
            np.fromiter((s.seconds for s in stamps), np.int64, n),
            np.fromiter((s.nanos for s in stamps), np.int64, n),
            np.fromiter((tx.amount for tx in transactions), np.float64, n),
            rows,
            values_array,
            np.asarray(other, dtype=np.intp),
        )

    @classmethod
    def decoded(cls, records: DecodedTransactions) -> TransactionColumns:
        """The columns of a request ``feed_wire.decode_transactions`` read (``of``'s, without
        messages): it reads feature_values only as V1..V28, named by the request."""
        return cls(
            records.transaction_ids, records.feed_ids, records.customers, records.terminals,
            records.seconds, records.nanos, records.amounts, records.valued,
            records.values.reshape(len(records.valued), len(_V_COLUMNS)), np.zeros(0, dtype=np.intp),
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.transaction_ids)

    def take(self, rows: Rows) -> TransactionColumns:
        """The records at ``rows`` (increasing), as columns of their own."""
        pick = rows.tolist()
        keep = np.zeros(len(self), dtype=np.intp) - 1
        keep[rows] = np.arange(len(rows))
        ulb_kept = keep[self.ulb_rows] >= 0
        other = keep[self.other_features]
        return TransactionColumns(
            [self.transaction_ids[i] for i in pick],
            [self.feed_ids[i] for i in pick],
            [self.customers[i] for i in pick],
            [self.terminals[i] for i in pick],
            self.seconds[rows],
            self.nanos[rows],
            self.amounts[rows],
            keep[self.ulb_rows[ulb_kept]],
            self.ulb_values[ulb_kept],
            other[other >= 0],
        )


@dataclasses.dataclass
class TickColumns(_Times):
    """A batch of ticks as columns, read from the messages in one pass (missing optional fields
    read 0.0; validation tells them apart on the message)."""

    feed_ids: list[str]
    symbols: list[str]
    seconds: I64
    nanos: I64
    is_bar: Mask
    open: F64
    high: F64
    low: F64
    close: F64
    volume: F64
    price: F64
    size: F64

    @classmethod
    def of(cls, ticks: Sequence[feed_service_pb2.Tick]) -> TickColumns:
        n = len(ticks)
        stamps = [t.time for t in ticks]
        bars = np.fromiter((t.is_bar for t in ticks), np.bool_, n)
        # Bars and trades read different fields: each only those of its kind (zeros elsewhere).
        bar_ticks = [ticks[i] for i in np.flatnonzero(bars).tolist()] if bars.any() else []
        trade_ticks = [ticks[i] for i in np.flatnonzero(~bars).tolist()] if not bars.all() else []

        def column(records: list[feed_service_pb2.Tick], mask: Mask, name: str) -> F64:
            out = np.zeros(n)
            if records:
                out[mask] = np.fromiter(map(operator.attrgetter(name), records), np.float64, len(records))
            return out

        return cls(
            [t.feed_id for t in ticks],
            [t.symbol for t in ticks],
            np.fromiter((s.seconds for s in stamps), np.int64, n),
            np.fromiter((s.nanos for s in stamps), np.int64, n),
            bars,
            *(column(bar_ticks, bars, name) for name in ("open", "high", "low", "close", "volume")),
            *(column(trade_ticks, ~bars, name) for name in ("price", "size")),
        )

    @classmethod
    def decoded(cls, ticks: DecodedTicks) -> TickColumns:
        """The columns of a request ``feed_wire.decode_ticks`` read (``of``'s, without messages)."""
        bars = ticks.is_bar
        v = ticks.doubles
        bar_values = (np.where(bars, v[:, k], 0.0) for k in range(2, 7))
        trade_values = (np.where(bars, 0.0, v[:, k]) for k in range(2))
        times = (ticks.seconds, ticks.nanos)
        return cls(ticks.feed_ids, ticks.symbols, *times, bars, *bar_values, *trade_values)

    def __len__(self) -> int:
        return len(self.symbols)

    def take(self, rows: Rows) -> TickColumns:
        pick = rows.tolist()
        return TickColumns(
            [self.feed_ids[i] for i in pick],
            [self.symbols[i] for i in pick],
            *(getattr(self, f.name)[rows] for f in dataclasses.fields(self)[2:]),
        )
