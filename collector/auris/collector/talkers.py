"""Top talkers from a bounded heavy-hitter summary, per minute of scored time and address.

A minute closes once the newest scored time (never past the collector's clock; the clock itself
once no verdict has arrived for a while) is LATENESS_NS beyond its end. Closing reads the
minute's raw verdicts once and keeps, in ``talkers``, the top KEEP addresses by each of three
counts, exactly: flows (each verdict counts for both of its ends, as the raw query counts
them), bytes and anomalies. ``talker_minutes`` notes for each count the most that any address it
dropped had: its ``rest``. An address without a row in a closed minute had at most ``rest``
there.

Over a range, an address's kept counts add up to a lower bound of its true counts, and the
rests of the closed minutes where it has no row to its error: the true count lies in
[count, count + error]. It is exact top-K per minute with a bound on the remainder, in the
manner of Misra-Gries and Space-Saving, but exact where it keeps an address and mergeable over
any set of minutes. The answer reports the bound (``Talker.*_error``,
``ListTopTalkersResponse.approximate`` and ``omitted_max``). Minutes not closed yet (the
newest one or two) are read from the raw rows, exactly.

Closing is off the ingest path: counting every verdict's two ends per minute in the ingest
transaction cost the writer 3.7 µs a verdict (+35 %; bench/results/collector.md). A thread of
the collector's (VerdictStore.summarise_in_background) reads a minute in a read transaction of
its own and writes its few rows in a short write; verdicts of the minute stored in between are
added in that write. A verdict that arrives for a closed minute (an agent's spool, a skewed
clock) is added in its own ingest transaction: to its address's row, or as a ``partial`` row
(the address may have had up to the minute's rest before); the minute is then closed again:
rows beyond the top KEEP go, the rest grows to cover them (a partial one with the rest it was
added under). Every bound holds at every commit; only their width depends on the traffic.

Rows and rests are kept when retention deletes raw verdicts, like the rollups: a closed minute
costs at most 3 x KEEP rows however busy it was. A minute is summarised from the raw rows it has
when it closes (migration 10: those retention left).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from auris.v1 import query_service_pb2

__all__ = ["KEEP", "LATENESS_NS", "MINUTE_NS", "add_late", "backfill", "close_due", "create", "top"]

MINUTE_NS = 60_000_000_000
# Addresses a closed minute keeps for each count. On the benchmark's 10M verdicts (417k in the
# last hour, 7.4k addresses a minute) 64 left the last hour's top-10 exact by every count.
KEEP = 64
# How far the newest scored time must be past a minute's end before the minute closes. A later
# verdict still counts, but costs its ingest transaction (~50 % more writer time): at 5 s the
# benchmark's end-to-end ingest, whose agents' scored clocks drift apart, was 30 % slower than
# without the summary; at 60 s, no slower (bench/results/collector.md). Open minutes are read
# from the raw rows by queries: a longer wait costs them.
LATENESS_NS = 60_000_000_000
# Minutes closed in one read transaction of close_due at most: a backlog (a collector that was
# down) goes in short rounds, so the WAL is not held for long and close() does not wait long.
_MINUTES_PER_ROUND = 5
# meta key: minutes before this time (ns, a whole minute) are closed.
CLOSED_BEFORE = "talkers_closed_before_ns"
_METRICS = ("flows", "bytes", "anomalies")
_FAR = 2**62 // MINUTE_NS * MINUTE_NS

# Counts per (minute, address) of the verdicts matching {where}, added to the summary; a new row
# in a minute before the first parameter is partial.
_UPSERT = (
    "INSERT INTO talkers (minute_ns, ip, flows, bytes, anomalies, partial)"
    " SELECT minute, ip, COUNT(*), SUM(bytes), SUM(anomalous), minute < ? FROM ("
    f" SELECT scored_ns / {MINUTE_NS} * {MINUTE_NS} AS minute,"
    " CASE side WHEN 0 THEN src_ip ELSE dst_ip END AS ip, bytes, anomalous"
    " FROM verdicts CROSS JOIN (SELECT 0 AS side UNION ALL SELECT 1) WHERE {where}"
    ") WHERE true GROUP BY minute, ip ON CONFLICT (minute_ns, ip) DO UPDATE SET"
    " flows = flows + excluded.flows, bytes = bytes + excluded.bytes,"
    " anomalies = anomalies + excluded.anomalies"
)
# One minute of raw verdicts, summarised: its top KEEP addresses by each count (kept = 1), and
# one row (ip NULL) with the most of each count among the others.
_SUMMARISE = (
    "WITH counts AS (SELECT CASE side WHEN 0 THEN src_ip ELSE dst_ip END AS ip, COUNT(*) AS flows,"
    " SUM(bytes) AS bytes, SUM(anomalous) AS anomalies"
    " FROM verdicts CROSS JOIN (SELECT 0 AS side UNION ALL SELECT 1)"
    f" WHERE scored_ns >= :minute AND scored_ns < :minute + {MINUTE_NS} GROUP BY 1),"
    f" ranked AS MATERIALIZED (SELECT *, ROW_NUMBER() OVER (ORDER BY flows DESC) <= {KEEP}"
    f" OR ROW_NUMBER() OVER (ORDER BY bytes DESC) <= {KEEP}"
    f" OR (anomalies > 0 AND ROW_NUMBER() OVER (ORDER BY anomalies DESC) <= {KEEP}) AS kept FROM counts)"
    " SELECT ip, flows, bytes, anomalies FROM ranked WHERE kept"
    " UNION ALL SELECT NULL, MAX(flows), MAX(bytes), MAX(anomalies) FROM ranked WHERE NOT kept"
)
# The addresses a closed minute keeps when it is closed again.
_KEPT = " UNION ".join(
    f"SELECT ip FROM (SELECT ip FROM talkers WHERE minute_ns = :minute{extra}"
    f" ORDER BY {metric} DESC LIMIT {KEEP})"
    for metric, extra in (("flows", ""), ("bytes", ""), ("anomalies", " AND anomalies > 0"))
)
_DROPPED = f"minute_ns = :minute AND ip NOT IN ({_KEPT})"

Summary = tuple[list[tuple[str, int, int, int]], tuple[int, int, int]]


def create(conn: sqlite3.Connection) -> None:
    """The summary's tables (schema 10)."""
    conn.execute(
        "CREATE TABLE talkers (minute_ns INTEGER NOT NULL, ip TEXT NOT NULL, flows INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL, anomalies INTEGER NOT NULL, partial INTEGER NOT NULL,"
        " PRIMARY KEY (minute_ns, ip)) WITHOUT ROWID"
    )
    conn.execute(
        "CREATE TABLE talker_minutes (minute_ns INTEGER PRIMARY KEY, rest_flows INTEGER NOT NULL,"
        " rest_bytes INTEGER NOT NULL, rest_anomalies INTEGER NOT NULL)"
    )
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '0')", (CLOSED_BEFORE,))


