"""Top talkers from a bounded heavy-hitter summary, per minute of scored time, slice and address.

A minute closes once the newest scored time (never past the collector's clock; the clock itself
once no verdict has arrived for a while) is LATENESS_NS beyond its end. Closing reads the
minute's raw verdicts once and counts, per address, in each of its slices: every verdict (slice
``''``), each agent's (``a:AGENT``), each label's (``l:LABEL``), each deciding model's
(``m:MODEL``) and every anomalous one (``x:``). Each slice keeps, in ``talkers``, the top
addresses by each of four counts (KEEP or KEEP_ANOMALOUS, see _keeps), exactly: flows (each
verdict counts for both of its ends, as the raw query counts them), bytes, anomalies (flows
flagged anomalous) and anomalous bytes. ``talker_minutes`` notes for each
slice and count the most that any address it dropped had: its ``rest`` (no row: nothing
dropped). An address without a row in a closed minute's slice had at most ``rest`` there.

Over a range, an address's kept counts add up to a lower bound of its true counts, and the
rests of the closed minutes where it has no row to its error: the true count lies in
[count, count + error]. It is exact top-K per minute with a bound on the remainder, in the
manner of Misra-Gries and Space-Saving, but exact where it keeps an address and mergeable over
any set of minutes, and over disjoint slices (several agents, several labels). A filter of
``anomalous`` reads the anomalous counts (true) or the others (false) of the same rows, or,
alone, the anomalous slice. The
answer reports the bound (``Talker.*_error``, ``ListTopTalkersResponse.approximate`` and
``omitted_max``). Minutes not closed yet (the newest one or two) are read from the raw rows,
exactly, with the same filter.

Closing is off the ingest path: counting every verdict's two ends per minute in the ingest
transaction cost the writer 3.7 µs a verdict (+35 %; bench/results/collector.md). A thread of
the collector's (VerdictStore.summarise_in_background) reads a minute in a read transaction of
its own and writes its rows in a short write; verdicts of the minute stored in between are
added in that write. A verdict that arrives for a closed minute (an agent's spool, a skewed
clock) is added in its own ingest transaction: to its address's rows, or as ``partial`` rows
(the address may have had up to the slice's rest before); the slice is then closed again:
rows beyond the top ones go, the rest grows to cover them (a partial one with the rest it was
added under). Every bound holds at every commit; only their width depends on the traffic.

Retention (VerdictStore.retain): a minute's summary goes once no raw verdict of it or before it
is left, or, with ``talker_retention_days``, once it is also older than that; a size cap
(``retention_max_mib``) that the raw rows alone cannot meet takes it with the raw rows. Minutes
before SLICED_FROM (a schema-10 summary whose raw rows retention had already taken: every
verdict only, no anomalous bytes) answer unfiltered queries only; filtered ones read the raw
rows there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from auris.v1 import query_service_pb2

__all__ = [
    "ANOMALOUS",
    "KEEP",
    "KEEP_ANOMALOUS",
    "LATENESS_NS",
    "MINUTE_NS",
    "Selection",
    "add_late",
    "backfill",
    "close_due",
    "create",
    "prune",
    "top",
    "upgrade_10",
]

MINUTE_NS = 60_000_000_000
# Addresses a closed minute keeps in each slice for each count. On the benchmark's 10M verdicts
# (417k in the last hour, 7.4k addresses a minute) 64 left the last hour's top-10 exact by every
# count.
KEEP = 64
# ... but in the anomalous slice (``x:``, twice), and by anomalies and anomalous bytes in the slices of
# agents, labels and models: flagged flows are few and spread over many addresses (the
# benchmark's 2 %: ~280 address-ends a minute), and a top 64 left every hour's top 10 of
# anomalous-only, attack-label and one-model queries approximate. The every-verdict slice keeps
# 64 by each: unfiltered queries read it, and each row costs them (256 there: +45 % time).
KEEP_ANOMALOUS = 256


def _keeps(slice_: str) -> tuple[int, int, int, int]:
    """How many addresses ``slice_`` keeps by each count."""
    if slice_ == "":
        return KEEP, KEEP, KEEP, KEEP
    if slice_ == ANOMALOUS:
        # Twice: 256 of each left the benchmark's anomalous-only hour approximate (5 of its 60
        # minutes had a few more flagged addresses), for ~5 rows a minute.
        return (2 * KEEP_ANOMALOUS,) * 4
    return KEEP, KEEP, KEEP_ANOMALOUS, KEEP_ANOMALOUS


# Addresses past the limit whose bounds a query works out before it bounds the rest at once by
# the first one not read (each costs a lookup of the minutes it was kept in).
_CANDIDATES = 200
# How far the newest scored time must be past a minute's end before the minute closes. A later
# verdict still counts, but costs its ingest transaction (~50 % more writer time): at 5 s the
# benchmark's end-to-end ingest, whose agents' scored clocks drift apart, was 30 % slower than
# without the summary; at 60 s, no slower (bench/results/collector.md). Open minutes are read
# from the raw rows by queries: a longer wait costs them.
LATENESS_NS = 60_000_000_000
# Minutes closed in one read transaction of close_due at most: a backlog (a collector that was
# down) goes in short rounds, so the WAL is not held for long and close() does not wait long.
_MINUTES_PER_ROUND = 5
# meta keys: minutes before this time (ns, a whole minute) are closed; minutes from this one
# have every slice and the anomalous bytes.
CLOSED_BEFORE = "talkers_closed_before_ns"
SLICED_FROM = "talkers_sliced_from_ns"
# The slice of every anomalous verdict: its flows are anomalous flows, its bytes theirs.
ANOMALOUS = "x:"
_COUNTS = ("flows", "bytes", "anomalies", "anomalous_bytes")
_RESTS = tuple(f"rest_{c}" for c in _COUNTS)
_FAR = 2**62 // MINUTE_NS * MINUTE_NS

# Every verdict's two ends, and the slices each falls in (the fifth: anomalous verdicts only).
_SIDES = "(SELECT 0 AS side UNION ALL SELECT 1)"
_KINDS = "(SELECT 0 AS kind UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4)"
_SLICE = (
    "CASE kind WHEN 0 THEN '' WHEN 1 THEN 'a:' || agent_id WHEN 2 THEN 'l:' || label"
    f" WHEN 3 THEN 'm:' || model ELSE '{ANOMALOUS}' END"
)
_IN_SLICE = "(kind < 4 OR anomalies > 0)"
# Counts per minute, agent, label, model and address of the verdicts matching {where}.
_FINE = (
    f"SELECT scored_ns / {MINUTE_NS} * {MINUTE_NS} AS minute, agent_id, COALESCE(label, '') AS label,"
    " COALESCE(model_id, '') AS model, CASE side WHEN 0 THEN src_ip ELSE dst_ip END AS ip,"
    " COUNT(*) AS flows, COALESCE(SUM(bytes), 0) AS bytes, COALESCE(SUM(anomalous), 0) AS anomalies,"
    " COALESCE(SUM(bytes * anomalous), 0) AS anomalous_bytes"
    f" FROM verdicts CROSS JOIN {_SIDES} WHERE {{where}} GROUP BY 1, 2, 3, 4, 5"
)
# ... added to the summary; a new row in a minute before the first parameter is partial.
_UPSERT = (
    "INSERT INTO talkers (slice, minute_ns, ip, flows, bytes, anomalies, anomalous_bytes, partial)"
    f" SELECT {_SLICE}, minute, ip, SUM(IIF(kind = 4, anomalies, flows)),"
    " SUM(IIF(kind = 4, anomalous_bytes, bytes)), SUM(anomalies), SUM(anomalous_bytes), minute < ?"
    f" FROM ({_FINE}) CROSS JOIN {_KINDS} WHERE {_IN_SLICE} GROUP BY 1, 2, 3"
    " ON CONFLICT (slice, minute_ns, ip)"
    " DO UPDATE SET flows = flows + excluded.flows, bytes = bytes + excluded.bytes,"
    " anomalies = anomalies + excluded.anomalies,"
    " anomalous_bytes = anomalous_bytes + excluded.anomalous_bytes"
)
# One minute of raw verdicts, counted per agent, label, model and address (summarised by
# _summarise: ranking in SQL, four window sorts over every slice's rows, took ~8x as long).
_IN_MINUTE = f"scored_ns >= :minute AND scored_ns < :minute + {MINUTE_NS}"
_MINUTE_COUNTS = _FINE.format(where=_IN_MINUTE)


def _dropped(slice_: str) -> str:
    """The rows of a closed minute's slice it no longer keeps after late verdicts."""
    kept = " UNION ".join(
        f"SELECT ip FROM (SELECT ip FROM talkers WHERE slice = :slice AND minute_ns = :minute AND {c} > 0"
        f" ORDER BY {c} DESC, ip LIMIT {keep})"
        for c, keep in zip(_COUNTS, _keeps(slice_), strict=True)
    )
    return f"slice = :slice AND minute_ns = :minute AND ip NOT IN ({kept})"


