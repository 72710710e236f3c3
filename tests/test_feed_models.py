"""Feed features, models and scorers: incremental windows, ONNX parity, the shipped feed models
scored where the training libraries cannot import, and refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from auris.agent.manifest import ManifestError, dump_manifest, find_manifests, read_manifest
from auris.agent.signing import ModelTrust
from auris.collector.feed_features import (
    BAR_LOCAL,
    BAR_SEQ,
    BAR_Z,
    TX_ULB,
    TX_WINDOWS,
    BarWindows,
    EntityWindows,
    TradeBars,
    TransactionWindows,
)
from auris.collector.feed_models import FeedResult, TickScorer, TransactionScorer
from auris.v1 import feed_service_pb2, model_pb2
from tests.conftest import DATA, MODELS, TEST_SIGNING_KEY, TEST_TRUST, resign

FEEDS_DATA = DATA / "feeds"
FEED_MODELS = MODELS / "feeds"
# Trees compare float32 on both sides; matrix products in float32 differ in rounding only.
TREE_TOLERANCE = 1e-5
AE_RELATIVE_TOLERANCE = 1e-4
TORCH_RELATIVE_TOLERANCE = 1e-4
WINDOWS_S = (3600.0, 86400.0, 604800.0)


def _handbook() -> pd.DataFrame:
    frame = pd.read_csv(FEEDS_DATA / "handbook-sample.csv", parse_dates=["TX_DATETIME"])
    return frame.sort_values("TX_DATETIME", kind="stable").reset_index(drop=True)


def _seconds(frame: pd.DataFrame) -> np.ndarray:
    seconds: np.ndarray = frame["TX_DATETIME"].to_numpy("datetime64[ms]").astype(np.int64) / 1e3
    return seconds


def _brute_force_windows(t: np.ndarray, ids: list[str], amounts: np.ndarray) -> np.ndarray:
    """Count, sum, mean of the same entity's EARLIER rows with t - w < s, recomputed per row."""
    out = np.zeros((len(t), 3 * len(WINDOWS_S)))
    for i in range(len(t)):
        if not ids[i]:
            continue
        earlier = np.array([j for j in range(i) if ids[j] == ids[i]], dtype=int)
        for k, w in enumerate(WINDOWS_S):
            inside = earlier[t[earlier] + w > t[i]] if len(earlier) else earlier
            count, total = len(inside), float(amounts[inside].sum()) if len(inside) else 0.0
            out[i, 3 * k : 3 * k + 3] = (count, total, total / count if count else 0.0)
    return out


def test_entity_windows_fed_in_any_batches_equal_a_recomputation_per_row() -> None:
    frame = _handbook()
    t = _seconds(frame)
    amounts = frame["TX_AMOUNT"].to_numpy(float)
    for column in ("CUSTOMER_ID", "TERMINAL_ID"):
        ids = frame[column].astype(str).tolist()
        expected = _brute_force_windows(t, ids, amounts)
        assert expected[:, 0].max() >= 1  # entities do repeat inside an hour
        assert expected[:, 6].max() >= 10  # and over a week
        for batch in (1, 7, 100, len(t)):
            windows = EntityWindows(WINDOWS_S)
            got = np.concatenate(
                [
                    windows.update(t[i : i + batch], ids[i : i + batch], amounts[i : i + batch])
                    for i in range(0, len(t), batch)
                ]
            )
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-7)
        assert windows.entities == len(set(ids))


def test_entity_windows_refuse_time_going_back_and_skip_empty_ids() -> None:
    windows = EntityWindows(WINDOWS_S)
    first = windows.update(np.array([100.0, 200.0]), ["a", ""], np.array([5.0, 7.0]))
    assert first.tolist() == [[0.0] * 9, [0.0] * 9]  # nothing before; "" is no entity
    second = windows.update(np.array([300.0, 3700.0]), ["a", "a"], np.array([1.0, 2.0]))
    assert second[0, :3].tolist() == [1.0, 5.0, 5.0]  # the 5.0 of t=100 is 200 s old
    assert second[1, :3].tolist() == [1.0, 1.0, 1.0]  # t=100 left the hour exactly at t=3700
    assert second[1, 3:6].tolist() == [2.0, 6.0, 3.0]
    assert windows.entities == 1
    with pytest.raises(ValueError, match="time order"):
        windows.update(np.array([10.0]), ["a"], np.array([1.0]))
    with pytest.raises(ValueError, match="time order"):
        windows.update(np.array([5000.0, 4000.0]), ["a", "a"], np.array([1.0, 1.0]))


