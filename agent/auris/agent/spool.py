"""The agent's durable spool: every verdict is on disk before it is sent, until acknowledged.

One SQLite file (WAL) in the state directory holds, in one transaction per batch:
the verdicts not yet acknowledged, the last sequence number handed out, the number
of verdicts dropped by the size cap, and how far each replayed capture got. So a
``kill -9`` at any point loses nothing that was spooled, never reuses a sequence
number, and a restarted replay resumes after the last spooled flow instead of
sending the capture twice.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from auris.v1 import verdict_pb2

__all__ = ["Spool", "SpoolStats"]

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (sequence INTEGER PRIMARY KEY, verdict BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS replays (
    source TEXT PRIMARY KEY, flows_spooled INTEGER NOT NULL, complete INTEGER NOT NULL
);
"""


@dataclasses.dataclass(frozen=True)
class SpoolStats:
    depth: int
    last_sequence: int
    # Verdicts lost: the oldest ones over the size cap, and whole batches a full disk refused.
    dropped: int
    dropped_disk_full: int = 0


def _disk_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class Spool:
    """Thread-safe: the producer appends, the uplink thread reads and acknowledges."""

    def __init__(self, path: Path, max_verdicts: int = 1_000_000) -> None:
        if max_verdicts < 1:
            raise ValueError("spool_max_verdicts must be at least 1")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._max = max_verdicts
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL survives a killed process (the WAL is in the OS cache); FULL would also
            # survive power loss at one fsync per batch.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            (self._depth,) = self._conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise ValueError(f"spool {path} is unusable: {exc}") from None
        self._last_sequence = self._counter("last_sequence")
        self._dropped = self._counter("dropped")
        self._dropped_disk_full = 0
        # While the disk is full: drops not yet written, and flows of replays they covered.
        self._unsaved_drops = False
        self._unsaved_replay: dict[str, int] = {}
        self._unsaved_complete: set[str] = set()
        self._wakeup = threading.Condition(self._lock)
        # The sequence each waiter of wait_for_more() waits for: appends wake a waiter only then.
        self._wanted: list[int] = []

    def _counter(self, name: str) -> int:
        row = self._conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def _set_counter(self, name: str, value: int) -> None:
        self._conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    @property
    def stats(self) -> SpoolStats:
        with self._lock:
            return SpoolStats(self._depth, self._last_sequence, self._dropped, self._dropped_disk_full)

    def replay_progress(self, source: str) -> tuple[int, bool]:
        """Flows of ``source`` already spooled, and whether the whole capture was."""
        with self._lock:
            row = self._conn.execute(
                "SELECT flows_spooled, complete FROM replays WHERE source = ?", (source,)
            ).fetchone()
        return (int(row[0]), bool(row[1])) if row else (0, False)

    def mark_replay_complete(self, source: str) -> None:
        """Record that all of ``source`` was spooled (on a full disk, with the next batch that fits;
        until then a restart meters the rest of it again)."""
        with self._lock:
            if self._unsaved_drops:  # never complete before the drops and progress are written
                self._unsaved_complete.add(source)
                return
            try:
                self._mark_complete(source)
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    raise
                self._unsaved_complete.add(source)
                self._unsaved_drops = True

    def _mark_complete(self, source: str) -> None:
        self._conn.execute(
            "INSERT INTO replays (source, flows_spooled, complete) VALUES (?, 0, 1)"
            " ON CONFLICT(source) DO UPDATE SET complete = 1",
            (source,),
        )

    def forget_replay(self, source: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM replays WHERE source = ?", (source,))

    def append(
        self,
        build: Callable[[int, int], verdict_pb2.Verdict],
        count: int,
        replay: tuple[str, int] | None = None,
    ) -> list[verdict_pb2.Verdict]:
        """Build ``count`` verdicts with fresh sequence numbers and store them in one transaction.

        ``build(index, sequence)`` makes the index-th verdict of the batch. ``replay`` is (source, flows of it
        in this batch): its progress is recorded atomically with the verdicts.

        When the disk is full the batch is dropped, counted (``dropped_disk_full``), and nothing
        is returned; the counts and the replay progress it covered are written with the next
        batch that fits (a restart before that meters those flows again, which loses nothing).
        """
        with self._lock:
            first = self._last_sequence + 1
            verdicts = [build(i, first + i) for i in range(count)]
            try:
                dropped = self._store(verdicts, first, count, replay)
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    raise
                if not self._unsaved_drops:
                    logger.error(
                        "spool %s: disk full (%s); dropping verdicts until it has room", self.path, exc
                    )
                self._dropped += count
                self._dropped_disk_full += count
                self._unsaved_drops = True
                if replay is not None:
                    self._unsaved_replay[replay[0]] = self._unsaved_replay.get(replay[0], 0) + replay[1]
                return []
            self._last_sequence = first + count - 1 if count else self._last_sequence
            self._depth += count - dropped
            if dropped:
                self._dropped += dropped
                logger.warning("spool full (%d verdicts): dropped the %d oldest", self._max, dropped)
            if self._unsaved_drops:
                self._unsaved_drops = False
                self._unsaved_replay.clear()
                self._unsaved_complete.clear()
                logger.warning("spool %s has room again (%d verdicts dropped so far for a full disk)",
                               self.path, self._dropped_disk_full)  # fmt: skip
            if self._wanted and self._last_sequence >= min(self._wanted):
                self._wakeup.notify_all()
        return verdicts

    def _store(
        self, verdicts: list[verdict_pb2.Verdict], first: int, count: int, replay: tuple[str, int] | None
    ) -> int:
        """One batch in one transaction; how many of the oldest verdicts the cap dropped."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany(
                "INSERT INTO verdicts (sequence, verdict) VALUES (?, ?)",
                [(v.sequence, v.SerializeToString()) for v in verdicts],
            )
            self._set_counter("last_sequence", first + count - 1 if count else self._last_sequence)
            depth = self._depth + count
            dropped = 0
            if depth > self._max:
                dropped = depth - self._max
                self._conn.execute(
                    "DELETE FROM verdicts WHERE sequence IN"
                    " (SELECT sequence FROM verdicts ORDER BY sequence LIMIT ?)",
                    (dropped,),
                )
            if dropped or self._unsaved_drops:
                self._set_counter("dropped", self._dropped + dropped)
            progress = dict(self._unsaved_replay)
            if replay is not None:
                progress[replay[0]] = progress.get(replay[0], 0) + replay[1]
            for source, flows in progress.items():
                self._conn.execute(
                    "INSERT INTO replays (source, flows_spooled, complete) VALUES (?, ?, 0)"
                    " ON CONFLICT(source) DO UPDATE"
                    " SET flows_spooled = flows_spooled + excluded.flows_spooled",
                    (source, flows),
                )
            for source in self._unsaved_complete:
                self._mark_complete(source)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # SQLite may have rolled back already (a full disk)
                self._conn.execute("ROLLBACK")
            raise
        return dropped

    def read_raw_after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (sequence, serialised verdict) pairs above ``sequence``, in order."""
        with self._lock:
            rows: list[tuple[int, bytes]] = self._conn.execute(
                "SELECT sequence, verdict FROM verdicts WHERE sequence > ? ORDER BY sequence LIMIT ?",
                (sequence, limit),
            ).fetchall()
        return rows

    def read_after(self, sequence: int, limit: int) -> list[verdict_pb2.Verdict]:
        """Up to ``limit`` spooled verdicts with a sequence above ``sequence``, in order."""
        return [verdict_pb2.Verdict.FromString(blob) for _, blob in self.read_raw_after(sequence, limit)]

    def renumber_after(self, floor: int) -> int:
        """Give every spooled verdict a new sequence above ``floor`` (and above any used), in order.

        For when the collector already holds this agent's sequences up to ``floor`` from an
        earlier life of the same id (a lost or copied state directory). Returns how many moved.
        """
        with self._lock:
            rows = self._conn.execute("SELECT sequence, verdict FROM verdicts ORDER BY sequence").fetchall()
            start = max(floor, self._last_sequence) + 1
            renumbered = []
            for offset, (_, blob) in enumerate(rows):
                verdict = verdict_pb2.Verdict.FromString(blob)
                verdict.sequence = start + offset
                renumbered.append((verdict.sequence, verdict.SerializeToString()))
            last = start + len(rows) - 1 if rows else max(floor, self._last_sequence)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM verdicts")
                self._conn.executemany("INSERT INTO verdicts (sequence, verdict) VALUES (?, ?)", renumbered)
                self._set_counter("last_sequence", last)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._last_sequence = last
            self._wakeup.notify_all()
            return len(rows)

    @property
    def last_sequence(self) -> int:
        """The last sequence number handed out."""
        return self._last_sequence

    def wait_for_more(self, sequence: int, timeout: float, want: int = 1) -> bool:
        """Block until ``want`` verdicts above ``sequence`` are spooled, or timeout; True if they are.

        Appends wake the waiter only once that many are there (each wake-up can preempt the
        appending thread while it holds the GIL)."""
        target = sequence + max(1, want)
        with self._wakeup:
            self._wanted.append(target)
            try:
                return self._wakeup.wait_for(lambda: self._last_sequence >= target, timeout)
            finally:
                self._wanted.remove(target)

    def acknowledge(self, sequence: int) -> int:
        """Prune every verdict up to ``sequence``; return how many were removed. On a full disk
        they stay (and are resent after a restart, stored once by the collector)."""
        with self._lock:
            try:
                cursor = self._conn.execute("DELETE FROM verdicts WHERE sequence <= ?", (sequence,))
            except sqlite3.OperationalError as exc:
                if not _disk_full(exc):
                    raise
                logger.warning("spool %s: disk full; acknowledged verdicts stay spooled for now", self.path)
                return 0
            self._depth -= cursor.rowcount
            return cursor.rowcount

    def pending_sequences(self) -> Sequence[int]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT sequence FROM verdicts ORDER BY sequence")]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
