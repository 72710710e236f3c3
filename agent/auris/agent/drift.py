"""Drift: how far recent inputs and scores have moved from what a model was trained on.

A manifest's reference holds, per input column and for the score, the training rows'
histogram over quantile edges. The agent bins what each model scores into the same
edges over a rolling window and reports the counts in its heartbeats; anyone holding the
reference and the counts gets the population stability index (PSI) and a binned
Kolmogorov-Smirnov distance (the largest gap between the two cumulative distributions at
the bin edges). The same functions serve training (building references), the agent and
the collector.

PSI reads, by the usual rule of thumb: < 0.1 stable, 0.1-0.25 moving, > 0.25 shifted.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from auris.v1 import model_pb2

__all__ = ["DriftWindow", "histogram", "ks_distance", "psi", "reference_distribution"]

# Empty bins get this share, so that log ratios stay finite.
_EPSILON = 1e-4


def _edges(values: npt.NDArray[np.float64], bins: int) -> list[float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return []
    quantiles = np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])
    return sorted({float(q) for q in quantiles})


def _count(
    values: npt.NDArray[np.float64], edges: Sequence[float] | npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    # Bin i holds edges[i-1] < x <= edges[i]; NaN goes to the last bin (searchsorted puts it there).
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="left")
    return np.bincount(index, minlength=len(edges) + 1).astype(np.int64)


def histogram(values: npt.ArrayLike, edges: Sequence[float]) -> model_pb2.Histogram:
    counts = _count(np.asarray(values, dtype=np.float64).ravel(), edges)
    return model_pb2.Histogram(edges=list(edges), counts=counts.tolist())


def reference_distribution(
    rows: npt.ArrayLike, scores: npt.ArrayLike, columns: Sequence[str], bins: int = 10
) -> model_pb2.ReferenceDistribution:
    """Quantile-edged histograms of the training rows (one per column) and of their scores."""
    matrix = np.asarray(rows, dtype=np.float64)
    reference = model_pb2.ReferenceDistribution()
    for j, column in enumerate(columns):
        edges = _edges(matrix[:, j], bins)
        reference.features.add(feature=column, histogram=histogram(matrix[:, j], edges))
    score_values = np.asarray(scores, dtype=np.float64)
    reference.score.CopyFrom(histogram(score_values, _edges(score_values, bins)))
    return reference


def _shares(counts: Sequence[int]) -> npt.NDArray[np.float64]:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    return np.maximum(c / total if total else np.zeros_like(c), _EPSILON)


def psi(reference: Sequence[int], current: Sequence[int]) -> float:
    """Population stability index of two count vectors over the same bins (0 when either is empty)."""
    if not sum(reference) or not sum(current):
        return 0.0
    r, c = _shares(reference), _shares(current)
    return float(np.sum((c - r) * np.log(c / r)))


def ks_distance(reference: Sequence[int], current: Sequence[int]) -> float:
    """Largest gap between the two cumulative distributions at the bin edges."""
    if not sum(reference) or not sum(current):
        return 0.0
    r = np.cumsum(reference) / sum(reference)
    c = np.cumsum(current) / sum(current)
    return float(np.max(np.abs(r - c)))


def _float32_floor(edges: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """Each edge as the largest float32 not above it: for a float32 x, ``x > edge`` exactly
    when ``x > floor``, so float32 rows compare without being widened."""
    with np.errstate(over="ignore"):  # beyond float32: inf, then the largest float32
        low = edges.astype(np.float32)
    over = low.astype(np.float64) > edges
    low[over] = np.nextafter(low[over], np.float32(-np.inf))
    return low


class _ColumnBins:
    """Histograms of every column of a matrix over the column's own edges, in one pass per edge
    position (a column has up to ~10 edges), at a cost that does not depend on the values: a
    searchsorted per column cost about the same on the test captures' flows (most values the
    same few), 1.8x as much on the benchmark capture's (spread values).

    A column's bin is the number of its edges below the value (searchsorted's side="left", as
    ``_count``), NaN in the last. Counts of all columns come end to end, ``split`` parts them."""

    def __init__(self, edges: Sequence[npt.NDArray[np.float64]]) -> None:
        self.lengths = np.array([len(e) for e in edges], dtype=np.int64)
        width = int(self.lengths.max()) if len(edges) else 0
        padded = np.full((width, len(edges)), np.inf)  # an edge position per row
        for j, e in enumerate(edges):
            padded[: len(e), j] = e
        self._edges64 = padded
        self._edges32 = _float32_floor(padded)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths + 1)[:-1]]).astype(np.int64)
        self.total = int((self.lengths + 1).sum())
        # Bin numbers in 16 bits while they fit: adding the comparisons costs half as much.
        self._index_type = np.int16 if self.total < 2**15 else np.int64
        self._offsets = self.offsets.astype(self._index_type)

    def count(self, rows: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.int64]:
        if not self.total or not len(rows):
            return np.zeros(self.total, dtype=np.int64)
        edges = self._edges32 if rows.dtype == np.float32 else self._edges64
        if edges is self._edges64:
            rows = rows.astype(np.float64, copy=False)
        # In the rows' own memory order (model inputs are often column-major): mixed orders cost 6x.
        above = np.empty_like(rows, dtype=np.bool_)
        index: npt.NDArray[np.signedinteger[Any]] = np.zeros_like(rows, dtype=self._index_type)
        for position in edges:
            np.greater(rows, position, out=above)
            np.add(index, above, out=index)
        nan = np.isnan(rows)
        if nan.any():
            index[nan] = np.broadcast_to(self.lengths, rows.shape)[nan]
        np.add(index, self._offsets, out=index)
        return np.bincount(index.ravel(), minlength=self.total).astype(np.int64, copy=False)

    def split(self, counts: npt.NDArray[np.int64]) -> list[npt.NDArray[np.int64]]:
        return np.split(counts, self.offsets[1:])


# Rows binned at once (see DriftWindow._pending).
_BIN_ROWS = 1024


class DriftWindow:
    """One model's rolling window of binned inputs and scores, kept as per-minute buckets."""

    def __init__(self, reference: model_pb2.ReferenceDistribution, window_s: float = 3600.0) -> None:
        self.reference = reference
        self.window_s = window_s
        self._feature_edges = [np.asarray(f.histogram.edges, dtype=np.float64) for f in reference.features]
        self._score_edges = np.asarray(reference.score.edges, dtype=np.float64)
        self._bins = _ColumnBins(self._feature_edges)
        # minute -> (every column's feature counts, end to end (_ColumnBins.split); score counts; flows)
        self._buckets: collections.OrderedDict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]]
        self._buckets = collections.OrderedDict()
        # Batches not binned yet: binning costs a searchsorted per column, so rows are binned
        # _BIN_ROWS at a time (and before a report), not batch by batch (at batch 1: 60 calls a flow).
        self._pending: list[tuple[int, npt.NDArray[np.float32], npt.NDArray[np.float64]]] = []
        self._pending_rows = 0
        # The scoring loop observes while the heartbeat thread reports.
        self._lock = threading.Lock()

    def observe(
        self, inputs: npt.NDArray[np.float32], scores: npt.NDArray[np.float64], now: float | None = None
    ) -> None:
        """Add a scored batch (rows in the model's column order)."""
        minute = int((time.time() if now is None else now) // 60)
        with self._lock:
            self._observe(minute, inputs, scores)

    def _observe(self, minute: int, inputs: npt.NDArray[np.float32], scores: npt.NDArray[np.float64]) -> None:
        self._pending.append((minute, inputs, np.asarray(scores, dtype=np.float64)))
        self._pending_rows += len(inputs)
        if self._pending_rows >= _BIN_ROWS:
            self._bin_pending()

    def _bin_pending(self) -> None:
        for minute, group in itertools.groupby(self._pending, key=lambda batch: batch[0]):
            batches = list(group)
            inputs = np.concatenate([b[1] for b in batches]) if len(batches) > 1 else batches[0][1]
            scores = np.concatenate([b[2] for b in batches]) if len(batches) > 1 else batches[0][2]
            self._bin(minute, inputs, scores)
        self._pending.clear()
        self._pending_rows = 0

    def _bin(self, minute: int, inputs: npt.NDArray[np.float32], scores: npt.NDArray[np.float64]) -> None:
        if minute not in self._buckets:
            self._buckets[minute] = (
                np.zeros(self._bins.total, dtype=np.int64),
                np.zeros(len(self._score_edges) + 1, dtype=np.int64),
                0,
            )
            while self._buckets and next(iter(self._buckets)) < minute - self.window_s / 60:
                self._buckets.popitem(last=False)
        features, score_counts, flows = self._buckets[minute]
        features += self._bins.count(inputs)
        score_counts += _count(np.asarray(scores, dtype=np.float64), self._score_edges)
        self._buckets[minute] = (features, score_counts, flows + len(inputs))

    def report(self, model: model_pb2.ModelRef, now: float | None = None) -> model_pb2.ModelDrift:
        """The window's counts and their PSI/KS against the reference."""
        oldest = int((time.time() if now is None else now) // 60) - self.window_s / 60
        with self._lock:
            self._bin_pending()
            live = [b for minute, b in self._buckets.items() if minute >= oldest]
        drift = model_pb2.ModelDrift(model=model, flows=sum(b[2] for b in live))
        score = (
            np.sum([b[1] for b in live], axis=0) if live else np.zeros(len(self._score_edges) + 1, np.int64)
        )
        drift.score.CopyFrom(model_pb2.Histogram(edges=self.reference.score.edges, counts=score.tolist()))
        drift.score_psi = psi(self.reference.score.counts, score.tolist())
        drift.score_ks = ks_distance(self.reference.score.counts, score.tolist())
        features = np.sum([b[0] for b in live], axis=0) if live else np.zeros(self._bins.total, np.int64)
        for ref, counts in zip(self.reference.features, self._bins.split(features), strict=True):
            drift.features.add(
                feature=ref.feature,
                histogram=model_pb2.Histogram(edges=ref.histogram.edges, counts=counts.tolist()),
            )
            value = psi(ref.histogram.counts, counts.tolist())
            if value > drift.max_feature_psi:
                drift.max_feature_psi, drift.max_psi_feature = value, ref.feature
        return drift