def test_transaction_windows_columns_late_records_and_unknown_entities() -> None:
    frame = _handbook()
    t = _seconds(frame)
    windows = TransactionWindows()
    rows = windows.update(
        t, frame["CUSTOMER_ID"].astype(str).tolist(), frame["TERMINAL_ID"].astype(str).tolist(),
        frame["TX_AMOUNT"].to_numpy(float),
    )  # fmt: skip
    assert rows.shape == (len(frame), len(TX_WINDOWS.columns))
    col = {c: i for i, c in enumerate(TX_WINDOWS.columns)}
    np.testing.assert_array_equal(rows[:, col["amount"]], frame["TX_AMOUNT"].to_numpy(float))
    hours = frame["TX_DATETIME"].dt.hour.to_numpy()
    np.testing.assert_array_equal(rows[:, col["during_night"]], hours < 6)
    np.testing.assert_array_equal(
        rows[:, col["during_weekend"]], frame["TX_DATETIME"].dt.day_of_week.to_numpy() >= 5
    )
    mean = rows[:, col["customer_7d_mean"]]
    ratio = rows[:, col["amount_over_customer_7d_mean"]]
    np.testing.assert_allclose(ratio[mean > 0], rows[mean > 0, 0] / mean[mean > 0])
    # An unknown customer at a known terminal: customer columns zero, terminal columns not.
    terminal = frame["TERMINAL_ID"].astype(str).value_counts().index[0]
    later = np.array([t[-1] + 60.0, t[-1] + 30.0])  # the second is late: windowed at t[-1] + 60
    extra = windows.update(later, ["never-seen", "never-seen"], [terminal, terminal], np.array([10.0, 20.0]))
    customer = [col[f"customer_{w}_{s}"] for w in ("1h", "24h", "7d") for s in ("count", "sum", "mean")]
    assert extra[0, customer].tolist() == [0.0] * 9
    assert extra[1, col["customer_1h_count"]] == 1.0
    assert extra[0, col["terminal_7d_count"]] >= 1.0
    assert windows.late == 1


def _bars() -> pd.DataFrame:
    return pd.read_csv(FEEDS_DATA / "bars-sample.csv", parse_dates=["ts"])


Arrays = np.ndarray


def _bar_arrays(
    frame: pd.DataFrame | None = None,
) -> tuple[list[str], Arrays, Arrays, Arrays, Arrays, Arrays, Arrays]:
    """symbols, times (s), open, high, low, close, volume (of the fixture bars by default)."""
    frame = _bars() if frame is None else frame
    t = frame["ts"].to_numpy("datetime64[s]").astype(np.int64).astype(float)
    o, h, lo, c, v = (frame[k].to_numpy(float) for k in ("open", "high", "low", "close", "volume"))
    return frame["symbol"].tolist(), t, o, h, lo, c, v


def test_bar_windows_fed_in_any_batches_equal_one_pass() -> None:
    frame = _bars()
    # Interleave the two symbols as a live feed would, keeping each symbol in time order.
    frame = frame.iloc[np.argsort(np.tile(np.arange(400), 2), kind="stable")].reset_index(drop=True)
    symbols, t, o, h, lo, c, v = _bar_arrays(frame)
    whole = BarWindows().update(symbols, t, o, h, lo, c, v, sequences=True, local=True)
    assert whole.sequences is not None
    assert whole.local is not None
    assert whole.local.shape == (800, len(BAR_LOCAL.columns))
    assert whole.z.shape == (800, len(BAR_Z.columns))
    assert whole.sequences.shape == (800, 60, len(BAR_SEQ.columns))
    for batch in (1, 13, 256):
        windows = BarWindows()
        parts = [
            windows.update(symbols[i : i + batch], t[i : i + batch], o[i : i + batch], h[i : i + batch],
                           lo[i : i + batch], c[i : i + batch], v[i : i + batch], sequences=True, local=True)
            for i in range(0, len(t), batch)
        ]  # fmt: skip
        np.testing.assert_array_equal(
            np.concatenate([p.local for p in parts if p.local is not None]), whole.local
        )
        np.testing.assert_array_equal(np.concatenate([p.z for p in parts]), whole.z)
        np.testing.assert_array_equal(np.concatenate([p.history for p in parts]), whole.history)
        np.testing.assert_array_equal(
            np.concatenate([p.sequences for p in parts if p.sequences is not None]), whole.sequences
        )
    # Warm-up: nothing below min_history bars of the symbol; a full window after 60.
    spy = np.flatnonzero(np.asarray(symbols) == "SPY")
    assert whole.history[spy[:3]].tolist() == [0, 1, 2]
    assert not whole.z[spy[:20]].any()
    assert whole.z[spy[20]].any()
    assert not whole.local[spy[:20]].any()
    assert whole.local[spy[20]].all()
    assert (whole.history[spy[60:]] == 60).all()
    assert not whole.sequences[spy[:59]].any()


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_bar_windows_of_many_symbols_at_once_equal_each_symbol_alone(data: st.DataObject) -> None:
    """Bars of many symbols interleaved in any order and cut into any batches give, bit for bit,
    the features each symbol's bars give fed on their own (every column set, warm-up included,
    with any min_history)."""
    symbols, t, o, h, lo, c, v = _bar_arrays()
    base = np.asarray(symbols)
    n_symbols = data.draw(st.integers(1, 12))
    # Symbol k: the fixture's bars of one of its symbols from row k on, renamed, some left out
    # (intervals of several lengths, so the shortest one so far matters).
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    streams = []
    for k in range(n_symbols):
        rows = np.flatnonzero(base == base[k % len(base)])[k * 7 :]
        rows = rows[rng.random(len(rows)) < data.draw(st.sampled_from([0.5, 0.9, 1.0]))]
        streams.append((f"S{k}", rows[: data.draw(st.integers(1, 150))]))
    # Interleave them in a random order that keeps each symbol's rows in time order.
    owners = np.concatenate([np.full(len(rows), k) for k, (_, rows) in enumerate(streams)])
    owners = owners[rng.permutation(len(owners))]
    taken = [0] * n_symbols
    picks, names = [], []
    for k in owners.tolist():
        picks.append(streams[k][1][taken[k]])
        names.append(streams[k][0])
        taken[k] += 1
    pick = np.asarray(picks)
    cols = [a[pick] for a in (t, o, h, lo, c, v)]
    min_history = data.draw(st.sampled_from([2, 5, 20]))
    windows = BarWindows(min_history=min_history)
    got = []
    i = 0
    while i < len(pick):
        m = data.draw(st.integers(1, 200))
        got.append(
            windows.update(names[i : i + m], *(x[i : i + m] for x in cols), sequences=True, local=True)
        )
        i += m
    whole = {f: np.concatenate([getattr(p, f) for p in got]) for f in ("z", "history", "sequences", "local")}
    for name, _ in streams:
        mine = np.asarray(names) == name
        alone = BarWindows(min_history=min_history).update(
            [name] * int(mine.sum()), *(x[mine] for x in cols), sequences=True, local=True
        )
        for field, column in whole.items():
            assert column[mine].tobytes() == getattr(alone, field).tobytes(), (name, field)


