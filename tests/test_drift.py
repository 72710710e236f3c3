"""Drift: references in manifests, PSI/KS over the agent's window, the collector's view and its
alert rule, on a real collector with a real agent replaying real captures."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from auris.agent.drift import DriftWindow, histogram, ks_distance, psi, reference_distribution
from auris.agent.manifest import read_manifest
from auris.collector import ctl
from auris.collector.alerts import AlertRule
from auris.collector.client import CollectorClient
from auris.v1 import model_pb2
from tests.conftest import MODELS, PCAPS, run_agent, running_collector


def test_psi_and_ks_are_zero_for_the_same_distribution_and_grow_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, 20_000)
    reference = reference_distribution(train[:, None], train, ["x"])
    edges = reference.score.edges
    assert len(edges) == 9  # ten quantile bins
    assert sum(reference.score.counts) == 20_000
    same = histogram(rng.normal(0, 1, 5_000), edges).counts
    moved = histogram(rng.normal(0.5, 1, 5_000), edges).counts
    far = histogram(rng.normal(3, 1, 5_000), edges).counts
    assert psi(reference.score.counts, same) < 0.01
    assert ks_distance(reference.score.counts, same) < 0.03
    assert 0.1 < psi(reference.score.counts, moved) < psi(reference.score.counts, far)
    assert ks_distance(reference.score.counts, moved) == pytest.approx(
        0.19, abs=0.04
    )  # Phi(0.5)-Phi(0) ~ 0.19
    assert psi(reference.score.counts, [0] * 10) == 0.0  # nothing seen: no claim


def test_the_window_forgets_old_minutes() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, (5_000, 2))
    reference = reference_distribution(train, train[:, 0], ["a", "b"])
    window = DriftWindow(reference, window_s=600)
    ref = model_pb2.ModelRef(model_id="m", version="1")
    window.observe(rng.normal(4, 1, (1_000, 2)).astype(np.float32), rng.normal(4, 1, 1_000), now=0.0)
    shifted = window.report(ref, now=60.0)
    assert shifted.flows == 1_000
    assert shifted.score_psi > 1.0
    assert shifted.max_psi_feature in ("a", "b")
    window.observe(rng.normal(0, 1, (1_000, 2)).astype(np.float32), rng.normal(0, 1, 1_000), now=1_200.0)
    calm = window.report(ref, now=1_200.0)  # the shifted minute is out of the 10-minute window
    assert calm.flows == 1_000
    assert calm.score_psi < 0.05


def test_shipped_models_carry_a_reference_of_their_own_columns() -> None:
    for path in (MODELS / "nfstream-rf.manifest.json", MODELS / "nfstream-ae.manifest.json"):
        manifest = read_manifest(path)
        reference = manifest.reference
        assert [f.feature for f in reference.features] == list(manifest.feature_set.columns)
        assert sum(reference.score.counts) == sum(reference.features[0].histogram.counts) > 1000


def test_agents_report_drift_and_a_drift_rule_opens_an_alert(tmp_path: Path) -> None:
    # The agent starts with both shipped defaults and follows the collector's set (nfstream-rf
    # alone) once it has it, keeping the running nfstream-rf, drift window included; a replay this
    # short may end before: nfstream-rf's window is reported either way.
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in MODELS.glob("nfstream-rf.*"):
        shutil.copy(path, shipped)
    rule = AlertRule(name="drift", model="nfstream-rf", max_psi=0.1, severity="warning")
    with running_collector(tmp_path / "auris.db", models_dir=str(shipped), alert_rules=(rule,)) as collector:
        # A port scan alone: nothing like the mix of flows the classifier was trained on.
        run = run_agent(collector.address, [PCAPS / "masscan_tcp_0_1000_20190821.pcap"], tmp_path / "agent")
        assert run.returncode == 0, run.stderr
        with CollectorClient(collector.address, insecure=True) as client:
            (agent,) = client.list_agents()
            drift = next(d for d in agent.health.drift if d.model.model_id == "nfstream-rf")
            assert drift.model.version == "1"
            assert drift.flows == agent.health.flows_metered > 0
            assert drift.max_feature_psi > 0.1
            assert len(drift.features) == len(
                read_manifest(MODELS / "nfstream-rf.manifest.json").feature_set.columns
            )
            (alert,) = client.alerts()
            assert alert.rule == "drift"
            assert alert.key == f"agent_id={agent.agent_id} model=nfstream-rf@1"
            assert "drift: PSI >= 0.1" in alert.summary
            assert list(alert.verdict_ids) == []
        out = io.StringIO()
        assert ctl.main(["--collector", collector.address, "--insecure", "models", "drift"], out) == 0
        lines = out.getvalue().splitlines()
        assert lines[0].split()[:3] == ["AGENT", "MODEL", "FLOWS"]
        mine = next(
            line.split() for line in lines if line.startswith(agent.agent_id) and "nfstream-rf@1" in line
        )
        fleet = next(line.split() for line in lines if line.startswith("(fleet)") and "nfstream-rf@1" in line)
        # One agent: the fleet's figures are that agent's.
        assert mine[1:5] == fleet[1:5]
        assert mine[1:3] == ["nfstream-rf@1", str(drift.flows)]
        if any(d.model.model_id == "nfstream-ae" for d in agent.health.drift):
            # The agent's shipped autoencoder, never registered here: listed, no fleet figures.
            (line,) = [line for line in lines if line.startswith("(fleet)") and "nfstream-ae@2" in line]
            assert line.endswith("not in the registry")


def test_a_drift_rule_takes_no_verdict_condition() -> None:
    with pytest.raises(ValueError, match="takes no verdict condition"):
        AlertRule(name="bad", max_psi=0.2, anomalous=True)
    with pytest.raises(ValueError, match="positive"):
        AlertRule(name="bad", max_psi=0.0)


def test_column_bins_equal_a_searchsorted_per_column_at_and_around_every_edge() -> None:
    """The drift window bins all columns at once, float32 rows against float32 floors of the
    edges: the counts must be searchsorted's, per column, for values on, just below and just
    above each edge (edges float32 cannot hold included), NaN, infinities and float64 rows."""
    from auris.agent.drift import _ColumnBins, _count

    edges = [
        np.array([0.1, 0.2, 1e-3 / 3, 7.0]),  # not float32 numbers
        np.array([-5.0, 0.0, 5.0]),
        np.array([], dtype=np.float64),  # a constant training column: one bin
        np.array([1e39]),  # beyond float32
    ]
    edges = [np.sort(e) for e in edges]
    rng = np.random.default_rng(7)
    columns = []
    for e in edges:
        with np.errstate(over="ignore"):  # 1e39 is inf in float32
            on = e.astype(np.float32)
        near = [np.nextafter(v, np.float32(d)) for v in on for d in (-np.inf, np.inf)]  # float32 neighbours
        values = [*on, *near, np.nan, np.inf, -np.inf, *rng.normal(0, 3, 40)]
        columns.append(np.resize(np.array(values, dtype=np.float32), 64))
    rows = np.stack(columns, axis=1)
    bins = _ColumnBins(edges)
    for matrix in (rows, rows.astype(np.float64)):
        expected = np.concatenate([_count(matrix[:, j].astype(np.float64), e) for j, e in enumerate(edges)])
        assert bins.count(matrix).tolist() == expected.tolist()
    assert [len(part) for part in bins.split(bins.count(rows))] == [5, 4, 1, 2]
