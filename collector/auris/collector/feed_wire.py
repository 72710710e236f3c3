"""Protobuf's wire format for a batch of feed records at once, with numpy.

Both ways cost the collector a few dozen array operations a batch where the protobuf API costs
Python per field and record, with the GIL held (``tests/test_feed_wire.py`` holds each to
protobuf's own reading and writing, on any rows and any bytes):

- ``encode_scores``: an ingest answer's FeedScores, which the answer parses in one call (setting
  ten fields on each message cost ~1.7 us a record; this ~0.7, and upb's parse ~0.1).
- ``decode_ticks`` / ``decode_transactions``: a request's records into columns, read from its
  bytes (reading them from the parsed messages cost 1.3-2.7 us a tick; this ~0.8).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from auris.agent.wire import length_delimited

__all__ = ["DecodedTicks", "DecodedTransactions", "decode_ticks", "decode_transactions", "encode_scores"]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
Mask = npt.NDArray[np.bool_]

# Wire types.
_VARINT, _FIXED64, _DELIMITED = 0, 1, 2
# The largest value a varint of k bytes holds, k = 1..9 (10 bytes hold the rest).
_VARINT_LIMITS = np.array([(1 << (7 * k)) - 1 for k in range(1, 10)], dtype=np.uint64)


def _tag(number: int, wire_type: int) -> int:
    tag = number << 3 | wire_type
    assert tag < 0x80, "one-byte tags only (fields 1 to 15)"
    return tag


def _varint_lengths(values: U64) -> I64:
    """Bytes of each value's varint (1 to 10)."""
    lengths: I64 = np.searchsorted(_VARINT_LIMITS, values, side="left").astype(np.int64) + 1
    return lengths


_SHIFTS = np.arange(0, 70, 7, dtype=np.uint64)


def _put_varints(out: U8, at: I64, values: U64, lengths: I64) -> None:
    """Write each value's varint (``lengths`` bytes) at its position."""
    v = values.copy()
    for k in range(int(lengths.max()) if len(lengths) else 0):
        if k:
            keep = lengths > k
            at, v, lengths = at[keep], v[keep], lengths[keep]
        more = (lengths > k + 1).astype(np.uint8) << 7
        out[at + k] = (v & np.uint64(0x7F)).astype(np.uint8) | more
        v >>= np.uint64(7)


def _put_block(out: U8, at: I64, block: U8) -> None:
    """Write row i of a (rows, width) block at ``at[i]``."""
    out[at[:, None] + np.arange(block.shape[1])] = block


class _Strings:
    """A column of strings as UTF-8: the bytes one after the other, and each one's length."""

    def __init__(self, values: Sequence[str]) -> None:
        joined = "".join(values)
        if joined.isascii():
            raw = joined.encode("ascii")
            self.lengths: I64 = np.fromiter(map(len, values), np.int64, len(values))
        else:
            encoded = [value.encode("utf-8") for value in values]
            raw = b"".join(encoded)
            self.lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        self.data: U8 = np.frombuffer(raw, dtype=np.uint8)
        self.prefix = _varint_lengths(self.lengths.astype(np.uint64))

    def field_sizes(self) -> I64:
        """Bytes of each value as a length-delimited field (0 where it is empty: left unset)."""
        n = self.lengths
        sizes: I64 = np.where(n > 0, 1 + self.prefix + n, 0)
        return sizes

    def put(self, out: U8, at: I64, number: int) -> None:
        """Write the non-empty values as field ``number`` at their positions."""
        n = self.lengths
        if not n.all():
            if not n.any():
                return
            set_ = n > 0
            at, n, prefix = at[set_], n[set_], self.prefix[set_]
        else:
            prefix = self.prefix
        out[at] = _tag(number, _DELIMITED)
        if prefix.max() == 1:
            out[at + 1] = n
        else:
            _put_varints(out, at + 1, n.astype(np.uint64), prefix)
        # Row i's bytes go to at[i] + 1 + prefix[i] onwards.
        total = int(n.sum())
        starts = np.cumsum(n) - n
        out[np.repeat(at + 1 + prefix - starts, n) + np.arange(total)] = self.data


