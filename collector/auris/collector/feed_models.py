"""Scoring of the transaction and tick feeds on the collector (numpy + onnxruntime only).

``TransactionScorer`` and ``TickScorer`` load signed feed models (``NAME.manifest.json`` +
``NAME.onnx``, domain TRANSACTION or TICK) and score batches of ``auris.v1`` ``Transaction`` or
``Tick`` messages given in time order, returning one ``FeedResult`` per scored record.

State: the per-customer / per-terminal windows and the per-symbol bar windows (and trades of
bars still open) live in the scorer's memory. They start empty and grow with the number of
entities and symbols; ``warm`` feeds earlier records into them without scoring (the collector
replays its stored records after a restart, ``feeds.FeedScorers``). A scorer is safe to call
from several threads (one lock), but its records must arrive in time order.

Transactions: a record whose ``features`` map holds V1..V28 is scored by the ``ulb-pca`` model;
any other by the ``tx-windows`` model (amount, calendar flags and the entity windows). Every record
updates the entity windows, whichever model scores it. Ticks: bars are scored as they come;
trades are made into bars of ``trade_bar_seconds`` and a trade bar is scored when a trade of a
later bar (or ``flush``) closes it. Bars before a symbol's window is full (``min_history``, or the
sequence length for sequence models) get score 0 and the explanation ``warm-up``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from auris.agent.manifest import ManifestError, find_manifests, read_manifest
from auris.agent.runtime import open_session
from auris.agent.signing import ModelTrust
from auris.collector.feed_batch import TickColumns, TransactionColumns
from auris.collector.feed_features import (
    BAR_LOCAL,
    BAR_SEQ,
    FEATURE_SETS,
    TX_ULB,
    TX_WINDOWS,
    BarWindows,
    FeedFeatureSet,
    TradeBars,
    TransactionWindows,
)
from auris.v1 import feed_service_pb2, model_pb2

__all__ = [
    "BatchScores",
    "FeedModel",
    "FeedResult",
    "TickScorer",
    "TransactionScorer",
    "load_feed_model",
    "load_feed_models",
]

logger = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Rows = npt.NDArray[np.intp]
Mask = npt.NDArray[np.bool_]

# Top features named in an explanation.
_TOP = 3
_DEFAULT_WINDOW = 60
_DEFAULT_MIN_HISTORY = 20


@dataclasses.dataclass(frozen=True, slots=True)
class FeedResult:
    """One scored record. ``index`` is the position in the batch of the record it belongs to (for
    a trade bar: the trade that closed it; -1 for bars closed by ``flush``)."""

    index: int
    # transaction_id, or symbol@bar time in ns since the epoch for ticks (the feed service's form).
    record_id: str
    time_ns: int
    model_id: str
    model_version: str
    score: float
    anomalous: bool
    explanation: str

    def to_proto(self, feed_id: str) -> feed_service_pb2.FeedScore:
        message = feed_service_pb2.FeedScore(
            feed_id=feed_id,
            record_id=self.record_id,
            model=model_pb2.ModelRef(model_id=self.model_id, version=self.model_version),
            score=self.score,
            anomalous=self.anomalous,
            explanation=self.explanation,
        )
        message.time.FromNanoseconds(self.time_ns)
        return message


@dataclasses.dataclass
class FeedModel:
    """A loaded, verified feed model."""

    manifest: model_pb2.ModelManifest
    path: Path
    session: ort.InferenceSession
    feature_set: FeedFeatureSet
    # For classifiers: the column of the normal class (score = 1 - P(normal)); else None.
    normal_column: int | None
    # Sequence models read (rows, window, channels); others (rows, columns).
    sequence_length: int = 0
    window: int = _DEFAULT_WINDOW
    min_history: int = _DEFAULT_MIN_HISTORY

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def threshold(self) -> float:
        return self.manifest.threshold.value

    def run(self, x: F32) -> tuple[F64, F32 | None]:
        """(scores, per-feature explanation values or None) for a batch."""
        m = self.manifest
        names = [m.score_output] + ([m.explanation_output] if m.explanation_output else [])
        out = self.session.run(names, {m.input_name: x})
        raw = np.asarray(out[0])
        if self.normal_column is not None:
            scores = 1.0 - raw[:, self.normal_column].astype(np.float64)
        else:
            scores = raw.reshape(len(x)).astype(np.float64)
        explanation = np.asarray(out[1], dtype=np.float32) if len(out) > 1 else None
        return scores, explanation


@dataclasses.dataclass
class BatchScores:
    """Scores of a batch laid out one slot per input record: for a trade, the score of the trade
    bar it closed. ``model`` indexes ``models`` (-1: not scored)."""

    models: list[FeedModel]
    model: npt.NDArray[np.int8]
    score: F64
    anomalous: Mask
    explanation: list[str]

    @classmethod
    def empty(cls, n: int, models: list[FeedModel]) -> BatchScores:
        return cls(models, np.full(n, -1, dtype=np.int8), np.zeros(n), np.zeros(n, dtype=bool), [""] * n)

    def __len__(self) -> int:
        return len(self.score)

    def put(self, rows: Sequence[int], other: BatchScores) -> None:
        """Copy ``other`` (scores of the records at ``rows``) into this batch's slots."""
        index = np.asarray(rows, dtype=np.intp)
        mapping = []
        for model in other.models:
            mine = next((k for k, m in enumerate(self.models) if m is model), None)
            if mine is None:
                self.models.append(model)
                mine = len(self.models) - 1
            mapping.append(mine)
        self.model[index] = np.asarray([*mapping, -1], dtype=np.int8)[other.model]
        self.score[index] = other.score
        self.anomalous[index] = other.anomalous
        for i, text in zip(index.tolist(), other.explanation, strict=True):
            self.explanation[i] = text