Row = tuple[str, str, int, int, int, int]  # slice, ip, the four counts
Rest = tuple[str, int, int, int, int]  # slice, the four rests
Summary = tuple[list[Row], list[Rest]]


def create(conn: sqlite3.Connection) -> None:
    """The summary's tables (schema 11), empty, no minute closed."""
    conn.execute(
        "CREATE TABLE talkers (slice TEXT NOT NULL, minute_ns INTEGER NOT NULL, ip TEXT NOT NULL,"
        " flows INTEGER NOT NULL, bytes INTEGER NOT NULL, anomalies INTEGER NOT NULL,"
        " anomalous_bytes INTEGER NOT NULL, partial INTEGER NOT NULL,"
        " PRIMARY KEY (slice, minute_ns, ip)) WITHOUT ROWID"
    )
    conn.execute(
        "CREATE TABLE talker_minutes (slice TEXT NOT NULL, minute_ns INTEGER NOT NULL,"
        " rest_flows INTEGER NOT NULL, rest_bytes INTEGER NOT NULL, rest_anomalies INTEGER NOT NULL,"
        " rest_anomalous_bytes INTEGER NOT NULL, PRIMARY KEY (slice, minute_ns)) WITHOUT ROWID"
    )
    for key in (CLOSED_BEFORE, SLICED_FROM):
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '0')", (key,))