def encode_scores(
    field: int,
    feed_id: str,
    ids: I64,
    record_ids: Sequence[str],
    entities: Sequence[str],
    seconds: I64,
    nanos: I64,
    models: Sequence[bytes],
    model: I64,
    scores: npt.NDArray[np.float64],
    anomalous: Mask,
    explanations: Sequence[str],
) -> bytes:
    """FeedScores as the entries of repeated field ``field`` of an answer: bytes that
    ``MergeFromString`` appends to that field, one message a row, in order.

    ``models`` are encoded ModelRefs, ``model`` indexes them per row (-1: no model, the field is
    left unset). Fields at their proto3 default are left out, except ``time``, which is always
    set; a score is written as given (NaN for a record no model scored). The fields of a message
    are not in field-number order (the wire format allows any): those the same in every row
    come first."""
    n = len(ids)
    if n == 0:
        return b""
    feed = length_delimited(bytes([_tag(1, _DELIMITED)]), feed_id.encode("utf-8")) if feed_id else b""
    record, entity, text = _Strings(record_ids), _Strings(entities), _Strings(explanations)
    sec_u = seconds.astype(np.int64).view(np.uint64)
    nanos_u = nanos.astype(np.int64).view(np.uint64)
    sec_size = np.where(sec_u != 0, 1 + _varint_lengths(sec_u), 0)
    nanos_size = np.where(nanos_u != 0, 1 + _varint_lengths(nanos_u), 0)
    stamp_body = sec_size + nanos_size  # under 128 bytes
    ids_u = ids.astype(np.uint64)
    id_size = np.where(ids_u != 0, 1 + _varint_lengths(ids_u), 0)
    refs = [length_delimited(bytes([_tag(4, _DELIMITED)]), ref) for ref in models]
    one_model = len(refs) == 1 and bool((model == 0).all())
    model_sizes = np.zeros(n, dtype=np.int64) if one_model else np.array([*map(len, refs), 0])[model]
    # Per row: the fields every row has the same (feed, model when one, the score's tag), the
    # score, then those that vary.
    fixed = np.frombuffer(feed + (refs[0] if one_model else b"") + bytes([_tag(5, _FIXED64)]), np.uint8)
    varying = (
        2 + stamp_body,  # 3 time
        id_size,  # 8 id
        record.field_sizes(),  # 2 record_id
        entity.field_sizes(),  # 9 entity
        text.field_sizes(),  # 7 explanation
        np.where(anomalous, 2, 0),  # 6 anomalous
        model_sizes,  # 4 model, when rows differ
    )
    body = len(fixed) + 8 + np.sum(varying, axis=0)
    body_size = _varint_lengths(body.astype(np.uint64))
    entry = 1 + body_size + body
    starts = np.cumsum(entry) - entry
    out = np.empty(int(entry.sum()), dtype=np.uint8)
    out[starts] = _tag(field, _DELIMITED)
    _put_varints(out, starts + 1, body.astype(np.uint64), body_size)
    at = starts + 1 + body_size
    block = np.empty((n, len(fixed) + 8), dtype=np.uint8)
    block[:, : len(fixed)] = fixed
    block[:, len(fixed) :] = scores.astype("<f8").view(np.uint8).reshape(n, 8)
    _put_block(out, at, block)
    at = at + block.shape[1]
    out[at] = _tag(3, _DELIMITED)
    out[at + 1] = stamp_body
    rows = sec_size > 0
    out[at[rows] + 2] = _tag(1, _VARINT)
    _put_varints(out, at[rows] + 3, sec_u[rows], sec_size[rows] - 1)
    rows = nanos_size > 0
    if rows.any():
        nanos_at = at[rows] + 2 + sec_size[rows]
        out[nanos_at] = _tag(2, _VARINT)
        _put_varints(out, nanos_at + 1, nanos_u[rows], nanos_size[rows] - 1)
    at = at + varying[0]
    rows = id_size > 0
    out[at[rows]] = _tag(8, _VARINT)
    _put_varints(out, at[rows] + 1, ids_u[rows], id_size[rows] - 1)
    at = at + varying[1]
    record.put(out, at, 2)
    at = at + varying[2]
    entity.put(out, at, 9)
    at = at + varying[3]
    text.put(out, at, 7)
    at = at + varying[4]
    if anomalous.any():
        out[at[anomalous]] = _tag(6, _VARINT)
        out[at[anomalous] + 1] = 1
    at = at + varying[5]
    set_ = model_sizes > 0
    if set_.any():
        chosen = [refs[k] for k in model[set_].tolist()]
        data = np.frombuffer(b"".join(chosen), np.uint8)
        sizes = model_sizes[set_]
        out[np.repeat(at[set_] - (np.cumsum(sizes) - sizes), sizes) + np.arange(len(data))] = data
    return out.tobytes()