def test_bar_window_return_z_is_the_robust_z_against_the_previous_60_bars() -> None:
    """An independent recomputation of the first column for one bar of the SPY hourly series."""
    frame = _bars()
    spy = frame[frame["symbol"] == "SPY"].reset_index(drop=True)
    symbols, t, o, h, lo, c, v = _bar_arrays(spy)
    z = BarWindows().update(symbols, t, o, h, lo, c, v).z
    gap = np.diff(t) > 4 * 3600  # hourly bars: a longer gap opens a session (return from the open)
    ret = np.where(np.concatenate([[True], gap]), np.log(c / o), np.log(c / np.concatenate([[o[0]], c[:-1]])))
    i = 250
    past = ret[i - 60 : i]
    med = np.median(past)
    scale = 1.4826 * np.median(np.abs(past - med))
    assert z[i, 0] == pytest.approx((ret[i] - med) / scale, rel=1e-5)


def test_bar_local_columns_are_return_range_and_run_against_the_previous_60_bars() -> None:
    """An independent recomputation of the three bar-local columns for bars of the SPY hourly series."""
    frame = _bars()
    spy = frame[frame["symbol"] == "SPY"].reset_index(drop=True)
    symbols, t, o, h, lo, c, v = _bar_arrays(spy)
    local = BarWindows().update(symbols, t, o, h, lo, c, v, local=True, z_scores=False).local
    assert local is not None
    gap = np.diff(t) > 4 * 3600  # hourly bars: a longer gap opens a session (return from the open)
    ret = np.where(np.concatenate([[True], gap]), np.log(c / o), np.log(c / np.concatenate([[o[0]], c[:-1]])))
    rng = np.log(h / lo)
    capped = 0
    for i in range(60, 400):
        sd = np.std(ret[i - 60 : i])
        mean_range = rng[i - 60 : i].mean()
        recent = np.minimum(rng[i - 9 : i + 1], 2.5 * mean_range)  # each bar's range capped
        run = np.clip(ret[i - 3 : i + 1], -2 * sd, 2 * sd)  # each return capped
        capped += int((recent < rng[i - 9 : i + 1]).any() or (run != ret[i - 3 : i + 1]).any())
        assert local[i, 0] == pytest.approx(ret[i] / sd, rel=1e-5)
        assert local[i, 1] == pytest.approx(np.log(recent.mean() / mean_range), rel=1e-5, abs=1e-6)
        assert local[i, 2] == pytest.approx(run.sum() / (2 * sd), rel=1e-5, abs=1e-6)
    assert capped > 20  # the caps do bite on these bars


