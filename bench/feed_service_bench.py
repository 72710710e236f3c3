"""Feeds end to end: records through gRPC into a real collector that validates, scores, stores
and acknowledges them, against the scorers alone in the same run.

    .venv/bin/python bench/feed_service_bench.py               # report in bench/results/feed-service.md
    .venv/bin/python bench/feed_service_bench.py --rows 50000  # a quick look

A real ``auris-collector serve`` (plaintext on loopback, ``feed_models_dir`` = the shipped
``models/feeds``, a fresh database) and this process as the producer. Requests are serialised
before the clock starts and sent through a generic channel, so the figures are the collector's
(validation, scoring, SQLite commit, the per-record scores in the answer) plus the loopback
round trip, not the client's protobuf encoding.

- Single transaction: ``SubmitTransactions`` with one ULB record, one call after the other; the
  latency from send to answer. Baseline: ``TransactionScorer.score([record])`` alone.
- Batched: ``StreamTransactions`` / ``StreamTicks`` with ``--batch`` records a request, the
  client sending as fast as gRPC's flow control lets it; rate = records / time to the last answer.
  Baseline: the scorer alone on the same batches. Each is run twice, into two feeds: answers with
  every record's score (the default), and with the anomalous records' scores only
  (``answer_scores = ANSWER_SCORES_ANOMALOUS``; every score is stored either way).
- Every batched figure (and its baseline) is the median of ``--passes`` passes, with their range:
  this host's speed swings by a third within minutes. The passes of a row alternate with the
  other rows' (bars go to a new feed each pass: a feed accepts a symbol's times once).

Targets (issue 6): single-transaction p99 <= 10 ms, >= 50k transactions/s batched, >= 100k bars/s.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from feeds_bench import _bars, _spread, _ulb_transactions

from auris.agent.signing import ModelTrust
from auris.collector.feed_features import TX_ULB
from auris.collector.feed_models import TickScorer, TransactionScorer
from auris.v1 import feed_service_pb2
from benchlib import (
    REPO,
    Collector,
    add_figures_argument,
    fmt,
    loadavg,
    machine,
    percentile,
    say,
    verdict,
    versions,
    write_figures,
)

MODELS = REPO / "models" / "feeds"
VERSIONS = ["grpcio", "numpy", "onnxruntime", "protobuf"]
_SERVICE = "/auris.v1.FeedService/"


def _refeed(records: Sequence[Any], feed_id: str) -> list[Any]:
    out = []
    for record in records:
        copy = type(record)()
        copy.CopyFrom(record)
        copy.feed_id = feed_id
        out.append(copy)
    return out


def _as_feature_values(records: Sequence[feed_service_pb2.Transaction], names: Sequence[str]) -> list[Any]:
    """Copies of ``records`` with their features given as feature_values in ``names``' order (the
    request names them once)."""
    out = []
    for record in records:
        copy = feed_service_pb2.Transaction()
        copy.CopyFrom(record)
        copy.ClearField("features")
        copy.feature_values.extend(record.features[name] for name in names)
        out.append(copy)
    return out


def single_latency(
    channel: grpc.Channel, records: Sequence[feed_service_pb2.Transaction], warm: int
) -> list[float]:
    """ms from send to answer of one-record SubmitTransactions calls, after ``warm`` calls."""
    call = channel.unary_unary(_SERVICE + "SubmitTransactions", None, None)
    payloads = [
        feed_service_pb2.SubmitTransactionsRequest(transactions=[r]).SerializeToString() for r in records
    ]
    times = []
    for i, payload in enumerate(payloads):
        start = time.perf_counter()
        answer = feed_service_pb2.SubmitTransactionsResponse.FromString(call(payload, timeout=30))
        elapsed = (time.perf_counter() - start) * 1e3
        if answer.accepted != 1:
            raise RuntimeError(f"record {i} not accepted: {answer.rejected}")
        if i >= warm:
            times.append(elapsed)
    return times


def stream_rate(
    channel: grpc.Channel, method: str, payloads: Sequence[bytes], answer_type: Any, records: int
) -> float:
    """Records/s of a client stream of pre-serialised requests, to the last answer."""
    call = channel.stream_stream(_SERVICE + method, None, None)
    accepted = 0
    start = time.perf_counter()
    for raw in call(iter(payloads), timeout=600):
        accepted += answer_type.FromString(raw).accepted
    elapsed = time.perf_counter() - start
    if accepted != records:
        raise RuntimeError(f"{method}: {accepted} of {records} records accepted")
    return records / elapsed


def scorer_rate(make: Callable[[], Any], records: Sequence[Any], batch: int) -> float:
    scorer = make()
    start = time.perf_counter()
    for i in range(0, len(records), batch):
        scorer.score(records[i : i + batch])
    return len(records) / (time.perf_counter() - start)


def scorer_latency(make: Callable[[], Any], records: Sequence[Any], warm: int) -> list[float]:
    scorer = make()
    times = []
    for i, record in enumerate(records):
        start = time.perf_counter()
        scorer.score([record])
        if i >= warm:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def _batches(records: Sequence[Any], batch: int, request: Callable[[Sequence[Any]], Any]) -> list[bytes]:
    return [request(records[i : i + batch]).SerializeToString() for i in range(0, len(records), batch)]


def _median(rates: Sequence[float]) -> str:
    """The median of a row's passes and their range."""
    if len(rates) == 1:
        return fmt(rates[0])
    return f"{fmt(percentile(rates, 50))} ({fmt(min(rates))}-{fmt(max(rates))})"