def backfill(conn: sqlite3.Connection, now_ns: int) -> int:
    """Close every minute of the verdicts already stored that is due (migration 10, in its
    transaction); how many."""
    closed, before = _due(conn, now_ns)
    minutes = list(_minutes(conn, closed, before))
    for minute in minutes:
        _store(conn, minute, _summarise(conn, minute))
    _set_closed(conn, before)
    return len(minutes)


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
        if _closed_before(conn) != closed:
            return 0  # closed meanwhile by another connection
        for minute, summary in summaries:
            _store(conn, minute, summary)
        _set_closed(conn, before)
        _add(conn, snapshot_id, closed, before)
    return len(summaries)


def add_late(conn: sqlite3.Connection, after_id: int, oldest_scored_ns: int) -> None:
    """In the ingest transaction: add the verdicts stored after ``after_id`` (the oldest scored
    at ``oldest_scored_ns``) that belong to closed minutes."""
    closed = _closed_before(conn)
    if oldest_scored_ns < closed:
        _add(conn, after_id, 0, closed)


def _add(conn: sqlite3.Connection, after_id: int, low: int, high: int) -> None:
    """Add the verdicts after ``after_id`` scored in closed minutes [low, high); close those
    minutes again."""
    # The unary + keeps SQLite off the scored-time index: the new rows are the few to read.
    where = "id > ? AND +scored_ns >= ? AND +scored_ns < ?"
    minutes = conn.execute(
        f"SELECT DISTINCT +scored_ns / {MINUTE_NS} * {MINUTE_NS} FROM verdicts WHERE {where}",
        (after_id, low, high),
    ).fetchall()
    if minutes:
        conn.execute(_UPSERT.format(where=where), (high, after_id, low, high))
        for (minute,) in minutes:
            _close_again(conn, minute)


def _due(conn: sqlite3.Connection, now_ns: int) -> tuple[int, int]:
    """(closed before, may close before): minutes in between are due.

    Time is the newest scored time (never past the clock), or the clock itself once nothing has
    arrived for LATENESS_NS: a quiet collector closes its newest minute too.
    """
    closed = _closed_before(conn)
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
    kept: list[tuple[str, int, int, int]] = []
    rests = (0, 0, 0)
    for ip, flows, total, anomalies in conn.execute(_SUMMARISE, {"minute": minute}):
        if ip is None:
            rests = (flows or 0, total or 0, anomalies or 0)
        else:
            kept.append((ip, flows, total or 0, anomalies or 0))
    return kept, rests