def test_a_bar_local_detector_scores_bars_as_its_graph_does(tmp_path: Path) -> None:
    """A ``tick-local-z`` model (written and signed as training ships one) scores the fixture bars
    through ``TickScorer`` exactly as the numpy formula, and explains flags with its own columns."""
    from auris.training.feeds_export import write_feed_model
    from auris.training.feeds_tick import (
        LOCAL_INPUT,
        LOCAL_SIGNED_COLUMNS,
        local_z_onnx,
        robust_z_reference,
    )

    symbols, t, o, h, lo, c, v = _bar_arrays()
    local = BarWindows().update(symbols, t, o, h, lo, c, v, local=True).local
    assert local is not None
    inverse = np.array([1 / 4.0, 1 / 1.5, 1 / 4.0], dtype=np.float32)
    expected = robust_z_reference(local, inverse, LOCAL_SIGNED_COLUMNS)
    write_feed_model(
        tmp_path, local_z_onnx(inverse), model_id="tick-local-z", version="test",
        kind=model_pb2.MODEL_KIND_ANOMALY_SCORER, domain=model_pb2.MODEL_DOMAIN_TICK,
        feature_set=BAR_LOCAL, input_name=LOCAL_INPUT, score_output="score", threshold=1.0,
        threshold_method="test", evaluation=model_pb2.Evaluation(), training_data=[],
        description="test", preprocessing="BarWindows window=60 min_history=20", libraries=(),
        signing_key=TEST_SIGNING_KEY,
    )  # fmt: skip
    scorer = TickScorer.load(tmp_path, TEST_TRUST)
    ticks = _ticks()[:800]
    results = scorer.score(ticks[:300]) + scorer.score(ticks[300:])
    scores = np.array([r.score for r in results])
    ready = BarWindows().update(symbols, t, o, h, lo, c, v).history >= 20
    np.testing.assert_allclose(scores[ready], expected[ready], rtol=1e-6)
    assert not scores[~ready].any()
    flagged = [r for r in results if r.anomalous]
    assert flagged  # the fixture has moves beyond these scales
    assert all(r.explanation.split(" ")[0] in BAR_LOCAL.columns for r in flagged)


def test_trades_become_bars_like_a_resample() -> None:
    trades = pd.read_csv(FEEDS_DATA / "trades-sample.csv.gz", parse_dates=["ts"])
    t = trades["ts"].to_numpy("datetime64[ms]").astype(np.int64) / 1e3
    bars = TradeBars(60.0)
    symbols = ["IBM"] * len(trades)
    done = bars.add(
        symbols[:1000],
        t[:1000],
        trades["price"].to_numpy(float)[:1000],
        trades["size"].to_numpy(float)[:1000],
    )
    more = bars.add(
        symbols[1000:],
        t[1000:],
        trades["price"].to_numpy(float)[1000:],
        trades["size"].to_numpy(float)[1000:],
    )
    last = bars.flush()
    assert (last.index == -1).all()
    start = np.concatenate([done.start_s, more.start_s, last.start_s])
    close = np.concatenate([done.close, more.close, last.close])
    volume = np.concatenate([done.volume, more.volume, last.volume])
    high = np.concatenate([done.high, more.high, last.high])
    expected = trades.set_index("ts").resample("60s").agg({"price": ["last", "max"], "size": "sum"}).dropna()
    np.testing.assert_array_equal(start, expected.index.to_numpy("datetime64[s]").astype(np.int64))
    np.testing.assert_allclose(close, expected[("price", "last")].to_numpy())
    np.testing.assert_allclose(high, expected[("price", "max")].to_numpy())
    np.testing.assert_allclose(volume, expected[("size", "sum")].to_numpy())
    # Each completed bar names the trade that closed it: the first trade of a later minute.
    closing = done.index
    assert (np.floor(t[closing] / 60) * 60 > done.start_s).all()


def _ulb() -> pd.DataFrame:
    return pd.read_csv(FEEDS_DATA / "ulb-sample.csv")


def test_hybrid_and_gradient_boosting_graphs_match_lightgbm_and_the_autoencoder() -> None:
    import onnxruntime as ort

    from auris.training.autoencoder import fit_autoencoder
    from auris.training.feeds_tx import _ae_errors, _gb_onnx, _hybrid_input, _lgbm, hybrid_graph

    frame = _ulb()
    x = frame[[f"V{i}" for i in range(1, 29)] + ["Amount"]].to_numpy(np.float32)
    y = frame["Class"].to_numpy()
    ae = fit_autoencoder(x[y == 0], seed=0)
    errors, score = _ae_errors(ae, x)
    for hybrid in (False, True):
        inputs = _hybrid_input(x, errors, score) if hybrid else x
        model = _lgbm(0, 30).set_params(min_child_samples=3).fit(inputs, y)
        graph = hybrid_graph(ae.to_onnx(), _gb_onnx(model, inputs.shape[1]), x.shape[1], hybrid=hybrid)
        session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
        probabilities, feature_errors, ae_score = session.run(
            ["probabilities", "feature_errors", "ae_score"], {"features": x}
        )
        np.testing.assert_allclose(
            probabilities[:, 1], model.predict_proba(inputs)[:, 1], atol=TREE_TOLERANCE, rtol=0
        )
        reference_score, reference_errors = ae.reference(x)
        assert (
            np.max(np.abs(ae_score - reference_score) / np.maximum(1.0, np.abs(reference_score)))
            < AE_RELATIVE_TOLERANCE
        )
        np.testing.assert_allclose(feature_errors, reference_errors, rtol=AE_RELATIVE_TOLERANCE, atol=1e-5)