def backfill(conn: sqlite3.Connection, now_ns: int) -> int:
    """Close every minute of the verdicts already stored that is due (in the caller's
    transaction); how many."""
    closed, before = _due(conn, now_ns)
    minutes = list(_minutes(conn, closed, before))
    for minute in minutes:
        _store(conn, minute, _summarise(conn, minute))
    _set(conn, CLOSED_BEFORE, before)
    return len(minutes)


def upgrade_10(conn: sqlite3.Connection, now_ns: int) -> int:
    """Schema 10 -> 11 (in the migration's transaction): every closed minute summarised again
    from its raw rows, with slices and anomalous bytes, except those whose raw rows retention
    had already deleted in part: their schema-10 rows are kept as the every-verdict slice, and
    SLICED_FROM begins after them. Then the minutes due are closed; returns how many minutes
    were summarised from raw rows."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'raw_deleted_through_ns'").fetchone()
    (value,) = row or ("-1",)
    deleted_through = int(value)
    sliced_from = (deleted_through // MINUTE_NS + 1) * MINUTE_NS if deleted_through >= 0 else 0
    old_closed = _meta(conn, CLOSED_BEFORE)
    conn.execute("ALTER TABLE talkers RENAME TO talkers_10")
    conn.execute("ALTER TABLE talker_minutes RENAME TO talker_minutes_10")
    create(conn)
    conn.execute(
        "INSERT INTO talkers (slice, minute_ns, ip, flows, bytes, anomalies, anomalous_bytes, partial)"
        " SELECT '', minute_ns, ip, flows, bytes, anomalies, 0, partial FROM talkers_10 WHERE minute_ns < ?",
        (sliced_from,),
    )
    conn.execute(
        "INSERT INTO talker_minutes (slice, minute_ns, rest_flows, rest_bytes, rest_anomalies,"
        " rest_anomalous_bytes) SELECT '', minute_ns, rest_flows, rest_bytes, rest_anomalies, 0"
        " FROM talker_minutes_10 WHERE minute_ns < ?",
        (sliced_from,),
    )
    conn.execute("DROP TABLE talkers_10")
    conn.execute("DROP TABLE talker_minutes_10")
    # Minutes the schema-10 summary had not closed (or had none of) are summarised from what
    # retention left of them, as migration 10 did.
    summarised = 0
    for minute in _minutes(conn, 0, max(old_closed, sliced_from)):
        if minute >= sliced_from or minute >= old_closed:
            _store(conn, minute, _summarise(conn, minute))
            summarised += 1
    _set(conn, CLOSED_BEFORE, max(old_closed, sliced_from))
    _set(conn, SLICED_FROM, sliced_from)
    if _due(conn, now_ns)[1] > max(old_closed, sliced_from):
        summarised += backfill(conn, now_ns)
    return summarised


def close_due(
    reader: sqlite3.Connection,
    writing: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]],
    now_ns: int,
) -> int:
    """Close the minutes that are due (up to _MINUTES_PER_ROUND): summarise them on ``reader`` in
    one read transaction, then store them in one short write transaction from ``writing()``,
    with the verdicts of those minutes stored in between. Returns the minutes closed."""
    reader.execute("BEGIN")
    try:
        closed, before = _due(reader, now_ns)
        if before <= closed:
            return 0
        (snapshot_id,) = reader.execute("SELECT COALESCE(MAX(id), 0) FROM verdicts").fetchone()
        minutes = list(_minutes(reader, closed, before, _MINUTES_PER_ROUND + 1))
        if len(minutes) > _MINUTES_PER_ROUND:
            before = minutes.pop()  # the rest in another round
        summaries = [(minute, _summarise(reader, minute)) for minute in minutes]
    finally:
        reader.execute("COMMIT")
    with writing() as conn:
        if _meta(conn, CLOSED_BEFORE) != closed:
            return 0  # closed meanwhile by another connection
        for minute, summary in summaries:
            _store(conn, minute, summary)
        _set(conn, CLOSED_BEFORE, before)
        _add(conn, snapshot_id, closed, before)
    return len(summaries)


def add_late(conn: sqlite3.Connection, after_id: int, oldest_scored_ns: int) -> None:
    """In the ingest transaction: add the verdicts stored after ``after_id`` (the oldest scored
    at ``oldest_scored_ns``) that belong to closed minutes."""
    closed = _meta(conn, CLOSED_BEFORE)
    if oldest_scored_ns < closed:
        _add(conn, after_id, 0, closed)


def prune(conn: sqlite3.Connection, before_ns: int) -> int:
    """Delete the summary of the minutes that end at or before ``before_ns`` (in the caller's
    transaction); returns the rows deleted."""
    end = before_ns // MINUTE_NS * MINUTE_NS
    deleted = 0
    for table in ("talkers", "talker_minutes"):
        # Slice by slice, so each delete is a range of the primary key.
        for (slice_,) in list(_slices(conn, table)):
            deleted += conn.execute(
                f"DELETE FROM {table} WHERE slice = ? AND minute_ns < ?", (slice_, end)
            ).rowcount
    return deleted


def _slices(conn: sqlite3.Connection, table: str) -> Iterator[tuple[str]]:
    """The distinct slices of ``table``, one index probe each."""
    row = conn.execute(f"SELECT MIN(slice) FROM {table}").fetchone()
    while row is not None and row[0] is not None:
        yield (row[0],)
        row = conn.execute(f"SELECT MIN(slice) FROM {table} WHERE slice > ?", row).fetchone()


def _add(conn: sqlite3.Connection, after_id: int, low: int, high: int) -> None:
    """Add the verdicts after ``after_id`` scored in closed minutes [low, high); close those
    minutes' slices again."""
    # The unary + keeps SQLite off the scored-time index: the new rows are the few to read.
    where = "id > ? AND +scored_ns >= ? AND +scored_ns < ?"
    touched = conn.execute(
        f"SELECT DISTINCT {_SLICE}, minute FROM ({_FINE.format(where=where)}) CROSS JOIN {_KINDS}"
        f" WHERE {_IN_SLICE}",
        (after_id, low, high),
    ).fetchall()
    if touched:
        conn.execute(_UPSERT.format(where=where), (high, after_id, low, high))
        for slice_, minute in touched:
            _close_again(conn, slice_, minute)