_WINDOW_RE = re.compile(r"\bwindow=(\d+)")
_MIN_HISTORY_RE = re.compile(r"\bmin_history=(\d+)")


def load_feed_model(
    path: Path, trust: ModelTrust, domain: model_pb2.ModelDomain.ValueType, *, threads: int = 1
) -> FeedModel:
    """Load one manifest and its graph; ManifestError (one line) when it cannot be used here."""
    manifest = read_manifest(path)
    trust.verify(manifest, str(path))
    if manifest.domain != domain:
        wanted = model_pb2.ModelDomain.Name(domain)
        raise ManifestError(f"{path}: domain {model_pb2.ModelDomain.Name(manifest.domain)}, not {wanted}")
    fs = FEATURE_SETS.get(manifest.feature_set.name)
    if fs is None:
        raise ManifestError(f"{path}: unknown feed feature set {manifest.feature_set.name!r}")
    if manifest.feature_set.version != fs.version:
        raise ManifestError(
            f"{path}: feature set {fs.name} v{fs.version} here, "
            f"the model wants {manifest.feature_set.version}"
        )
    if tuple(manifest.feature_set.columns) != fs.columns:
        raise ManifestError(f"{path}: columns differ from feature set {fs.name} v{fs.version}")
    session = open_session(path, manifest, threads)
    inputs = {i.name: i for i in session.get_inputs()}
    shape = inputs[manifest.input_name].shape
    outputs = {o.name for o in session.get_outputs()}
    for name in filter(None, (manifest.score_output, manifest.explanation_output)):
        if name not in outputs:
            raise ManifestError(f"{path}: graph has no output {name!r}")
    sequence_length = 0
    if fs is BAR_SEQ:
        if len(shape) != 3 or not isinstance(shape[1], int) or shape[2] != len(fs.columns):
            raise ManifestError(
                f"{path}: a {fs.name} model reads (rows, length, {len(fs.columns)}), not {shape}"
            )
        sequence_length = shape[1]
    elif shape[-1] != len(fs.columns):
        raise ManifestError(f"{path}: graph reads {shape[-1]} features, {fs.name} has {len(fs.columns)}")
    normal_column = None
    if manifest.kind == model_pb2.MODEL_KIND_CLASSIFIER:
        normal_column = list(manifest.labels).index(manifest.normal_label)
    window = _WINDOW_RE.search(manifest.preprocessing)
    min_history = _MIN_HISTORY_RE.search(manifest.preprocessing)
    return FeedModel(
        manifest,
        path,
        session,
        fs,
        normal_column,
        sequence_length=sequence_length,
        window=int(window.group(1)) if window else _DEFAULT_WINDOW,
        min_history=int(min_history.group(1)) if min_history else _DEFAULT_MIN_HISTORY,
    )