def test_lightgbm_thresholds_equal_to_an_input_route_like_lightgbm() -> None:
    """A float32 input exactly at a split: onnxmltools rounds thresholds to nearest; ours may not."""
    import onnxruntime as ort

    from auris.training.feeds_tx import _gb_onnx, _lgbm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=4000) > 0.5).astype(int)
    model = _lgbm(0, 40).fit(x, y)
    session = ort.InferenceSession(_gb_onnx(model, 3), providers=["CPUExecutionProvider"])
    # Every threshold LightGBM uses, as the float32 values just below and above it.
    thresholds = np.array([n["threshold"] for tree in model.booster_.dump_model()["tree_info"]
                           for n in _split_nodes(tree["tree_structure"])])  # fmt: skip
    probes = np.concatenate(
        [np.nextafter(thresholds.astype(np.float32), np.float32(s)) for s in (-np.inf, np.inf)]
    )
    rows = np.repeat(x[:1], len(probes) * 3, axis=0)
    for j in range(3):
        rows[j * len(probes) : (j + 1) * len(probes), j] = probes
    (ours,) = session.run(["probabilities"], {"gb_input": rows})
    np.testing.assert_allclose(ours[:, 1], model.predict_proba(rows)[:, 1], atol=TREE_TOLERANCE, rtol=0)


def _split_nodes(node: dict) -> list[dict]:  # type: ignore[type-arg]
    if "left_child" not in node:
        return []
    return [node, *_split_nodes(node["left_child"]), *_split_nodes(node["right_child"])]