def _due(conn: sqlite3.Connection, now_ns: int) -> tuple[int, int]:
    """(closed before, may close before): minutes in between are due.

    Time is the newest scored time (never past the clock), or the clock itself once nothing has
    arrived for LATENESS_NS: a quiet collector closes its newest minute too.
    """
    closed = _meta(conn, CLOSED_BEFORE)
    (newest,) = conn.execute("SELECT MAX(scored_ns) FROM verdicts").fetchone()
    if newest is None:
        return closed, closed
    (received,) = conn.execute("SELECT received_ns FROM verdicts ORDER BY id DESC LIMIT 1").fetchone()
    watermark = now_ns if now_ns - received >= LATENESS_NS else min(newest, now_ns)
    return closed, max(closed, (watermark - LATENESS_NS) // MINUTE_NS * MINUTE_NS)


def _minutes(conn: sqlite3.Connection, low: int, high: int, limit: int = 2**62) -> Iterator[int]:
    """The minutes in [low, high) that hold verdicts, oldest first (skipping empty spans)."""
    while limit > 0:
        (found,) = conn.execute(
            "SELECT MIN(scored_ns) FROM verdicts WHERE scored_ns >= ? AND scored_ns < ?", (low, high)
        ).fetchone()
        if found is None:
            return
        minute = found // MINUTE_NS * MINUTE_NS
        yield minute
        low = minute + MINUTE_NS
        limit -= 1


def _summarise(conn: sqlite3.Connection, minute: int) -> Summary:
    """A minute's rows and rests: in each slice, the top addresses by each count (ties by
    address), and the most of each count among the others."""
    slices: dict[str, dict[str, list[int]]] = {}
    for _, agent, label, model, ip, f, b, a, ab in conn.execute(_MINUTE_COUNTS, {"minute": minute}):
        for key in ("", "a:" + agent, "l:" + label, "m:" + model):
            table = slices.get(key)
            if table is None:
                table = slices[key] = {}
            sums = table.get(ip)
            if sums is None:
                table[ip] = [f, b, a, ab]
            else:
                sums[0] += f
                sums[1] += b
                sums[2] += a
                sums[3] += ab
        if a:
            sums = (table := slices.setdefault(ANOMALOUS, {})).get(ip)
            if sums is None:
                table[ip] = [a, ab, a, ab]
            else:
                sums[0] += a
                sums[1] += ab
                sums[2] += a
                sums[3] += ab
    kept: list[Row] = []
    rests: list[Rest] = []
    for key, table in slices.items():
        keep = set(table)
        keeps = _keeps(key)
        if len(table) > min(keeps):
            keep = set()
            for i in range(len(_COUNTS)):
                eligible = [item for item in table.items() if item[1][i] > 0]
                top = heapq.nsmallest(keeps[i], eligible, key=lambda item: (-item[1][i], item[0]))
                keep.update(ip for ip, _ in top)
            if len(keep) < len(table):
                dropped = [sums for ip, sums in table.items() if ip not in keep]
                f, b, a, ab = (max(sums[i] for sums in dropped) for i in range(len(_COUNTS)))
                rests.append((key, f, b, a, ab))
        for ip in sorted(keep):
            f, b, a, ab = table[ip]
            kept.append((key, ip, f, b, a, ab))
    return kept, rests


def _store(conn: sqlite3.Connection, minute: int, summary: Summary) -> None:
    kept, rests = summary
    conn.executemany(
        "INSERT INTO talkers (slice, minute_ns, ip, flows, bytes, anomalies, anomalous_bytes, partial)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
        [(s, minute, *row) for s, *row in kept],
    )
    conn.executemany(
        "INSERT INTO talker_minutes (slice, minute_ns, rest_flows, rest_bytes, rest_anomalies,"
        " rest_anomalous_bytes) VALUES (?, ?, ?, ?, ?, ?)",
        [(s, minute, *rest) for s, *rest in rests],
    )


def _set(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))


