"""Features of the transaction and tick feeds, shared by training and the collector (numpy only).

Training builds its tables with these classes and the collector's scorers call the same ones on
live records, so a model reads at serving time exactly what it was trained on.

Transactions (``TransactionWindows``): per customer and per terminal, the count, sum and mean of
the amounts of that entity's earlier transactions over trailing windows of 1 h, 24 h and 7 d.
A transaction's features describe the transactions of the same entity fed BEFORE it whose time
``s`` satisfies ``t - w < s`` (so a transaction ``w`` seconds old has just left the window); the
transaction itself is not counted (its amount is a column of its own). Records must come in time
order; one older than the newest seen is windowed as if it arrived at the newest time (counted in
``late``). An empty entity id means "no entity": its window columns are zero and nothing is kept.

Ticks (``BarWindows``): per symbol and bar, robust z-scores against the previous ``window`` bars
of that symbol (median, and 1.4826 x MAD with floors) of the log return, sqrt |return|, log volume
and sqrt range (the square roots tame the skew of sizes), and of the sums of returns over the last
5 and 20 bars, each judged as a sum of k draws: (sum - k median) / (sqrt(k) scale); the mean
|return| over 5 and 20 bars enters as a volatility ratio, log(mean / the window's return scale).
A bar that comes more than GAP_FACTOR times the symbol's shortest interval after the previous one
opens a session: its return is taken from its own open, so an overnight gap is not scored as a
move. Trades become bars in ``TradeBars``. ``BarWindows`` also cuts the normalised OHLCV
sequences the transformer autoencoder reads, and the ``bar-local`` columns: the bar's return in
standard deviations of the previous ``window`` returns (not a MAD: a MAD collapses on series where
most bars do not move, and real returns' fat tails then make every ordinary move look huge), the
mean range of the last 10 bars against the window's mean range (a volatility burst), and the sum of
the last 4 returns in the same standard deviations (a run in one direction). Inside the 10- and
4-bar statistics each bar's range is capped at 2.5 window mean ranges and each return at 2
standard deviations, so that one jump (the first column's business) does not keep the next bars
flagged.

State lives in memory, grows with the number of entities and symbols, and is lost on restart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "BAR_LOCAL",
    "BAR_SEQ",
    "BAR_Z",
    "FEATURE_SETS",
    "TX_ULB",
    "TX_WINDOWS",
    "TX_WINDOW_SECONDS",
    "BarFeatures",
    "BarWindows",
    "CompletedBars",
    "EntityWindows",
    "FeedFeatureSet",
    "TradeBars",
    "TransactionWindows",
]

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclasses.dataclass(frozen=True)
class FeedFeatureSet:
    """The named, versioned, ordered columns a feed model reads."""

    name: str
    version: str
    columns: tuple[str, ...]


TX_WINDOW_SECONDS: dict[str, float] = {"1h": 3600.0, "24h": 86400.0, "7d": 604800.0}
_ENTITIES = ("customer", "terminal")
_STATS = ("count", "sum", "mean")

# The ULB card set: 28 anonymised PCA components (Transaction.features V1..V28) and the amount.
TX_ULB = FeedFeatureSet("ulb-pca", "1", (*(f"V{i}" for i in range(1, 29)), "amount"))
TX_WINDOWS = FeedFeatureSet(
    "tx-windows",
    "1",
    (
        "amount",
        "during_night",
        "during_weekend",
        *(f"{e}_{w}_{s}" for e in _ENTITIES for w in TX_WINDOW_SECONDS for s in _STATS),
        "amount_over_customer_7d_mean",
    ),
)
BAR_Z = FeedFeatureSet(
    "bar-z",
    "1",
    tuple(
        f"{name}_z"
        for name in (
            "ret",
            "absret",
            "logvol",
            "range",
            "ret_sum5",
            "ret_sum20",
            "absret_sum5",
            "absret_sum20",
        )
    ),
)
# Per bar of a sequence: log return, log(high/low), log(1 + volume), log(close/open).
BAR_SEQ = FeedFeatureSet("bar-seq", "1", ("ret", "range", "logvol", "body"))
# Per bar, against the previous ``window`` bars of the symbol (see ``BarWindows``): the log return
# over the standard deviation of their returns, log(mean range of the last 10 bars / their mean
# range), the sum of the last 4 returns over 2 x that standard deviation (ranges and returns capped
# inside the 10- and 4-bar statistics, see the module docstring).
BAR_LOCAL = FeedFeatureSet("bar-local", "1", ("ret_sd", "range_ratio10", "ret_sum4_sd"))
FEATURE_SETS = {fs.name: fs for fs in (TX_ULB, TX_WINDOWS, BAR_Z, BAR_SEQ, BAR_LOCAL)}


class EntityWindows:
    """Count and sum of amounts per entity over trailing windows, updated batch by batch.

    Every batch is computed with array operations: the batch's rows and the log events that
    leave a window during the batch are sorted together by (entity, time) and a per-entity
    running sum gives each row what was in its windows just before it. Feeding rows one at a
    time or all at once gives the same figures.
    """

    def __init__(self, windows_s: Sequence[float] = tuple(TX_WINDOW_SECONDS.values())) -> None:
        self.windows = tuple(float(w) for w in windows_s)
        # Index 0 is the empty id: rows without an entity, never counted.
        self._ids: dict[str, int] = {"": 0}
        k = len(self.windows)
        self._count: list[F64] = [np.zeros(64) for _ in range(k)]
        self._sum: list[F64] = [np.zeros(64) for _ in range(k)]
        self._log_t = np.zeros(1024)
        self._log_e = np.zeros(1024, dtype=np.int64)
        self._log_a = np.zeros(1024)
        self._n = 0
        self._head = [0] * k
        self._last_t = -np.inf

    @property
    def entities(self) -> int:
        return len(self._ids) - 1

    def _index(self, ids: Sequence[str]) -> I64:
        table = self._ids
        idx = np.fromiter((table.setdefault(key, len(table)) for key in ids), dtype=np.int64, count=len(ids))
        size = len(table)
        if size > len(self._count[0]):
            grown = max(size, 2 * len(self._count[0]))
            for arrays in (self._count, self._sum):
                for i, old in enumerate(arrays):
                    arrays[i] = np.concatenate([old, np.zeros(grown - len(old))])
        return idx

    def _append(self, t: F64, e: I64, a: F64) -> None:
        need = self._n + len(t)
        if need > len(self._log_t):
            keep = min(self._head)  # events before every window's head can never matter again
            live = self._n - keep
            capacity = max(1024, 2 * (live + len(t)))
            for name in ("_log_t", "_log_e", "_log_a"):
                old = getattr(self, name)
                new = np.zeros(capacity, dtype=old.dtype)
                new[:live] = old[keep : self._n]
                setattr(self, name, new)
            self._n = live
            self._head = [h - keep for h in self._head]
        self._log_t[self._n : self._n + len(t)] = t
        self._log_e[self._n : self._n + len(t)] = e
        self._log_a[self._n : self._n + len(t)] = a
        self._n += len(t)

    def update(self, times_s: F64, ids: Sequence[str], amounts: F64) -> F64:
        """Feed rows in time order; return (rows, 3 x windows): count, sum, mean per window.

        ``times_s`` must not decrease, nor go below the newest time fed before (ValueError).
        """
        n = len(ids)
        out = np.zeros((n, 3 * len(self.windows)))
        if n == 0:
            return out
        t = np.asarray(times_s, dtype=np.float64)
        a = np.asarray(amounts, dtype=np.float64)
        if t[0] < self._last_t or (n > 1 and bool(np.any(np.diff(t) < 0))):
            raise ValueError("times must not decrease (feed transactions in time order)")
        e = self._index(ids)
        rows = np.flatnonzero(e > 0)
        bt, be, ba = t[rows], e[rows], a[rows]
        self._append(bt, be, ba)
        t_end = float(t[-1])
        for k, w in enumerate(self.windows):
            head = self._head[k]
            hi = head + int(np.searchsorted(self._log_t[head : self._n], t_end - w, side="right"))
            ex_e = self._log_e[head:hi]
            # Leaving events first (kind 0) at equal times; batch rows keep their order (sub).
            ent = np.concatenate([ex_e, be])
            time = np.concatenate([self._log_t[head:hi] + w, bt])
            kind = np.concatenate([np.zeros(hi - head, dtype=np.int8), np.ones(len(rows), dtype=np.int8)])
            sub = np.concatenate([np.arange(hi - head), np.arange(len(rows))])
            d_a = np.concatenate([-self._log_a[head:hi], ba])
            d_c = np.concatenate([-np.ones(hi - head), np.ones(len(rows))])
            order = np.lexsort((sub, kind, time, ent))
            ent_s, da, dc = ent[order], d_a[order], d_c[order]
            start = np.empty(len(order), dtype=bool)
            if len(order):
                start[0] = True
                start[1:] = ent_s[1:] != ent_s[:-1]
            group = np.cumsum(start) - 1
            starts = np.flatnonzero(start)
            cum_a = np.cumsum(da) - da
            cum_c = np.cumsum(dc) - dc
            before_a = cum_a - cum_a[starts][group]
            before_c = cum_c - cum_c[starts][group]
            is_row = kind[order] == 1
            where = rows[sub[order][is_row]]
            count = self._count[k][ent_s[is_row]] + before_c[is_row]
            total = self._sum[k][ent_s[is_row]] + before_a[is_row]
            total[count <= 0] = 0.0
            out[where, 3 * k] = count
            out[where, 3 * k + 1] = total
            out[where, 3 * k + 2] = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
            size = len(self._count[k])
            self._count[k] += np.bincount(ent, weights=d_c, minlength=size)[:size]
            self._sum[k] += np.bincount(ent, weights=d_a, minlength=size)[:size]
            touched = np.unique(ent)
            emptied = touched[self._count[k][touched] <= 0]
            self._sum[k][emptied] = 0.0  # no rounding residue left in an empty window
            self._head[k] = hi
        self._last_t = t_end
        return out


_SECONDS_PER_DAY = 86400.0


class TransactionWindows:
    """The ``tx-windows`` columns for transactions fed in time order (see the module docstring)."""

    feature_set = TX_WINDOWS

    def __init__(self, windows_s: Sequence[float] = tuple(TX_WINDOW_SECONDS.values())) -> None:
        self.customers = EntityWindows(windows_s)
        self.terminals = EntityWindows(windows_s)
        self._last_t = -np.inf
        # Records older than the newest seen, windowed at the newest time.
        self.late = 0

    def update(
        self, times_s: F64, customer_ids: Sequence[str], terminal_ids: Sequence[str], amounts: F64
    ) -> F64:
        """Feed transactions in time order; return their rows of ``TX_WINDOWS.columns`` (float64)."""
        t = np.asarray(times_s, dtype=np.float64)
        a = np.asarray(amounts, dtype=np.float64)
        n = len(t)
        out = np.zeros((n, len(TX_WINDOWS.columns)))
        if n == 0:
            return out
        clamped = np.maximum.accumulate(np.maximum(t, self._last_t))
        self.late += int(np.count_nonzero(clamped > t))
        self._last_t = float(clamped[-1])
        # Calendar flags from the record's own time (UTC): night is 00:00-05:59; 1970-01-01 was a
        # Thursday, so weekday = (days + 3) mod 7 with Monday = 0.
        days = np.floor(t / _SECONDS_PER_DAY)
        hour = (t - days * _SECONDS_PER_DAY) // 3600.0
        out[:, 0] = a
        out[:, 1] = hour < 6
        out[:, 2] = np.mod(days + 3, 7) >= 5
        width = 3 * len(self.customers.windows)
        out[:, 3 : 3 + width] = self.customers.update(clamped, customer_ids, a)
        out[:, 3 + width : 3 + 2 * width] = self.terminals.update(clamped, terminal_ids, a)
        mean_7d = out[:, 3 + width - 1]
        out[:, -1] = np.divide(a, mean_7d, out=np.zeros(n), where=mean_7d > 0)
        return out


# ---------------------------------------------------------------------------------------------
# Ticks

# Scale floors of the robust z-scores (log-return units; log volume), so that a flat stretch of
# identical prices does not turn the next tick into an infinite z.
# Scale floors of the window statistics (return, sqrt |return|, log volume, sqrt range, |return|),
# so that a flat stretch of identical prices does not turn the next tick into an infinite z.
_Z_FLOORS = np.array([1e-5, 1e-3, 0.01, 1e-3, 1e-5])
# A bar more than this many times the symbol's shortest interval after the previous one opens a
# new session: its return is measured from its own open (the overnight gap is not a move).
GAP_FACTOR = 4.0
_SEQ_FLOORS = np.array([1e-5, 1e-5, 0.01, 1e-5])
Z_CLIP = 50.0
SEQ_CLIP = 20.0
_MAD_TO_SIGMA = 1.4826
_MEAN_AD_TO_SIGMA = 1.2533
# Floors of the bar-local scales: the return standard deviation and the mean log range.
_LOCAL_FLOORS = (1e-5, 1e-5)
_LOCAL_RANGE_BARS = 10
_LOCAL_SUM_BARS = 4
# Caps inside the 10-bar range mean (x the window's mean range) and the 4-bar return sum (x the
# window's return standard deviation); chosen on the tick harness's calibration part.
_LOCAL_RANGE_CAP = 2.5
_LOCAL_SUM_CAP = 2.0


def _median_last(x: F64) -> F64:
    # np.sort on short rows is several times faster than np.median's partition.
    s = np.sort(x, axis=-1)
    m = s.shape[-1]
    if m % 2:
        return s[..., m // 2 : m // 2 + 1]
    return 0.5 * (s[..., m // 2 - 1 : m // 2] + s[..., m // 2 : m // 2 + 1])


def _robust_scale(x: F64, floors: F64) -> tuple[F64, F64]:
    """(median, scale) along the last axis, keeping it: 1.4826 x MAD, or 1.2533 x mean absolute
    deviation when the MAD is zero (over half the values equal), never below ``floors``."""
    med = _median_last(x)
    dev = np.abs(x - med)
    mad = _MAD_TO_SIGMA * _median_last(dev)
    mean_ad = _MEAN_AD_TO_SIGMA * np.mean(dev, axis=-1, keepdims=True)
    scale = np.where(mad > 0, mad, mean_ad)
    return med, np.maximum(scale, floors)


def _stat_series(base: F64) -> F64:
    """Per bar, the series whose window statistics the z-scores use: return, sqrt |return|, log
    volume, sqrt range, |return|."""
    ret = base[:, 0]
    absret = np.abs(ret)
    return np.column_stack([ret, np.sqrt(absret), base[:, 1], np.sqrt(base[:, 2]), absret])


def _window_sums(series: F64, positions: npt.NDArray[np.intp], k: int) -> F64:
    """Sum of series[p-k+1 .. p] for each position (fewer terms at the start). Summed term by term
    (not from a running total), so the result does not depend on how much history precedes it."""
    padded = np.concatenate([np.zeros(k - 1), series])
    sums: F64 = np.lib.stride_tricks.sliding_window_view(padded, k)[positions].sum(axis=1)
    return sums


def _capped_sums(series: F64, positions: npt.NDArray[np.intp], k: int, cap: F64) -> F64:
    """``_window_sums`` with every term clipped to [-cap, cap] (one cap per position)."""
    padded = np.concatenate([np.zeros(k - 1), series])
    terms = np.lib.stride_tricks.sliding_window_view(padded, k)[positions]
    sums: F64 = np.clip(terms, -cap[:, None], cap[:, None]).sum(axis=1)
    return sums


def _z_from_stats(stats: F64, positions: npt.NDArray[np.intp], med: F64, scale: F64) -> F64:
    """BAR_Z rows for ``positions`` given (rows, 5) window medians and scales of the stat series.

    Sums of returns over k bars are judged as sums of k independent draws: (sum - k median) /
    (sqrt(k) scale), which stays right although consecutive sums overlap. The |return| columns are
    volatility ratios: log(mean |return| over k bars / the window's return scale)."""
    out = np.empty((len(positions), len(BAR_Z.columns)))
    for col, stat in ((0, 0), (1, 1), (2, 2), (3, 3)):
        out[:, col] = (stats[positions, stat] - med[:, stat]) / scale[:, stat]
    for col, k in ((4, 5), (5, 20)):
        total = _window_sums(stats[:, 0], positions, k)
        out[:, col] = (total - k * med[:, 0]) / (np.sqrt(k) * scale[:, 0])
    for col, k in ((6, 5), (7, 20)):
        mean_abs = _window_sums(stats[:, 4], positions, k) / k
        out[:, col] = np.log((mean_abs + 1e-12) / scale[:, 0])
    return np.clip(out, -Z_CLIP, Z_CLIP)


@dataclasses.dataclass
class BarFeatures:
    """What ``BarWindows.update`` returns for a batch of bars."""

    # Robust z-scores, columns of BAR_Z (zero while a symbol has fewer than min_history bars).
    z: F32
    # Bars of the same symbol before each bar (capped at the window).
    history: I64
    # (bars, sequence_length, 4) normalised BAR_SEQ channels; zero while history is too short.
    sequences: F32 | None = None
    # BAR_LOCAL columns (zero while a symbol has fewer than min_history bars).
    local: F32 | None = None


@dataclasses.dataclass
class _Symbol:
    base: F64  # (<= keep, 4): ret, logvol, range, body of the latest bars
    last_close: float
    last_time: float
    min_interval: float
    bars: int = 0


class BarWindows:
    """Per-symbol sliding-window features of bars fed in time order (see the module docstring)."""

    def __init__(self, window: int = 60, min_history: int = 20, sequence_length: int = 60) -> None:
        if not 2 <= min_history <= window:
            raise ValueError("need 2 <= min_history <= window")
        self.window = window
        self.min_history = min_history
        self.sequence_length = sequence_length
        # Enough past bars for the reference window, a 20-bar sum and a sequence.
        self._keep = max(window, 19, sequence_length - 1)
        self._symbols: dict[str, _Symbol] = {}

    @property
    def symbols(self) -> int:
        return len(self._symbols)

    @property
    def kept(self) -> int:
        """Past bars a symbol's state holds: replaying more than this restores the state."""
        return self._keep

    def update(
        self,
        symbols: Sequence[str],
        times_s: F64,
        open_: F64,
        high: F64,
        low: F64,
        close: F64,
        volume: F64,
        *,
        sequences: bool = False,
        z_scores: bool = True,
        local: bool = False,
    ) -> BarFeatures:
        """Feed bars (time order within each symbol); return their features: the BAR_Z rows
        unless ``z_scores`` is False (then zeros), the sequences and the BAR_LOCAL rows if asked."""
        n = len(symbols)
        z = np.zeros((n, len(BAR_Z.columns)), dtype=np.float32)
        history = np.zeros(n, dtype=np.int64)
        seq = np.zeros((n, self.sequence_length, 4), dtype=np.float32) if sequences else None
        loc = np.zeros((n, len(BAR_LOCAL.columns)), dtype=np.float32) if local else None
        if n == 0:
            return BarFeatures(z, history, seq, loc)
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(symbols):
            groups.setdefault(s, []).append(i)
        tiny = 1e-12
        o = np.maximum(np.asarray(open_, dtype=np.float64), tiny)
        h = np.maximum(np.asarray(high, dtype=np.float64), tiny)
        lo = np.maximum(np.asarray(low, dtype=np.float64), tiny)
        c = np.maximum(np.asarray(close, dtype=np.float64), tiny)
        v = np.maximum(np.asarray(volume, dtype=np.float64), 0.0)
        t = np.asarray(times_s, dtype=np.float64)
        for symbol, members in groups.items():
            idx = np.asarray(members, dtype=np.intp)
            state = self._symbols.get(symbol)
            first_prev = state.last_close if state is not None else o[idx[0]]
            prev = np.concatenate([[first_prev], c[idx[:-1]]])
            prev_t = np.concatenate([[state.last_time if state is not None else np.nan], t[idx[:-1]]])
            dt = t[idx] - prev_t
            steps = np.where(dt > 0, dt, np.inf)  # NaN (first bar) and repeats do not set the interval
            before = np.concatenate([[state.min_interval if state is not None else np.inf], steps[:-1]])
            shortest = np.minimum.accumulate(before)
            new_session = ~(dt <= GAP_FACTOR * shortest)  # also the symbol's first bar (NaN)
            body = np.log(c[idx] / o[idx])
            new = np.column_stack(
                [np.where(new_session, body, np.log(c[idx] / prev)), np.log1p(v[idx]),
                 np.log(np.maximum(h[idx], lo[idx]) / lo[idx]), body]
            )  # fmt: skip
            past = state.base if state is not None else np.zeros((0, 4))
            bars_before = state.bars if state is not None else 0
            full = np.concatenate([past, new])
            p0 = len(past)
            # Position p in ``full`` has min(p, w) previous bars when the symbol's log starts at 0;
            # after truncation p0 == keep >= w, so the count is the true one, capped at w.
            history[idx] = np.minimum(np.arange(len(idx)) + bars_before, self.window)
            if z_scores:
                self._z_rows(_stat_series(full), p0, idx, z)
            if seq is not None:
                self._sequences(full, p0, idx, seq)
            if loc is not None:
                self._local_rows(full, p0, idx, loc)
            self._symbols[symbol] = _Symbol(
                full[-self._keep :],
                float(c[idx[-1]]),
                float(t[idx[-1]]),
                float(min(shortest[-1], steps[-1])),
                bars_before + len(idx),
            )
        return BarFeatures(z, history, seq, loc)

    def _z_rows(self, stats: F64, p0: int, idx: npt.NDArray[np.intp], z: F32) -> None:
        w = self.window
        m = len(idx)
        full_rows = np.flatnonzero(np.arange(p0, p0 + m) >= w)
        if len(full_rows):
            positions = p0 + full_rows
            windows = np.lib.stride_tricks.sliding_window_view(stats, w, axis=0)  # (len-w+1, 5, w)
            med, scale = _robust_scale(windows[positions - w], _Z_FLOORS[None, :, None])
            z[idx[full_rows]] = _z_from_stats(stats, positions, med[:, :, 0], scale[:, :, 0])
        for r in np.flatnonzero(np.arange(p0, p0 + m) < w):
            p = p0 + int(r)
            if p >= self.min_history:
                med, scale = _robust_scale(stats[:p].T, _Z_FLOORS[:, None])
                z[idx[r]] = _z_from_stats(stats, np.array([p]), med[:, 0][None, :], scale[:, 0][None, :])[0]

    def _local_rows(self, full: F64, p0: int, idx: npt.NDArray[np.intp], out: F32) -> None:
        """BAR_LOCAL rows of the bars at positions p0.. of ``full`` (ret, logvol, range, body)."""
        w = self.window
        positions = np.arange(p0, p0 + len(idx))
        ret, rng = full[:, 0], full[:, 2]
        sd = np.zeros(len(idx))
        mean_range = np.zeros(len(idx))
        full_rows = np.flatnonzero(positions >= w)
        if len(full_rows):
            at = positions[full_rows] - w
            sd[full_rows] = np.lib.stride_tricks.sliding_window_view(ret, w)[at].std(axis=1)
            mean_range[full_rows] = np.lib.stride_tricks.sliding_window_view(rng, w)[at].mean(axis=1)
        for r in np.flatnonzero(positions < w).tolist():
            p = int(positions[r])
            if p >= self.min_history:
                sd[r] = ret[:p].std()
                mean_range[r] = rng[:p].mean()
        ready = positions >= self.min_history
        sd = np.maximum(sd, _LOCAL_FLOORS[0])
        mean_range = np.maximum(mean_range, _LOCAL_FLOORS[1])
        rows = np.empty((len(idx), len(BAR_LOCAL.columns)))
        rows[:, 0] = ret[positions] / sd
        recent = _capped_sums(rng, positions, _LOCAL_RANGE_BARS, _LOCAL_RANGE_CAP * mean_range)
        rows[:, 1] = np.log(np.maximum(recent / _LOCAL_RANGE_BARS, 1e-12) / mean_range)
        k = _LOCAL_SUM_BARS
        rows[:, 2] = _capped_sums(ret, positions, k, _LOCAL_SUM_CAP * sd) / (math.sqrt(k) * sd)
        out[idx[ready]] = np.clip(rows[ready], -Z_CLIP, Z_CLIP)

    def _sequences(self, full: F64, p0: int, idx: npt.NDArray[np.intp], seq: F32) -> None:
        length = self.sequence_length
        positions = np.arange(p0, p0 + len(idx))
        ok = positions >= length - 1
        if not ok.any():
            return
        windows = np.lib.stride_tricks.sliding_window_view(full, length, axis=0)  # (len-L+1, 4, L)
        cut = windows[positions[ok] - (length - 1)]
        med, scale = _robust_scale(cut, _SEQ_FLOORS[None, :, None])
        normed = np.clip((cut - med) / scale, -SEQ_CLIP, SEQ_CLIP)
        seq[idx[ok]] = np.transpose(normed, (0, 2, 1))


@dataclasses.dataclass
class CompletedBars:
    """Bars closed by a batch of trades; ``index`` is the position of the trade that closed each
    (the first trade of a later bar), -1 for bars closed by ``flush``."""

    index: I64
    symbols: list[str]
    start_s: F64
    open: F64
    high: F64
    low: F64
    close: F64
    volume: F64

    def __len__(self) -> int:
        return len(self.symbols)


def trade_bar_start_ns(t_s: float, seconds: float) -> int:
    """The start (ns) of the ``seconds`` trade bar holding a trade at ``t_s`` (seconds since the
    epoch, as ``seconds + nanos * 1e-9``): the bucket ``TradeBars.add`` puts it in, named as
    ``TickScorer`` names trade bars."""
    return round(math.floor(t_s / seconds) * seconds * 1e3) * 1_000_000


class TradeBars:
    """Trades (price, size) per symbol into OHLCV bars of ``seconds``, aligned to the epoch.

    A bar is complete when a trade of a later bar of the same symbol arrives; intervals without
    trades make no bar. Trades must come in time order per symbol; a late trade joins the
    symbol's open bar.
    """

    def __init__(self, seconds: float = 60.0) -> None:
        if seconds <= 0:
            raise ValueError("bar seconds must be positive")
        self.seconds = float(seconds)
        # symbol -> [bucket, open, high, low, close, volume]
        self._open: dict[str, list[float]] = {}

    def add(self, symbols: Sequence[str], times_s: F64, prices: F64, sizes: F64) -> CompletedBars:
        done: list[tuple[int, str, list[float]]] = []
        bucket_of = np.floor(np.asarray(times_s, dtype=np.float64) / self.seconds).tolist()
        table = self._open
        for i, (symbol, bucket, price, size) in enumerate(
            zip(symbols, bucket_of, np.asarray(prices).tolist(), np.asarray(sizes).tolist(), strict=True)
        ):
            bar = table.get(symbol)
            if bar is None:
                table[symbol] = [bucket, price, price, price, price, size]
            elif bucket > bar[0]:
                done.append((i, symbol, bar))
                table[symbol] = [bucket, price, price, price, price, size]
            else:
                if price > bar[2]:
                    bar[2] = price
                if price < bar[3]:
                    bar[3] = price
                bar[4] = price
                bar[5] += size
        return self._completed(done)

    def flush(self) -> CompletedBars:
        """Close every open bar (end of a file or of a session)."""
        done = [(-1, symbol, bar) for symbol, bar in self._open.items()]
        self._open.clear()
        return self._completed(done)

    def _completed(self, done: list[tuple[int, str, list[float]]]) -> CompletedBars:
        values = np.array([bar for _, _, bar in done], dtype=np.float64).reshape(len(done), 6)
        return CompletedBars(
            index=np.array([i for i, _, _ in done], dtype=np.int64),
            symbols=[s for _, s, _ in done],
            start_s=values[:, 0] * self.seconds,
            open=values[:, 1],
            high=values[:, 2],
            low=values[:, 3],
            close=values[:, 4],
            volume=values[:, 5],
        )