# Reading ticks.
#
# A tick request is read field by field in lockstep over all its ticks: step k reads every
# tick's k-th field with array operations. Anything outside the shapes the protobuf encoders
# write for these messages (an unknown field, a string or time given twice, more fields than
# an encoder writes, a wire type a field does not have, a varint over 64 bits) makes
# ``decode_ticks`` give up and return None: the caller then reads the request with protobuf,
# which also reports a malformed one. Where this reads a request, protobuf reads the same values.


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What the reader takes of a message type: each field's wire type (-1: a field it leaves to
    protobuf), each fixed64 field's column among the doubles it returns, the most fields it reads
    in one message (each step costs the same whatever the batch, and a field may repeat without
    end: an encoder writes each once)."""

    wire: I64
    column: I64
    most_fields: int

    @property
    def fields(self) -> int:
        """Slots a message's fields take (the highest field number read, plus one): fields past
        it are left to protobuf before any slot is looked at."""
        return int(np.flatnonzero(self.wire >= 0).max()) + 1

    @classmethod
    def of(cls, delimited: Sequence[int], fixed64: Sequence[int], varint: Sequence[int] = ()) -> _Layout:
        wire = np.full(16, -1, dtype=np.int64)
        column = np.full(16, -1, dtype=np.int64)
        wire[list(delimited)] = _DELIMITED
        wire[list(fixed64)] = _FIXED64
        column[list(fixed64)] = np.arange(len(fixed64))
        wire[list(varint)] = _VARINT
        return cls(wire, column, 2 * (len(delimited) + len(fixed64) + len(varint)) + 2)


# Tick: 1 feed_id, 2 symbol, 3 time, 4-10 price, size, open, high, low, close, volume, 11 is_bar.
_TICK = _Layout.of(delimited=(1, 2, 3), fixed64=range(4, 11), varint=(11,))
# Transaction: 1 feed_id, 2 transaction_id, 3 time, 4 customer_id, 5 terminal_id, 6 amount,
# 8 feature_values (packed); the features map (7) and feature_names (9) are left to protobuf.
_TRANSACTION = _Layout.of(delimited=(1, 2, 3, 4, 5, 8), fixed64=(6,))
# Timestamp: 1 seconds, 2 nanos.
_TIME_WIRE = np.full(16, -1, dtype=np.int64)
_TIME_WIRE[[1, 2]] = _VARINT
# The longest string read as an array of fixed width; longer ones are sliced one by one.
_WIDE = 64
# Fields read in one time at most (an encoder writes 2).
_MOST_TIME_FIELDS = 4


@dataclasses.dataclass
class DecodedTicks:
    """A tick request's fields as columns (``feed_batch.TickColumns``' layout: 0.0 for a double
    not set, 0 s 0 ns for a time not set), where each tick's bytes lie in the request, and the
    request's answer_scores."""

    feed_ids: list[str]
    symbols: list[str]
    seconds: I64
    nanos: I64
    is_bar: Mask
    # Columns price, size, open, high, low, close, volume (fields 4 to 10).
    doubles: npt.NDArray[np.float64]
    starts: I64
    ends: I64
    answer_scores: int