def _meta(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _close_again(conn: sqlite3.Connection, slice_: str, minute: int) -> None:
    """Keep a closed minute's slice to its top addresses by each count after late verdicts;
    raise its rests to cover the others."""
    rests = conn.execute(
        f"SELECT {', '.join(_RESTS)} FROM talker_minutes WHERE slice = ? AND minute_ns = ?", (slice_, minute)
    ).fetchone()
    rest = list(rests or (0, 0, 0, 0))
    params: dict[str, Any] = {"slice": slice_, "minute": minute}
    params.update({f"r{i}": r for i, r in enumerate(rest)})
    # A partial row's address may have had up to the old rest besides what the row counts.
    most = ", ".join(f"MAX({c} + partial * :r{i})" for i, c in enumerate(_COUNTS))
    dropped_rows = _dropped(slice_)
    dropped = conn.execute(f"SELECT COUNT(*), {most} FROM talkers WHERE {dropped_rows}", params).fetchone()
    if not dropped[0]:
        return
    conn.execute(f"DELETE FROM talkers WHERE {dropped_rows}", params)
    rest = [max(r, d) for r, d in zip(rest, dropped[1:], strict=True)]
    conn.execute(
        f"INSERT OR REPLACE INTO talker_minutes (slice, minute_ns, {', '.join(_RESTS)})"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (slice_, minute, *rest),
    )


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which verdicts a query counts, as the summary and the raw rows see it.

    ``slices``: disjoint slices whose counts add up (``''``: every verdict; ``a:AGENT``...);
    ``anomalous``: only verdicts flagged anomalous (True) or only the others (False);
    ``raw_where``/``raw_params``: the same selection as SQL conditions on ``verdicts``.
    """

    slices: tuple[str, ...] = ("",)
    anomalous: bool | None = None
    raw_where: tuple[str, ...] = ()
    raw_params: tuple[Any, ...] = ()

    @property
    def everything(self) -> bool:
        return self.slices == ("",) and self.anomalous is None

    def counts(self) -> tuple[str, str, str]:
        """The selection's flows, bytes and anomalies as expressions of a summary row."""
        if self.anomalous is None:
            return "flows", "bytes", "anomalies"
        if self.anomalous:
            return "anomalies", "anomalous_bytes", "anomalies"
        return "flows - anomalies", "bytes - anomalous_bytes", "0"

    def rests(self, prefix: str = "") -> tuple[str, str, str]:
        """The most an address without a row can have of each: a rest that bounds it."""
        f, b, a, ab = (prefix + r for r in _RESTS)
        if self.anomalous is None:
            return f, b, a
        if self.anomalous:
            return a, ab, a
        return f, b, "0"


@dataclasses.dataclass(frozen=True)
class TalkerRange:
    """Minutes [start, end) read from the summary; ``within`` False: only partly in the asked
    range, so each count there may be anything from 0 to what the minute holds."""

    start: int
    end: int
    within: bool = True


def top(
    conn: sqlite3.Connection,
    start_ns: int | None,
    end_ns: int | None,
    metric: int,
    limit: int,
    raw_deleted_through: int,
    selection: Selection | None = None,
) -> query_service_pb2.ListTopTalkersResponse | None:
    """The top ``limit`` addresses by ``metric`` (0 flows, 1 bytes, 2 anomalies) among the
    ``selection``'s verdicts over scored time [start, end), or None when the range holds no
    whole closed minute the summary can answer for (the raw rows answer that exactly, and as
    fast).

    Whole closed minutes come from the summary; the rest of the range (a minute at either end
    that the range covers in part, minutes not closed yet, minutes before SLICED_FROM for a
    filtered selection) from the raw rows, exact. Where retention deleted raw rows of a closed
    minute covered in part, that minute's summary stands for it as a bound (0 up to the whole
    minute). Addresses are ranked by their lower bound.
    """
    selection = selection or Selection()
    low = 0 if start_ns is None else start_ns
    high = _FAR if end_ns is None else end_ns
    closed = _meta(conn, CLOSED_BEFORE)
    first = -(-low // MINUTE_NS) * MINUTE_NS
    leading_raw = False
    if not selection.everything:
        sliced_from = _meta(conn, SLICED_FROM)
        if first < sliced_from:
            first, leading_raw = sliced_from, True
    last = min(high // MINUTE_NS * MINUTE_NS, closed)
    if first >= last:
        return None
    summary = [TalkerRange(first, last)]
    raw: list[tuple[int, int]] = []
    for part_low, part_high, minute in ((low, first, first - MINUTE_NS), (last, high, last)):
        if part_low >= part_high:
            continue
        if minute >= closed or minute > raw_deleted_through or (leading_raw and part_high == first):
            raw.append((part_low, part_high))
        else:
            summary.append(TalkerRange(minute, minute + MINUTE_NS, within=False))
    return _rank(conn, summary, raw, metric, limit, selection)


def _rank(
    conn: sqlite3.Connection,
    summary: Sequence[TalkerRange],
    raw: Sequence[tuple[int, int]],
    metric: int,
    limit: int,
    selection: Selection,
) -> query_service_pb2.ListTopTalkersResponse:
    """Per address and count: ``lower``, the sum of its rows in range (and of the raw rows);
    ``extra``, what minutes only partly in range may add (0 up to their rows); ``covered``, the
    rests of the closed minutes' slices where it has a complete row (so it is not among those
    they dropped). Upper bound: lower + extra + (the rests in range) - covered.

    One statement sums lower (and extra) for every address in range and sorts them by lower;
    covered is then looked up for the few that could rank: those listed and those whose lower
    bound plus every rest reaches the last one listed.
    """
    bounded = any(not r.within for r in summary)
    slices = list(selection.slices)
    in_slices = f"slice IN ({', '.join('?' for _ in slices)})"
    counts = selection.counts()
    parts: list[str] = []
    params: list[Any] = []
    for r in summary:
        # Column names come from the first SELECT of a UNION, always these.
        w = int(r.within)
        columns = ", ".join(f"({c}) * {w} AS {name}" for c, name in zip(counts, ("f", "b", "a"), strict=True))
        if bounded:
            columns += ", " + ", ".join(
                f"({c}) * {1 - w} AS {name}" for c, name in zip(counts, ("xf", "xb", "xa"), strict=True)
            )
        parts.append(
            f"SELECT ip, {columns} FROM talkers WHERE {in_slices} AND minute_ns >= ? AND minute_ns < ?"
        )
        params += [*slices, r.start, r.end]
    raw_where = " AND ".join(("scored_ns >= ?", "scored_ns < ?", *selection.raw_where))
    for part_low, part_high in raw:
        parts.append(
            "SELECT CASE side WHEN 0 THEN src_ip ELSE dst_ip END, 1, bytes, anomalous"
            + (", 0, 0, 0" if bounded else "")
            + f" FROM verdicts CROSS JOIN {_SIDES} WHERE {raw_where}"
        )
        params += [part_low, part_high, *selection.raw_params]
    in_range = " OR ".join("(minute_ns >= ? AND minute_ns < ?)" for _ in summary)
    range_params = [x for r in summary for x in (r.start, r.end)]
    rests = conn.execute(
        f"SELECT {', '.join(f'COALESCE(SUM({c}), 0)' for c in selection.rests())}"
        f" FROM talker_minutes WHERE {in_slices} AND ({in_range})",
        [*slices, *range_params],
    ).fetchone()
    rest = [int(v) for v in rests]
    truncated = bounded or any(rest)
    # The most a minute only partly in range can add to an address: its largest row, per slice.
    most_extra = 0
    for r in summary:
        if not r.within:
            (largest,) = conn.execute(
                f"SELECT COALESCE(SUM(most), 0) FROM (SELECT MAX({counts[metric]}) AS most FROM talkers"
                f" WHERE {in_slices} AND minute_ns >= ? AND minute_ns < ? GROUP BY slice)",
                (*slices, r.start, r.end),
            ).fetchone()
            most_extra += int(largest)
    n = 7 if bounded else 4
    sums = ", ".join(f"SUM({c})" for c in ("f", "b", "a", "xf", "xb", "xa")[: n - 1])
    # An address none of whose rows counts a selected verdict (an anomalous-only query, an
    # address with no anomalies in its rows) is left out, with its bound under omitted_max.
    present = "SUM(f) + SUM(xf) > 0" if bounded else "SUM(f) > 0"
    rows = conn.execute(
        f"SELECT ip, {sums} FROM ({' UNION ALL '.join(parts)}) GROUP BY ip HAVING {present}"
        f" ORDER BY {2 + metric} DESC, ip",
        params,
    )
    # The listed rows, then those that might outrank the last listed.
    ranked: list[tuple[str, list[int], list[int]]] = []
    following_lower = None  # the lower bound of the first row not read (None: all read)
    for ip, *values in rows:
        lower = [int(v) for v in values[:3]]
        extra = [int(v) for v in values[3:]] or [0, 0, 0]
        if len(ranked) >= limit and (
            not truncated
            or lower[metric] + most_extra + rest[metric] < ranked[limit - 1][1][metric]
            or len(ranked) >= limit + _CANDIDATES
        ):
            following_lower = lower[metric]
            break
        ranked.append((ip, lower, extra))
    rows.close()
    covered = {}
    if truncated:
        covered = _covered(conn, [ip for ip, _, _ in ranked], in_range, range_params, selection)
    response = query_service_pb2.ListTopTalkersResponse()
    omitted = rest[metric]  # an address with no row at all
    if truncated and not selection.everything:
        omitted += most_extra  # ... or with rows that count nothing selected but may, partly in range
    if following_lower is not None and truncated:
        # Rows not read have lower bounds no higher, so upper bounds at most this.
        omitted = max(omitted, following_lower + most_extra + rest[metric])
    for k, (ip, lower, extra) in enumerate(ranked):
        cover = covered.get(ip, (0, 0, 0))
        error = [extra[i] + rest[i] - cover[i] if truncated else 0 for i in range(3)]
        if k < limit:
            response.talkers.add(
                ip=ip,
                flows=lower[0],
                bytes=lower[1],
                anomalies=lower[2],
                flows_error=error[0],
                bytes_error=error[1],
                anomalies_error=error[2],
            )
        else:
            omitted = max(omitted, lower[metric] + error[metric])
    if truncated:
        listed = response.talkers
        errors = any(t.flows_error or t.bytes_error or t.anomalies_error for t in listed)
        # Exact means the raw rows' answer: an address left out that could tie the last listed
        # might come before it by address.
        short = len(listed) < limit
        response.approximate = (
            errors or short or omitted >= getattr(listed[-1], ("flows", "bytes", "anomalies")[metric])
        )
        response.omitted_max = omitted
    return response


def _covered(
    conn: sqlite3.Connection,
    ips: Sequence[str],
    in_range: str,
    range_params: Sequence[int],
    selection: Selection,
) -> dict[str, tuple[int, int, int]]:
    """For each address: the sums of the rests of the minutes' slices in range where it has a
    complete row."""
    out: dict[str, tuple[int, int, int]] = {}
    slices = list(selection.slices)
    sums = ", ".join(f"SUM({c})" for c in selection.rests("m."))
    for first in range(0, len(ips), 500):
        part = ips[first : first + 500]
        rows = conn.execute(
            f"SELECT t.ip, {sums} FROM talker_minutes AS m JOIN talkers AS t"
            " ON t.slice = m.slice AND t.minute_ns = m.minute_ns"
            f" WHERE m.slice IN ({', '.join('?' for _ in slices)})"
            f" AND ({in_range.replace('minute_ns', 'm.minute_ns')})"
            f" AND t.ip IN ({', '.join('?' for _ in part)}) AND NOT t.partial GROUP BY t.ip",
            [*slices, *range_params, *part],
        )
        out.update((ip, (int(f), int(b), int(a))) for ip, f, b, a in rows)
    return out