def _store(conn: sqlite3.Connection, minute: int, summary: Summary) -> None:
    kept, rests = summary
    conn.executemany(
        "INSERT INTO talkers (minute_ns, ip, flows, bytes, anomalies, partial) VALUES (?, ?, ?, ?, ?, 0)",
        [(minute, *row) for row in kept],
    )
    conn.execute(
        "INSERT INTO talker_minutes (minute_ns, rest_flows, rest_bytes, rest_anomalies) VALUES (?, ?, ?, ?)",
        (minute, *rests),
    )


def _set_closed(conn: sqlite3.Connection, before: int) -> None:
    conn.execute("UPDATE meta SET value = ? WHERE key = ?", (str(before), CLOSED_BEFORE))


def _closed_before(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (CLOSED_BEFORE,)).fetchone()
    return int(row[0]) if row else 0


def _close_again(conn: sqlite3.Connection, minute: int) -> None:
    """Keep a closed minute's top KEEP addresses by each count after late verdicts; raise its
    rests to cover the others."""
    rests = conn.execute(
        "SELECT rest_flows, rest_bytes, rest_anomalies FROM talker_minutes WHERE minute_ns = ?", (minute,)
    ).fetchone()
    rest_flows, rest_bytes, rest_anomalies = rests or (0, 0, 0)
    params = {"minute": minute, "rf": rest_flows, "rb": rest_bytes, "ra": rest_anomalies}
    # A partial row's address may have had up to the old rest besides what the row counts.
    dropped = conn.execute(
        "SELECT COUNT(*), MAX(flows + partial * :rf), MAX(bytes + partial * :rb),"
        f" MAX(anomalies + partial * :ra) FROM talkers WHERE {_DROPPED}",
        params,
    ).fetchone()
    if dropped[0]:
        conn.execute(f"DELETE FROM talkers WHERE {_DROPPED}", params)
        rest_flows, rest_bytes, rest_anomalies = (
            max(rest_flows, dropped[1]),
            max(rest_bytes, dropped[2]),
            max(rest_anomalies, dropped[3]),
        )
    conn.execute(
        "INSERT OR REPLACE INTO talker_minutes (minute_ns, rest_flows, rest_bytes, rest_anomalies)"
        " VALUES (?, ?, ?, ?)",
        (minute, rest_flows, rest_bytes, rest_anomalies),
    )


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
) -> query_service_pb2.ListTopTalkersResponse | None:
    """The top ``limit`` addresses by ``metric`` (0 flows, 1 bytes, 2 anomalies) over scored
    time [start, end), or None when the range holds no whole closed minute (the raw rows answer
    that exactly, and as fast).

    Whole closed minutes come from the summary; the rest of the range (a minute at either end
    that the range covers in part, minutes not closed yet) from the raw rows, exact. Where
    retention deleted raw rows of a closed minute covered in part, that minute's summary stands
    for it as a bound (0 up to the whole minute). Addresses are ranked by their lower bound.
    """
    low = 0 if start_ns is None else start_ns
    high = _FAR if end_ns is None else end_ns
    closed = _closed_before(conn)
    first = -(-low // MINUTE_NS) * MINUTE_NS
    last = min(high // MINUTE_NS * MINUTE_NS, closed)
    if first >= last:
        return None
    summary = [TalkerRange(first, last)]
    raw: list[tuple[int, int]] = []
    for part_low, part_high, minute in ((low, first, first - MINUTE_NS), (last, high, last)):
        if part_low >= part_high:
            continue
        if minute >= closed or minute > raw_deleted_through:
            raw.append((part_low, part_high))
        else:
            summary.append(TalkerRange(minute, minute + MINUTE_NS, within=False))
    return _rank(conn, summary, raw, metric, limit)


def _rank(
    conn: sqlite3.Connection,
    summary: Sequence[TalkerRange],
    raw: Sequence[tuple[int, int]],
    metric: int,
    limit: int,
) -> query_service_pb2.ListTopTalkersResponse:
    """Per address and count: ``lower``, the sum of its rows in range (and of the raw rows);
    ``extra``, what minutes only partly in range may add (0 up to their rows); ``covered``, the
    rests of the closed minutes where it has a complete row (so it is not among those the minute
    dropped). Upper bound: lower + extra + (the rests of the minutes in range) - covered.

    One statement sums lower (and extra) for every address in range and sorts them by lower;
    covered is then looked up for the few that could rank: those listed and those whose lower
    bound plus every rest reaches the last one listed.
    """
    bounded = any(not r.within for r in summary)
    parts: list[str] = []
    params: list[Any] = []
    for r in summary:
        # Column names come from the first SELECT of a UNION, always one of these.
        columns = "flows AS flows, bytes AS bytes, anomalies AS anomalies"
        if bounded:
            w = int(r.within)
            columns = (
                f"flows * {w} AS flows, bytes * {w} AS bytes, anomalies * {w} AS anomalies,"
                f" flows * {1 - w} AS xf, bytes * {1 - w} AS xb, anomalies * {1 - w} AS xa"
            )
        parts.append(f"SELECT ip, {columns} FROM talkers WHERE minute_ns >= ? AND minute_ns < ?")
        params += [r.start, r.end]
    for part_low, part_high in raw:
        parts.append(
            "SELECT CASE side WHEN 0 THEN src_ip ELSE dst_ip END, 1, bytes, anomalous"
            + (", 0, 0, 0" if bounded else "")
            + " FROM verdicts CROSS JOIN (SELECT 0 AS side UNION ALL SELECT 1)"
            " WHERE scored_ns >= ? AND scored_ns < ?"
        )
        params += [part_low, part_high]
    in_range = " OR ".join("(minute_ns >= ? AND minute_ns < ?)" for _ in summary)
    range_params = [x for r in summary for x in (r.start, r.end)]
    rests = conn.execute(
        "SELECT COALESCE(SUM(rest_flows), 0), COALESCE(SUM(rest_bytes), 0), COALESCE(SUM(rest_anomalies), 0)"
        f" FROM talker_minutes WHERE {in_range}",
        range_params,
    ).fetchone()
    rest = [int(v) for v in rests]
    truncated = bounded or any(rest)
    # The most a minute only partly in range can add to an address: its largest row.
    most_extra = 0
    for r in summary:
        if not r.within:
            (largest,) = conn.execute(
                f"SELECT COALESCE(MAX({_METRICS[metric]}), 0) FROM talkers"
                " WHERE minute_ns >= ? AND minute_ns < ?",
                (r.start, r.end),
            ).fetchone()
            most_extra += int(largest)
    n = 7 if bounded else 4
    sums = ", ".join(f"SUM({c})" for c in ("flows", "bytes", "anomalies", "xf", "xb", "xa")[: n - 1])
    rows = conn.execute(
        f"SELECT ip, {sums} FROM ({' UNION ALL '.join(parts)}) GROUP BY ip ORDER BY {2 + metric} DESC, ip",
        params,
    )
    # The listed rows, then those that might outrank the last listed.
    ranked: list[tuple[str, list[int], list[int]]] = []
    following_lower = None  # the lower bound of the first row not read (None: all read)
    for ip, *values in rows:
        lower = [int(v) for v in values[:3]]
        extra = [int(v) for v in values[3:]] or [0, 0, 0]
        if len(ranked) >= limit and (
            not truncated or lower[metric] + most_extra + rest[metric] < ranked[limit - 1][1][metric]
        ):
            following_lower = lower[metric]
            break
        ranked.append((ip, lower, extra))
    rows.close()
    covered = _covered(conn, [ip for ip, _, _ in ranked], in_range, range_params) if truncated else {}
    response = query_service_pb2.ListTopTalkersResponse()
    omitted = rest[metric]  # an address with no row at all
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
        response.approximate = errors or short or omitted >= getattr(listed[-1], _METRICS[metric])
        response.omitted_max = omitted
    return response


def _covered(
    conn: sqlite3.Connection, ips: Sequence[str], in_range: str, range_params: Sequence[int]
) -> dict[str, tuple[int, int, int]]:
    """For each address: the sums of the rests of the minutes in range where it has a complete row."""
    out: dict[str, tuple[int, int, int]] = {}
    for first in range(0, len(ips), 500):
        part = ips[first : first + 500]
        marks = ", ".join("?" for _ in part)
        rows = conn.execute(
            "SELECT t.ip, SUM(m.rest_flows), SUM(m.rest_bytes), SUM(m.rest_anomalies)"
            " FROM talker_minutes AS m JOIN talkers AS t ON t.minute_ns = m.minute_ns"
            f" WHERE ({in_range.replace('minute_ns', 'm.minute_ns')}) AND t.ip IN ({marks}) AND NOT t.partial"
            " GROUP BY t.ip",
            [*range_params, *part],
        )
        out.update((ip, (int(f), int(b), int(a))) for ip, f, b, a in rows)
    return out