def load_feed_models(
    folder: Path, trust: ModelTrust, domain: model_pb2.ModelDomain.ValueType, *, threads: int = 1
) -> tuple[list[FeedModel], list[str]]:
    """Every model of ``domain`` in ``folder`` (other domains are skipped silently), and one line per
    model refused."""
    models: list[FeedModel] = []
    refused: list[str] = []
    for path in find_manifests(folder):
        try:
            if read_manifest(path, verify_file=False).domain != domain:
                continue
            models.append(load_feed_model(path, trust, domain, threads=threads))
        except ManifestError as exc:
            refused.append(str(exc))
            logger.warning("refused feed model: %s", exc)
    return models, refused


def _explanations(names: Sequence[str], values: F32, label: str, signed: F32 | None = None) -> list[str]:
    """'name label value, ...' for the _TOP largest values of each row."""
    k = min(_TOP, values.shape[1])
    top = np.argpartition(-values, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(values, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    shown = np.take_along_axis(values if signed is None else signed, top, axis=1)
    fmt = "{} {:+.2f}" if signed is not None else "{} " + label + " {:.3g}"
    return [
        ", ".join(fmt.format(names[j], v) for j, v in zip(row, vals, strict=True))
        for row, vals in zip(top.tolist(), shown.tolist(), strict=True)
    ]


class TransactionScorer:
    """Scores transactions with the ``ulb-pca`` and/or ``tx-windows`` model (see the module docstring).

    ``explain``: "all" writes an explanation for every record, "flagged" only for anomalous ones
    (the others get ""), which is cheaper.
    """

    def __init__(self, models: Sequence[FeedModel], *, explain: str = "flagged") -> None:
        if explain not in ("all", "flagged"):
            raise ValueError("explain must be 'all' or 'flagged'")
        self.models = list(models)
        self.explain = explain
        by_set = {m.feature_set.name: m for m in reversed(self.models)}
        self.ulb = by_set.get(TX_ULB.name)
        self.entity = by_set.get(TX_WINDOWS.name)
        self.windows = TransactionWindows()
        self.refused: list[str] = []
        # Records no loaded model could score, and batches a model failed on.
        self.unscored = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._v_columns = TX_ULB.columns[:-1]

    @classmethod
    def load(
        cls, folder: Path, trust: ModelTrust, *, threads: int = 1, explain: str = "flagged"
    ) -> TransactionScorer:
        """The TRANSACTION models in ``folder``; refused ones are listed in ``refused``."""
        models, refused = load_feed_models(folder, trust, model_pb2.MODEL_DOMAIN_TRANSACTION, threads=threads)
        scorer = cls(models, explain=explain)
        scorer.refused = refused
        return scorer

    def warm(self, transactions: Sequence[feed_service_pb2.Transaction]) -> None:
        """Feed earlier records (in time order) into the entity windows without scoring them."""
        n = len(transactions)
        times = np.fromiter((t.time.seconds + t.time.nanos * 1e-9 for t in transactions), np.float64, n)
        amounts = np.fromiter((t.amount for t in transactions), np.float64, n)
        with self._lock:
            self.windows.update(
                times, [t.customer_id for t in transactions], [t.terminal_id for t in transactions], amounts
            )

    def score(
        self, transactions: Sequence[feed_service_pb2.Transaction], feature_names: Sequence[str] = ()
    ) -> list[FeedResult]:
        """Score a batch in time order; one result per scored record, in input order.
        ``feature_names`` name the feature_values of records that do not name their own."""
        return [r for r in self.score_aligned(transactions, feature_names) if r is not None]

    def score_aligned(
        self, transactions: Sequence[feed_service_pb2.Transaction], feature_names: Sequence[str] = ()
    ) -> list[FeedResult | None]:
        """``score`` laid out one slot per input record (None where no model scored it)."""
        columns = TransactionColumns.of(transactions, names=feature_names)
        scored = self.score_columns(columns)
        time_ns = columns.time_ns.tolist()
        out: list[FeedResult | None] = [None] * len(columns)
        for i in np.flatnonzero(scored.model >= 0).tolist():
            model = scored.models[scored.model[i]]
            out[i] = FeedResult(
                i,
                columns.transaction_ids[i],
                time_ns[i],
                model.model_id,
                model.version,
                float(scored.score[i]),
                bool(scored.anomalous[i]),
                scored.explanation[i],
            )
        return out

    def score_columns(self, columns: TransactionColumns) -> BatchScores:
        """Score a batch (in time order) given as columns: the core of ``score``."""
        n = len(columns)
        models = [m for m in (self.ulb, self.entity) if m is not None]
        out = BatchScores.empty(n, models)
        if n == 0:
            return out
        with self._lock:
            window_rows = self.windows.update(
                columns.times_s, columns.customers, columns.terminals, columns.amounts
            )
            routed = np.zeros(n, dtype=bool)
            if self.ulb is not None and len(columns.ulb_rows):
                rows = columns.ulb_rows
                routed[rows] = True
                x = np.empty((len(rows), len(TX_ULB.columns)), dtype=np.float32)
                x[:, :-1] = columns.ulb_values
                x[:, -1] = columns.amounts[rows]
                self._run(self.ulb, x, rows, out)
            rest = np.flatnonzero(~routed)
            if self.entity is not None and len(rest):
                self._run(self.entity, window_rows[rest].astype(np.float32), rest, out)
            self.unscored += int(np.count_nonzero(out.model < 0))
            return out

    def _run(self, model: FeedModel, x: F32, rows: Rows, out: BatchScores) -> None:
        try:
            scores, errors = model.run(x)
        except Exception as exc:  # onnxruntime's errors are untyped; the records stay unscored
            self.errors += 1
            logger.error(
                "feed model %s@%s failed on %d records: %s", model.model_id, model.version, len(x), exc
            )
            return
        flagged = scores >= model.threshold
        out.model[rows] = next(k for k, m in enumerate(out.models) if m is model)
        out.score[rows] = scores
        out.anomalous[rows] = flagged
        if errors is not None:
            pick = np.arange(len(rows)) if self.explain == "all" else np.flatnonzero(flagged)
            if len(pick):
                texts = _explanations(model.feature_set.columns, errors[pick], "err")
                for i, text in zip(rows[pick].tolist(), texts, strict=True):
                    out.explanation[i] = "reconstruction " + text


def _bar_start_ns(start_s: F64) -> list[int]:
    # Trade bars start on multiples of their length (whole milliseconds): exact in nanoseconds.
    return [round(s * 1e3) * 1_000_000 for s in start_s.tolist()]


class TickScorer:
    """Scores bars (and trades made into bars) with one TICK detector (see the module docstring)."""

    def __init__(
        self, model: FeedModel, *, trade_bar_seconds: float = 60.0, explain: str = "flagged"
    ) -> None:
        if explain not in ("all", "flagged"):
            raise ValueError("explain must be 'all' or 'flagged'")
        self.model = model
        self.explain = explain
        self.bars = BarWindows(model.window, model.min_history, model.sequence_length or _DEFAULT_WINDOW)
        self.trades = TradeBars(trade_bar_seconds)
        self.refused: list[str] = []
        self.errors = 0
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        folder: Path,
        trust: ModelTrust,
        *,
        detector: str | None = None,
        threads: int = 1,
        trade_bar_seconds: float = 60.0,
        explain: str = "flagged",
    ) -> TickScorer:
        """The TICK model in ``folder`` (the default), or the one named ``detector`` in ``folder`` or
        ``folder/candidates``. ManifestError when there is none, or several and none named."""
        models, refused = load_feed_models(folder, trust, model_pb2.MODEL_DOMAIN_TICK, threads=threads)
        if detector is not None:
            if (folder / "candidates").is_dir():
                more, more_refused = load_feed_models(
                    folder / "candidates", trust, model_pb2.MODEL_DOMAIN_TICK, threads=threads
                )
                models += more
                refused += more_refused
            chosen = [m for m in models if m.model_id == detector]
            if not chosen:
                known = ", ".join(sorted({m.model_id for m in models})) or "none"
                raise ManifestError(f"{folder}: no usable tick detector {detector!r} (usable: {known})")
        else:
            chosen = models
            if len(chosen) != 1:
                what = "no usable tick model" if not chosen else "several tick models; name one as detector"
                raise ManifestError(f"{folder}: {what}")
        scorer = cls(chosen[0], trade_bar_seconds=trade_bar_seconds, explain=explain)
        scorer.refused = refused
        return scorer

    def score(self, ticks: Sequence[feed_service_pb2.Tick]) -> list[FeedResult]:
        """Score a batch in time order: one result per bar record, and one per trade bar closed."""
        with self._lock:
            bars = self._bars(TickColumns.of(ticks))
            return self._results(*bars) if bars is not None else []

    def score_columns(self, columns: TickColumns) -> BatchScores:
        """``score`` for a batch given as columns, laid out one slot per record (see
        ``BatchScores``)."""
        out = BatchScores.empty(len(columns), [self.model])
        with self._lock:
            bars = self._bars(columns)
            judged = self._judge(bars[1], bars[2]) if bars is not None else None
        if bars is not None and judged is not None:
            index = bars[0]
            scores, flagged, texts = judged
            out.model[index] = 0
            out.score[index] = scores
            out.anomalous[index] = flagged
            for i, text in zip(index.tolist(), texts, strict=True):
                out.explanation[i] = text
        return out

    def warm(self, ticks: Sequence[feed_service_pb2.Tick]) -> None:
        """Feed earlier records (in time order) into the bar windows and the open trade bars
        without scoring them."""
        with self._lock:
            bars = self._bars(TickColumns.of(ticks))
            if bars is not None:
                _, symbols, v, _ = bars
                self.bars.update(
                    symbols, v[:, 0], v[:, 1], v[:, 2], v[:, 3], v[:, 4], v[:, 5], z_scores=False
                )

    def _bars(self, ticks: TickColumns) -> tuple[I64, list[str], F64, list[int]] | None:
        """The bars a batch brings (its bar records, and the trade bars its trades close), in input
        order: (index of the closing record, symbols, time + OHLCV rows, start times in ns)."""
        t = ticks.times_s
        is_bar = ticks.is_bar
        bar_rows = np.flatnonzero(is_bar)
        trade_rows = np.flatnonzero(~is_bar)
        bar_index = bar_rows
        bar_symbol = [ticks.symbols[i] for i in bar_rows.tolist()]
        bar_values = np.column_stack(
            [t[bar_rows], ticks.open[bar_rows], ticks.high[bar_rows], ticks.low[bar_rows],
             ticks.close[bar_rows], ticks.volume[bar_rows]]
        )  # fmt: skip
        bar_ns = ticks.time_ns[bar_rows].tolist()
        if len(trade_rows):
            done = self.trades.add(
                [ticks.symbols[i] for i in trade_rows.tolist()],
                t[trade_rows],
                ticks.price[trade_rows],
                ticks.size[trade_rows],
            )
            if len(done):
                bar_index = np.concatenate([bar_index, trade_rows[done.index]])
                bar_symbol += done.symbols
                bar_values = np.concatenate(
                    [bar_values, np.column_stack(
                        [done.start_s, done.open, done.high, done.low, done.close, done.volume])]
                )  # fmt: skip
                bar_ns += _bar_start_ns(done.start_s)
        if not len(bar_index):
            return None
        if not len(trade_rows):  # bar records only: already in input order
            return bar_index.astype(np.int64), bar_symbol, bar_values, bar_ns
        order = np.argsort(bar_index, kind="stable")  # trade bars where they closed
        symbols = [bar_symbol[k] for k in order.tolist()]
        stamps = [bar_ns[k] for k in order.tolist()]
        return bar_index[order].astype(np.int64), symbols, bar_values[order], stamps

    def score_aligned(self, ticks: Sequence[feed_service_pb2.Tick]) -> list[FeedResult | None]:
        """``score`` laid out one slot per input record: a bar's own result; for a trade, the result
        of the trade bar it closed (record_id names that bar), or None."""
        out: list[FeedResult | None] = [None] * len(ticks)
        for result in self.score(ticks):
            out[result.index] = result
        return out

    def flush(self) -> list[FeedResult]:
        """Close and score every open trade bar (end of a file or session)."""
        with self._lock:
            done = self.trades.flush()
            if not len(done):
                return []
            values = np.column_stack([done.start_s, done.open, done.high, done.low, done.close, done.volume])
            return self._results(done.index, done.symbols, values, _bar_start_ns(done.start_s))

    def _results(self, index: I64, symbols: list[str], values: F64, stamps: list[int]) -> list[FeedResult]:
        judged = self._judge(symbols, values)
        if judged is None:
            return []
        scores, flagged, texts = judged
        model = self.model
        mid, version = model.model_id, model.version
        return [
            FeedResult(i, f"{sym}@{t}", t, mid, version, s, a, text)
            for i, sym, t, s, a, text in zip(
                index.tolist(), symbols, stamps, scores.tolist(), flagged.tolist(), texts, strict=True
            )
        ]

    def _judge(self, symbols: list[str], values: F64) -> tuple[F64, Mask, list[str]] | None:
        """Feed bars into the windows and score them: (scores, anomalous, explanations), or None
        when the model failed."""
        model = self.model
        sequences = model.sequence_length > 0
        local = model.feature_set is BAR_LOCAL
        feats = self.bars.update(
            symbols, values[:, 0], values[:, 1], values[:, 2], values[:, 3], values[:, 4], values[:, 5],
            sequences=sequences, z_scores=not (sequences or local), local=local,
        )  # fmt: skip
        need = model.sequence_length - 1 if sequences else model.min_history
        ready = feats.history >= need
        n = len(symbols)
        scores = np.zeros(n)
        texts = [""] * n
        x = (
            feats.sequences
            if feats.sequences is not None
            else feats.local
            if feats.local is not None
            else feats.z
        )
        rows = np.flatnonzero(ready)
        if len(rows):
            try:
                s, errors = model.run(x[rows])
            except Exception as exc:  # untyped onnxruntime errors: these bars stay unscored
                self.errors += 1
                logger.error(
                    "tick model %s@%s failed on %d bars: %s", model.model_id, model.version, len(rows), exc
                )
                return None
            scores[rows] = s
            flagged_rows = rows if self.explain == "all" else rows[s >= model.threshold]
            if len(flagged_rows):
                if sequences:
                    assert errors is not None
                    err = errors[np.searchsorted(rows, flagged_rows)]
                    shown = _explanations(BAR_SEQ.columns, err, "err")
                    for j, text in zip(flagged_rows.tolist(), shown, strict=True):
                        texts[j] = "reconstruction " + text
                else:
                    z = x[flagged_rows]
                    shown = _explanations(model.feature_set.columns, np.abs(z), "", signed=z)
                    for j, text in zip(flagged_rows.tolist(), shown, strict=True):
                        texts[j] = text
        for j in np.flatnonzero(~ready).tolist():
            texts[j] = f"warm-up: {int(feats.history[j])} of {need} bars"
        flagged = (scores >= model.threshold) & ready
        return scores, flagged, texts