@contextlib.contextmanager
def running_collector(keep: Path | None) -> Iterator[Collector]:
    with tempfile.TemporaryDirectory(prefix="auris-feed-bench-") as tmp:
        workdir = keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "collector.toml"
        config.write_text(f'feed_models_dir = "{MODELS}"\n', encoding="utf-8")
        collector = Collector(workdir, config=config)
        try:
            yield collector
        finally:
            collector.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000, help="records per batched pass (%(default)s)")
    p.add_argument("--batch", type=int, default=1000, help="records per request (%(default)s)")
    p.add_argument("--latency-calls", type=int, default=3000)
    p.add_argument("--passes", type=int, default=3, help="passes of each batched row (%(default)s)")
    p.add_argument("--symbols", type=int, default=500, help="symbols of the spread bars row (%(default)s)")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "feed-service.md")
    p.add_argument("--keep", type=Path, default=None, help="keep the collector's folder here")
    add_figures_argument(p)
    args = p.parse_args(argv)
    data = args.data if args.data.is_dir() else None
    trust = ModelTrust.load([])

    def tx_scorer() -> TransactionScorer:
        return TransactionScorer.load(MODELS, trust)

    def tick_scorer() -> TickScorer:
        return TickScorer.load(MODELS, trust)

    say("building records")
    warm = 300
    ulb = _ulb_transactions(args.rows + args.latency_calls + warm)
    single = _refeed(ulb[: args.latency_calls + warm], "single")
    batched = _refeed(ulb[args.latency_calls + warm :], "batched")
    bars, bar_source = _bars(args.rows, data)
    tx_payloads = _batches(
        batched, args.batch, lambda b: feed_service_pb2.StreamTransactionsRequest(transactions=b)
    )
    anomalous = feed_service_pb2.ANSWER_SCORES_ANOMALOUS

    spread = _spread(bars, args.symbols)
    n_spread = len({b.symbol for b in spread})

    def bar_passes(
        feed: str, answer: feed_service_pb2.AnswerScores.ValueType, records: Sequence[feed_service_pb2.Tick]
    ) -> list[list[bytes]]:
        """Requests of the bars for each pass, into a feed of their own."""
        return [
            _batches(
                _refeed(records, f"{feed}-{k}"),
                args.batch,
                lambda b: feed_service_pb2.StreamTicksRequest(ticks=b, answer_scores=answer),
            )
            for k in range(args.passes)
        ]

    bar_payloads = bar_passes("bars", feed_service_pb2.ANSWER_SCORES_UNSPECIFIED, bars)
    spread_payloads = bar_passes("spread", feed_service_pb2.ANSWER_SCORES_UNSPECIFIED, spread)
    v_names = list(TX_ULB.columns[:-1])
    tx_payloads_values = _batches(
        _as_feature_values(_refeed(batched, "batched-values"), v_names),
        args.batch,
        lambda b: feed_service_pb2.StreamTransactionsRequest(transactions=b, feature_names=v_names),
    )
    tx_payloads_anomalous = _batches(
        _refeed(batched, "batched-anomalous"),
        args.batch,
        lambda b: feed_service_pb2.StreamTransactionsRequest(transactions=b, answer_scores=anomalous),
    )
    bar_payloads_anomalous = bar_passes("bars-anomalous", anomalous, bars)

    say("scorers alone")
    base_single = scorer_latency(tx_scorer, single, warm)
    base_txs, base_barss, base_spreads = [], [], []
    for _ in range(args.passes):
        base_txs.append(scorer_rate(tx_scorer, batched, args.batch))
        base_barss.append(scorer_rate(tick_scorer, bars, args.batch))
        base_spreads.append(scorer_rate(tick_scorer, spread, args.batch))
    base_tx, base_bars, base_spread = (percentile(x, 50) for x in (base_txs, base_barss, base_spreads))

    with running_collector(args.keep) as collector, grpc.insecure_channel(
        collector.address,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    ) as channel:  # fmt: skip
        say(f"collector at {collector.address}: single transactions")
        e2e_single = single_latency(channel, single, warm)
        tx_answer, tick_answer = (
            feed_service_pb2.StreamTransactionsResponse,
            feed_service_pb2.StreamTicksResponse,
        )
        runs: dict[str, list[float]] = {}
        for k in range(args.passes):
            say(f"pass {k + 1} of {args.passes}: transactions (maps, feature_values), bars, both with the "
                f"anomalous scores answered, bars over {n_spread} symbols")  # fmt: skip
            for name, method, payloads, answer, records in (
                ("tx", "StreamTransactions", tx_payloads, tx_answer, len(batched)),
                ("tx_values", "StreamTransactions", tx_payloads_values, tx_answer, len(batched)),
                ("bars", "StreamTicks", bar_payloads[k], tick_answer, len(bars)),
                ("tx_anomalous", "StreamTransactions", tx_payloads_anomalous, tx_answer, len(batched)),
                ("bars_anomalous", "StreamTicks", bar_payloads_anomalous[k], tick_answer, len(bars)),
                ("spread", "StreamTicks", spread_payloads[k], tick_answer, len(spread)),
            ):
                runs.setdefault(name, []).append(stream_rate(channel, method, payloads, answer, records))

    e2e_tx, e2e_tx_values, e2e_bars, e2e_tx_anomalous, e2e_bars_anomalous, e2e_spread = (
        percentile(runs[name], 50)
        for name in ("tx", "tx_values", "bars", "tx_anomalous", "bars_anomalous", "spread")
    )
    p50, p99 = percentile(e2e_single, 50), percentile(e2e_single, 99)
    b50, b99 = percentile(base_single, 50), percentile(base_single, 99)
    rows = [
        ("single transaction, p50 (ms)", f"{b50:.2f}", f"{p50:.2f}", f"{p50 / b50:.1f}x", "", ""),
        ("single transaction, p99 (ms)", f"{b99:.2f}", f"{p99:.2f}", f"{p99 / b99:.1f}x", "<= 10 ms",
         verdict(p99 <= 10)),
        (f"transactions/s, batches of {args.batch}", _median(base_txs), _median(runs["tx"]),
         f"{e2e_tx / base_tx:.2f}x", ">= 50k", verdict(e2e_tx >= 50_000)),
        (f"transactions/s, batches of {args.batch}, V1..V28 as feature_values named once per request "
         "(scorer alone: the same records as maps)", _median(base_txs), _median(runs["tx_values"]),
         f"{e2e_tx_values / base_tx:.2f}x", ">= 50k", verdict(e2e_tx_values >= 50_000)),
        (f"bars/s, batches of {args.batch}", _median(base_barss), _median(runs["bars"]),
         f"{e2e_bars / base_bars:.2f}x", ">= 100k", verdict(e2e_bars >= 100_000)),
        (f"transactions/s, batches of {args.batch}, anomalous scores in the answer", _median(base_txs),
         _median(runs["tx_anomalous"]), f"{e2e_tx_anomalous / base_tx:.2f}x", ">= 50k",
         verdict(e2e_tx_anomalous >= 50_000)),
        (f"bars/s, batches of {args.batch}, anomalous scores in the answer", _median(base_barss),
         _median(runs["bars_anomalous"]), f"{e2e_bars_anomalous / base_bars:.2f}x", ">= 100k",
         verdict(e2e_bars_anomalous >= 100_000)),
        (f"bars/s, batches of {args.batch}, the same bars spread over {n_spread} symbols "
         f"({args.batch / n_spread:g} bars of each in a request)", _median(base_spreads),
         _median(runs["spread"]), f"{e2e_spread / base_spread:.2f}x", ">= 100k",
         verdict(e2e_spread >= 100_000)),
    ]  # fmt: skip
    text = [
        "# Feed service benchmark (`bench/feed_service_bench.py`)\n\n",
        "Through gRPC into a real collector (validation, scoring with the shipped feed models, SQLite "
        "commit, one score per record in the answer unless the row says the anomalous scores only), "
        "against the scorer alone on the same records in the same run.\n\n",
        "Transactions are sent as maps (`features`), except in the row that says feature_values "
        "(`feature_values` per record, `feature_names` once per request: the same values). "
        f"Records: ULB fixture rows with V1..V28 (`tx-ulb-gb`); bars: {bar_source} "
        "(the default tick detector in models/feeds). "
        f"{args.latency_calls} single calls after {warm} warm-up calls; {len(batched):,} transactions "
        f"and {len(bars):,} bars in requests of {args.batch}. Batched rows: the median of {args.passes} "
        "passes (range in brackets), the passes of the rows alternating; ratios and verdicts from the "
        "medians.\n\n",
        "| what | scorer alone | end to end | ratio | target | |\n|---|---|---|---|---|---|\n",
        *(f"| {' | '.join(r)} |\n" for r in rows),
        f"\nMachine: {'; '.join(f'{k} {v}' for k, v in machine().items())}; load average at the end "
        f"{loadavg()}. The producer runs on the same cores as the collector.\n\nVersions: "
        f"{', '.join(f'{k} {v}' for k, v in versions(VERSIONS).items())}.\n",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(text), encoding="utf-8")
    figures = [[w, b, o, r, f"{t}: {m}" if t else "(information)"] for w, b, o, r, t, m in rows]
    write_figures(args.figures, "feed-service", figures)
    print("".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