def test_tick_graphs_match_their_training_libraries() -> None:
    import onnxruntime as ort
    from sklearn.ensemble import IsolationForest

    from auris.training import tick_transformer
    from auris.training.feeds_tick import (
        LOCAL_SIGNED_COLUMNS,
        local_z_onnx,
        robust_z_onnx,
        robust_z_reference,
        tail_scales,
    )
    from auris.training.isolation_forest import isolation_forest_to_onnx

    symbols, t, o, h, lo, c, v = _bar_arrays()
    feats = BarWindows().update(symbols, t, o, h, lo, c, v, sequences=True, local=True)
    ready = feats.history >= 60
    z, seq, local = feats.z[ready], feats.sequences[ready], feats.local[ready]  # type: ignore[index]
    inverse = (1.0 / tail_scales(z)).astype(np.float32)
    session = ort.InferenceSession(robust_z_onnx(inverse), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run(["score"], {"features": z})[0], robust_z_reference(z, inverse), rtol=1e-6
    )
    inverse = (1.0 / tail_scales(local, signed=LOCAL_SIGNED_COLUMNS)).astype(np.float32)
    session = ort.InferenceSession(local_z_onnx(inverse), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run(["score"], {"local": local})[0],
        robust_z_reference(local, inverse, LOCAL_SIGNED_COLUMNS),
        rtol=1e-6,
    )
    forest = IsolationForest(n_estimators=10, max_samples=64, random_state=0).fit(z)
    session = ort.InferenceSession(
        isolation_forest_to_onnx(forest, z.shape[1]), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(
        session.run(["score"], {"features": z})[0], -forest.score_samples(z), atol=TREE_TOLERANCE
    )
    model = tick_transformer.fit(seq[:256], epochs=1, batch=64)
    session = ort.InferenceSession(
        tick_transformer.export_onnx(model, 60, 4), providers=["CPUExecutionProvider"]
    )
    served, channel_errors = session.run(["score", "channel_errors"], {"sequences": seq})
    reference = tick_transformer.score(model, seq)
    assert np.max(np.abs(served - reference) / np.maximum(1.0, np.abs(reference))) < TORCH_RELATIVE_TOLERANCE
    np.testing.assert_allclose(channel_errors.mean(axis=1), served, rtol=1e-5)


def test_fast_bootstrap_figures_equal_scikit_learn_and_the_plain_bootstrap() -> None:
    from auris.training.feeds_eval import auprc, bootstrap, bootstrap_pr, recall_at_precision

    frame = _ulb()
    y = frame["Class"].to_numpy() == 1
    score = np.round(frame["V14"].to_numpy() * -1.0, 1)  # a real, tied score
    w = np.where(y, 1.0, 57.8)
    aps, recalls = bootstrap_pr(y, {"v14": score}, w, target=0.9, rounds=200, seed=1)
    assert aps["v14"].value == pytest.approx(auprc(y, score, w), abs=1e-12)
    assert recalls["v14"].value == pytest.approx(recall_at_precision(y, score, 0.9, w), abs=1e-12)
    plain = bootstrap(y, {"v14": score}, auprc, w, rounds=200, seed=1)["v14"]
    assert aps["v14"].low == pytest.approx(plain.low, abs=0.05)
    assert aps["v14"].high == pytest.approx(plain.high, abs=0.05)


def test_transaction_pipeline_on_fixture_rows_judges_and_exports_both_variants() -> None:
    import onnxruntime as ort

    from auris.collector.feed_features import TX_ULB
    from auris.training.feeds_tx import TxTable, train_transactions

    frame = _ulb()
    x = frame[[f"V{i}" for i in range(1, 29)] + ["Amount"]].to_numpy(np.float32)
    y = frame["Class"].to_numpy() == 1
    t = frame["Time"].to_numpy(float)
    cut = np.median(t)
    table = TxTable(
        name="ulb", feature_set=TX_ULB, x=x, y=y, time=t, fit=np.flatnonzero(t < cut),
        evaluate=np.flatnonzero(t >= cut), calibrate=np.flatnonzero(t < cut), weights=np.where(y, 1.0, 57.8),
        split="fixture", source=FEEDS_DATA / "ulb-sample.csv", sha256="0" * 64,
    )  # fmt: skip
    trained = train_transactions(table, n_estimators=20, folds=2, bootstrap_rounds=50)
    assert set(trained.variants) == {"gb", "hybrid"}
    assert trained.shipped in ("gb", "hybrid")
    assert ("hybrid" if trained.auprc["hybrid - gb"].low > 0 else "gb") == trained.shipped
    for variant in trained.variants.values():
        assert variant.parity_tree < TREE_TOLERANCE
        assert variant.parity_ae < AE_RELATIVE_TOLERANCE
        session = ort.InferenceSession(variant.onnx_bytes, providers=["CPUExecutionProvider"])
        (probabilities,) = session.run(["probabilities"], {"features": x[table.evaluate]})
        np.testing.assert_allclose(probabilities[:, 1], variant.eval_scores, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The shipped models through the scorers


def _transactions() -> list[feed_service_pb2.Transaction]:
    """The ULB fixture rows (V1..V28 in features) then the handbook rows (entity ids), in time order."""
    out = []
    ulb = _ulb()
    for i, row in ulb.iterrows():
        tx = feed_service_pb2.Transaction(
            feed_id="cards", transaction_id=f"ulb-{i}", amount=float(row["Amount"])
        )
        tx.time.FromSeconds(1_500_000_000 + int(row["Time"]))
        for k in range(1, 29):
            tx.features[f"V{k}"] = float(row[f"V{k}"])
        out.append(tx)
    hb = _handbook()
    for _, row in hb.iterrows():
        tx = feed_service_pb2.Transaction(
            feed_id="sim", transaction_id=f"hb-{row['TRANSACTION_ID']}", customer_id=str(row["CUSTOMER_ID"]),
            terminal_id=str(row["TERMINAL_ID"]), amount=float(row["TX_AMOUNT"]),
        )  # fmt: skip
        tx.time.FromDatetime(row["TX_DATETIME"].to_pydatetime())
        out.append(tx)
    return out


def _ticks() -> list[feed_service_pb2.Tick]:
    out = []
    for _, row in _bars().iterrows():
        tick = feed_service_pb2.Tick(
            feed_id="bars", symbol=row["symbol"], is_bar=True, open=row["open"], high=row["high"],
            low=row["low"], close=row["close"], volume=row["volume"],
        )  # fmt: skip
        tick.time.FromDatetime(row["ts"].to_pydatetime())
        out.append(tick)
    trades = pd.read_csv(FEEDS_DATA / "trades-sample.csv.gz", parse_dates=["ts"])
    for _, row in trades.iterrows():
        tick = feed_service_pb2.Tick(feed_id="trades", symbol="IBM", price=row["price"], size=row["size"])
        tick.time.FromDatetime(row["ts"].to_pydatetime())
        out.append(tick)
    return out


def test_every_shipped_feed_manifest_verifies_and_carries_its_baselines() -> None:
    trust = ModelTrust.load([])
    manifests = find_manifests(FEED_MODELS) + find_manifests(FEED_MODELS / "candidates")
    domains = {read_manifest(p).domain for p in manifests}
    assert domains == {model_pb2.MODEL_DOMAIN_TRANSACTION, model_pb2.MODEL_DOMAIN_TICK}
    for path in manifests:
        manifest = read_manifest(path)
        trust.verify(manifest, str(path))
        assert manifest.evaluation.baseline_name == "flag everything"
        assert manifest.evaluation.split
        assert manifest.training_data
        assert [f.feature for f in manifest.reference.features] == list(manifest.feature_set.columns)
        assert (path.parent / manifest.onnx_file).stat().st_size < 4_000_000
    shipped = {read_manifest(p).model_id for p in find_manifests(FEED_MODELS)}
    assert sum(m.startswith("tick-") for m in shipped) == 1  # one default tick detector


def test_shipped_feed_models_score_without_training_libraries(tmp_path: Path) -> None:
    """The scorers in a process where scikit-learn, torch, LightGBM and pandas cannot import."""
    txs, ticks = _transactions(), _ticks()
    (tmp_path / "tx.bin").write_bytes(b"".join(_framed(m.SerializeToString()) for m in txs))
    (tmp_path / "ticks.bin").write_bytes(b"".join(_framed(m.SerializeToString()) for m in ticks))
    script = textwrap.dedent(
        f"""
        import json, sys
        for name in ("sklearn", "skl2onnx", "torch", "lightgbm", "onnxmltools", "pandas", "matplotlib"):
            sys.modules[name] = None  # import fails, as on a collector without the training extra
        from pathlib import Path
        from auris.agent.signing import ModelTrust
        from auris.collector.feed_models import TickScorer, TransactionScorer
        from auris.v1 import feed_service_pb2

        def read(path, cls):
            data, out, i = Path(path).read_bytes(), [], 0
            while i < len(data):
                n = int.from_bytes(data[i:i + 4], "little")
                out.append(cls.FromString(data[i + 4:i + 4 + n]))
                i += 4 + n
            return out

        trust = ModelTrust.load([])
        models = Path({str(FEED_MODELS)!r})
        txs = read({str(tmp_path / "tx.bin")!r}, feed_service_pb2.Transaction)
        ticks = read({str(tmp_path / "ticks.bin")!r}, feed_service_pb2.Tick)
        scorer = TransactionScorer.load(models, trust, explain="all")
        results = [(r, 0) for r in scorer.score(txs[:40])] + [(r, 40) for r in scorer.score(txs[40:])]
        tick_scorer = TickScorer.load(models, trust, explain="all")
        tick_results = (
            [(r, 0) for r in tick_scorer.score(ticks[:500])]
            + [(r, 500) for r in tick_scorer.score(ticks[500:])]
            + [(r, 0) for r in tick_scorer.flush()]
        )
        def row(pair):  # the index made absolute: results index their own batch
            r, offset = pair
            return [r.index + offset if r.index >= 0 else -1, r.record_id, r.model_id, r.score, r.anomalous,
                    r.explanation]

        loaded = {{k for k, v in sys.modules.items() if v is not None}}
        assert not loaded & {{"sklearn", "torch", "lightgbm", "pandas"}}
        print(json.dumps({{
            "refused": scorer.refused + tick_scorer.refused,
            "tx": [row(r) for r in results],
            "ticks": [row(r) for r in tick_results],
        }}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["refused"] == []
    tx = result["tx"]
    assert [r[0] for r in tx] == list(range(len(txs)))  # one result per transaction, in order
    assert [r[1] for r in tx] == [m.transaction_id for m in txs]
    n_ulb = len(_ulb())
    assert {r[2].split("-")[1] for r in tx[:n_ulb]} == {"ulb"}
    assert {r[2].split("-")[1] for r in tx[n_ulb:]} == {"windows"}
    scores = np.array([r[3] for r in tx])
    assert ((scores >= 0) & (scores <= 1)).all()
    assert all(r[5].startswith("reconstruction ") and r[5].count(",") == 2 for r in tx)
    # The real ULB frauds of the fixture outscore its normals (these rows lie in the evaluation
    # split, never trained on; a wiring check, not the model's figures).
    fraud = _ulb()["Class"].to_numpy() == 1
    ulb_scores = scores[:n_ulb]
    assert ulb_scores[fraud].mean() > 10 * ulb_scores[~fraud].mean()
    # The same figures in this process, straight from onnxruntime.
    scorer = TransactionScorer.load(FEED_MODELS, ModelTrust.load([]))
    assert scorer.ulb is not None
    x = _ulb()[[f"V{i}" for i in range(1, 29)] + ["Amount"]].to_numpy(np.float32)
    np.testing.assert_allclose(ulb_scores, scorer.ulb.run(x)[0], atol=1e-6)

    ticks_out = result["ticks"]
    bars = [r for r in ticks_out if r[1].startswith(("BAC@", "SPY@"))]
    assert bars[0][1] == f"BAC@{ticks[0].time.ToNanoseconds()}"
    trade_bars = [r for r in ticks_out if r[1].startswith("IBM@")]
    assert len(bars) == 800
    assert [r[0] for r in bars] == list(range(800))
    assert (
        len(trade_bars)
        == pd.read_csv(FEEDS_DATA / "trades-sample.csv.gz", parse_dates=["ts"])["ts"]
        .dt.floor("60s")
        .nunique()
    )
    assert trade_bars[-1][0] == -1  # closed by flush
    assert all(r[0] >= 800 for r in trade_bars[:-1])  # closed by a trade of the batch
    warm = [r for r in bars if r[5].startswith("warm-up")]
    (default,) = [read_manifest(p) for p in find_manifests(FEED_MODELS) if p.name.startswith("tick-")]
    need = 59 if default.feature_set.name == BAR_SEQ.name else 20  # a full sequence, or min_history
    assert len(warm) == 2 * need
    assert all(r[3] == 0.0 and not r[4] for r in warm)
    assert all(r[5] and not r[5].startswith("warm-up") for r in bars if r not in warm)


def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def test_results_become_feed_scores() -> None:
    result = FeedResult(
        3, "tx-1", 1_700_000_000_123_456_789, "tx-ulb-gb", "1", 0.75, True, "reconstruction V14 err 3"
    )
    message = result.to_proto("cards")
    assert message.feed_id == "cards"
    assert message.time.ToNanoseconds() == 1_700_000_000_123_456_789
    assert (message.model.model_id, message.model.version) == ("tx-ulb-gb", "1")
    assert message.anomalous
    assert message.score == 0.75


def test_records_without_a_model_stay_unscored_and_are_counted() -> None:
    scorer = TransactionScorer.load(FEED_MODELS, ModelTrust.load([]))
    scorer.entity = None  # only the ULB model: a record without V1..V28 has no model
    tx = feed_service_pb2.Transaction(transaction_id="x", amount=3.0, customer_id="c")
    tx.time.CopyFrom(timestamp_pb2.Timestamp(seconds=1_700_000_000))
    tx.features["V1"] = 1.0
    assert scorer.score([tx]) == []
    assert scorer.unscored == 1


def _copy_feed_models(tmp_path: Path) -> Path:
    folder = tmp_path / "feeds"
    shutil.copytree(FEED_MODELS, folder)
    return folder


def test_a_modified_or_foreign_feed_model_is_refused(tmp_path: Path) -> None:
    folder = _copy_feed_models(tmp_path)
    trust = ModelTrust.load([])
    tx_manifest = next(p for p in find_manifests(folder) if p.name.startswith("tx-ulb"))
    manifest = read_manifest(tx_manifest)
    manifest.threshold.value = 0.999  # a quieter model under the release signature
    tx_manifest.write_text(dump_manifest(manifest))
    scorer = TransactionScorer.load(folder, trust)
    assert scorer.ulb is None
    assert scorer.entity is not None  # the other, untouched model still loads
    assert len(scorer.refused) == 1
    assert "does not verify" in scorer.refused[0]
    assert len(scorer.refused[0].splitlines()) == 1
    # Re-signed with a key the collector does not trust: refused too.
    resign(tx_manifest)
    assert "not trusted here" in TransactionScorer.load(folder, trust).refused[0]
    tick_manifest = next(p for p in find_manifests(folder) if p.name.startswith("tick-"))
    resign(tick_manifest)
    with pytest.raises(ManifestError, match="no usable tick model"):
        TickScorer.load(folder, trust)
    with pytest.raises(ManifestError, match="no usable tick detector 'tick-nothing'"):
        TickScorer.load(folder, trust, detector="tick-nothing")


def test_candidate_tick_detectors_load_by_name() -> None:
    trust = ModelTrust.load([])
    names = [
        read_manifest(p).model_id
        for p in find_manifests(FEED_MODELS / "candidates")
        if p.name.startswith("tick-")
    ]
    assert names
    for name in names:
        scorer = TickScorer.load(FEED_MODELS, trust, detector=name)
        assert scorer.model.model_id == name
    default = TickScorer.load(FEED_MODELS, trust).model
    assert default.model_id not in names
    assert TX_ULB.name != TX_WINDOWS.name


def test_aligned_results_have_one_slot_per_record() -> None:
    trust = ModelTrust.load([])
    txs = _transactions()[:50]
    aligned = TransactionScorer.load(FEED_MODELS, trust).score_aligned(txs)
    assert [r.record_id if r else None for r in aligned] == [t.transaction_id for t in txs]
    ticks = _ticks()
    out = TickScorer.load(FEED_MODELS, trust).score_aligned(ticks)
    assert len(out) == len(ticks)
    assert all(r is not None and r.index == i for i, r in enumerate(out[:800]))
    trade_slots = [r for r in out[800:] if r is not None]
    # A trade's slot holds the bar it closed: named by that bar's start, which lies before the trade.
    assert trade_slots
    for r in trade_slots:
        assert r.record_id.startswith("IBM@")
        assert r.time_ns < ticks[r.index].time.ToNanoseconds()


def test_by_default_only_flagged_records_are_explained_and_maps_stay_untouched() -> None:
    scorer = TransactionScorer.load(FEED_MODELS, ModelTrust.load([]))
    txs = _transactions()[: len(_ulb())]
    partial = feed_service_pb2.Transaction(transaction_id="partial", amount=1.0)
    partial.time.CopyFrom(txs[-1].time)
    partial.features["V1"] = 0.5  # not a ULB record: scored by the entity-window model
    for k in range(3, 40):
        partial.features[f"extra{k}"] = 1.0  # enough keys to pass the length check
    results = scorer.score([*txs, partial])
    assert all(bool(r.explanation) == r.anomalous for r in results)
    assert any(r.anomalous for r in results)
    assert results[-1].model_id.startswith("tx-windows")
    assert "V2" not in partial.features  # the scorer read the map without filling it