def _walk_request(raw: bytes, skipped: int = -1) -> tuple[list[int], list[int], int] | None:
    """Where each record (field 1) of a request lies, and its answer_scores (field 2); a
    length-delimited field tagged ``skipped`` is passed over (the request's feature_names)."""
    starts: list[int] = []
    ends: list[int] = []
    add_start, add_end = starts.append, ends.append
    answer, answered = 0, False
    pos, end = 0, len(raw)
    try:
        while pos < end:
            tag = raw[pos]
            if tag == 0x0A:
                n = raw[pos + 1]
                pos += 2
                if n & 0x80:  # records of 128 bytes to 16 KiB take two bytes
                    more = raw[pos]
                    if more & 0x80:
                        n, pos = _varint_at(raw, pos - 1)
                    else:
                        n = (n & 0x7F) | more << 7
                        pos += 1
                add_start(pos)
                pos += n
                add_end(pos)
            elif tag == 0x10 and not answered:  # more than once: left to protobuf
                answer, pos = _varint_at(raw, pos + 1)
                answered = True
            elif tag == skipped:
                n, pos = _varint_at(raw, pos + 1)
                pos += n
            else:
                return None
    except IndexError:
        return None
    if pos != end or answer >= 1 << 31:
        return None
    return starts, ends, answer


def _varint_at(raw: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (IndexError past the end, or over 64
    bits)."""
    value = shift = 0
    for i in range(pos, pos + 10):
        byte = raw[i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if i == pos + 9 and byte > 1:  # over 64 bits: left to protobuf
                break
            return value, i + 1
    raise IndexError("varint over 64 bits")


def _read_varints(buf: U8, at: I64) -> tuple[U64, I64] | None:
    """The varints at ``at`` (in a buffer padded with zero bytes) and their lengths; None where
    one is over 64 bits."""
    if not len(at):
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    groups = buf[at[:, None] + np.arange(10)]
    last = groups < 0x80
    if not last.any(axis=1).all():
        return None
    lengths = last.argmax(axis=1) + 1
    if ((lengths == 10) & (groups[:, 9] > 1)).any():  # over 64 bits: left to protobuf
        return None
    bits = (groups & 0x7F).astype(np.uint64) << _SHIFTS
    bits[np.arange(10)[None, :] >= lengths[:, None]] = 0
    values: U64 = np.bitwise_or.reduce(bits, axis=1)
    return values, lengths.astype(np.int64)


def _strings(raw: bytes, buf: U8, at: I64, lengths: I64) -> list[str] | None:
    """UTF-8 strings at ``at`` of ``lengths`` bytes; None where one is not valid UTF-8. Short ones
    without a NUL (the fixed-width bytes type drops trailing NULs) are decoded once per distinct
    value."""
    try:
        if len(at) and lengths.max() <= _WIDE:
            width = max(int(lengths.max()), 1)
            inside = np.arange(width)[None, :] < lengths[:, None]
            grid = buf[at[:, None] + np.arange(width)]
            grid[~inside] = 0
            if grid[inside].all():
                keys, inverse = np.unique(grid.view(f"S{width}").ravel(), return_inverse=True)
                names = np.array([key.decode("utf-8") for key in keys.tolist()], dtype=object)
                decoded: list[str] = names[inverse.ravel()].tolist()
                return decoded
        spans = zip(at.tolist(), lengths.tolist(), strict=True)
        return [raw[a : a + k].decode("utf-8") for a, k in spans]
    except UnicodeDecodeError:
        return None


@dataclasses.dataclass
class _Fields:
    """The fields of a batch of messages: fixed64 ones as doubles (0.0 where not set), varint ones
    as their value (one byte at most), and where each length-delimited one lies (start, length;
    0 where not set) with how many times each message has it."""

    doubles: npt.NDArray[np.float64]
    flags: U8
    spans: I64
    seen: I64


def _read_field(
    buf: U8, at: I64, rows: I64 | slice, tag: int, layout: _Layout, got: _Fields
) -> I64 | int | None:
    """Read one field (``tag``) of the messages ``rows`` at ``at``; the bytes it takes (per row, or
    one number for all), or None where the reader gives up."""
    field, wire = tag >> 3, tag & 7
    if tag >= 0x80 or layout.wire[field] != wire:
        return None
    if wire == _FIXED64:
        got.doubles[rows, layout.column[field]] = buf[at[:, None] + np.arange(1, 9)].view("<f8")[:, 0]
        return 9
    if wire == _VARINT:
        value = buf[at + 1]
        if (value >= 0x80).any():
            return None
        got.flags[rows, field] = value
        return 2
    size = buf[at + 1].astype(np.int64)
    prefix = np.ones(len(at), dtype=np.int64)
    if (size >= 0x80).any():  # a length over one byte (128 bytes and more)
        read = _read_varints(buf, at + 1)
        if read is None or (read[0] >= 1 << 31).any():
            return None
        size, prefix = read[0].astype(np.int64), read[1]
    got.spans[rows, field, 0] = at + 1 + prefix
    got.spans[rows, field, 1] = size
    got.seen[rows, field] += 1
    step: I64 = 1 + prefix + size
    return step


def _read_messages(buf: U8, starts: I64, ends: I64, layout: _Layout) -> _Fields | None:
    """The fields of the messages at starts..ends, read in lockstep (see above)."""
    n = len(starts)
    got = _Fields(
        np.zeros((n, int(layout.column.max()) + 1)),
        np.zeros((n, layout.fields), dtype=np.uint8),
        np.zeros((n, layout.fields, 2), dtype=np.int64),
        np.zeros((n, layout.fields), dtype=np.int64),
    )
    # The messages still being read: every one (a slice, no gathers) until some have ended.
    rows: I64 | slice = slice(None) if (starts < ends).all() else np.flatnonzero(starts < ends)
    pos = starts.copy()
    for _ in range(layout.most_fields + 1):
        if not len(at := pos[rows]):
            return got
        tag = buf[at]
        if (tag == tag[0]).all():  # the same field in every message still being read: no masks
            step = _read_field(buf, at, rows, int(tag[0]), layout, got)
            if step is None:
                return None
        else:
            index = np.arange(n)[rows]
            step = np.empty(len(at), dtype=np.int64)
            for one in np.unique(tag).tolist():
                these = tag == one
                part = _read_field(buf, at[these], index[these], one, layout, got)
                if part is None:
                    return None
                step[these] = part
        at = at + step
        pos[rows] = at
        ends_here = ends[rows]
        if (at > ends_here).any():
            return None
        going = at < ends_here
        if not going.all():
            rows = np.arange(n)[rows][going]
        if (got.seen > 1).any():  # a field again: protobuf merges messages, checks every string
            return None
    return None  # a message of more fields than an encoder writes


def _read_times(buf: U8, spans: I64) -> tuple[I64, I64] | None:
    """Seconds and nanos (int32, as protobuf keeps them) of the Timestamps at ``spans`` ((start,
    length) rows; 0 s 0 ns where not set)."""
    n = len(spans)
    seconds = np.zeros(n, dtype=np.uint64)
    nanos = np.zeros(n, dtype=np.uint64)
    time_end = spans[:, 0] + spans[:, 1]
    rows = np.flatnonzero(spans[:, 1] > 0)
    pos = spans[:, 0].copy()
    for _ in range(_MOST_TIME_FIELDS + 1):
        if not len(rows):
            return (
                seconds.view(np.int64),
                (nanos & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32).astype(np.int64),
            )
        at = pos[rows]
        tag = buf[at].astype(np.int64)
        if (tag >= 0x80).any() or (_TIME_WIRE[tag >> 3] != (tag & 7)).any():
            return None
        read = _read_varints(buf, at + 1)
        if read is None:
            return None
        values, lengths = read
        first = (tag >> 3) == 1
        seconds[rows[first]] = values[first]
        nanos[rows[~first]] = values[~first]
        pos[rows] = at + 1 + lengths
        if (pos[rows] > time_end[rows]).any():
            return None
        rows = rows[pos[rows] < time_end[rows]]
    return None


def _read_request(raw: bytes, layout: _Layout, skipped: int = -1) -> tuple[U8, I64, I64, _Fields, int] | None:
    """A request's records (field 1) read as ``layout`` says: the request's bytes as an array
    (padded: reads of 10 or _WIDE bytes stay inside), where each record lies, its fields, and the
    request's answer_scores; ``skipped``: see ``_walk_request``."""
    walked = _walk_request(raw, skipped)
    if walked is None:
        return None
    starts, ends = np.asarray(walked[0], dtype=np.int64), np.asarray(walked[1], dtype=np.int64)
    buf = np.frombuffer(raw + bytes(_WIDE), dtype=np.uint8)
    got = _read_messages(buf, starts, ends, layout)
    if got is None:
        return None
    return buf, starts, ends, got, walked[2]


def decode_ticks(raw: bytes) -> DecodedTicks | None:
    """A serialised Submit/StreamTicksRequest as columns, or None to leave it to protobuf."""
    read = _read_request(raw, _TICK)
    if read is None:
        return None
    buf, starts, ends, got, answer = read
    times = _read_times(buf, got.spans[:, 3])
    feed_ids = _strings(raw, buf, got.spans[:, 1, 0], got.spans[:, 1, 1])
    symbols = _strings(raw, buf, got.spans[:, 2, 0], got.spans[:, 2, 1])
    if times is None or feed_ids is None or symbols is None:
        return None
    return DecodedTicks(feed_ids, symbols, *times, got.flags[:, 11] != 0, got.doubles, starts, ends, answer)


@dataclasses.dataclass
class DecodedTransactions:
    """A transaction request's fields as columns (``feed_batch.TransactionColumns``' layout), where
    each record's bytes lie in the request, and which records carry feature_values."""

    transaction_ids: list[str]
    feed_ids: list[str]
    customers: list[str]
    terminals: list[str]
    seconds: I64
    nanos: I64
    # 0.0 where the field is missing.
    amounts: npt.NDArray[np.float64]
    # The records with feature_values, and those values (each record's, in order).
    valued: npt.NDArray[np.intp]
    values: npt.NDArray[np.float64]
    starts: I64
    ends: I64


def decode_transactions(raw: bytes, width: int) -> DecodedTransactions | None:
    """A serialised Submit/StreamTransactionsRequest as columns, or None to leave it to protobuf:
    also when a record has a features map, names of its own, or a number of feature_values other
    than ``width`` (the request's names)."""
    read = _read_request(raw, _TRANSACTION, skipped=0x1A)  # its feature_names: the message has them
    if read is None:
        return None
    buf, starts, ends, got, _ = read
    packed = got.spans[:, 8]
    valued = np.flatnonzero(got.seen[:, 8] > 0)
    if (packed[valued, 1] != 8 * width).any() or (len(valued) and not width):
        return None
    at = packed[valued, 0]
    values = buf[at[:, None] + np.arange(8 * width)].copy().view("<f8") if width else np.zeros((0, 0))
    times = _read_times(buf, got.spans[:, 3])
    strings = [_strings(raw, buf, got.spans[:, k, 0], got.spans[:, k, 1]) for k in (2, 1, 4, 5)]
    if times is None or any(column is None for column in strings):
        return None
    ids, feeds, customers, terminals = (column or [] for column in strings)
    amounts = got.doubles[:, 0]
    values = values.reshape(len(valued), width)
    return DecodedTransactions(
        ids, feeds, customers, terminals, *times, amounts, valued, values, starts, ends
    )
