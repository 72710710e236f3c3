"""The first capture is metered from start-up (auris.agent.early), before the models are loaded,
and used only when it is the metering the agent settles on."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from auris.agent.early import EarlyMeter
from auris.agent.features import NFSTREAM
from auris.agent.meter import _TRACKERS, MeterOptions, meter_flows, report_dead_meters
from tests.conftest import MODELS, PCAPS, CollectorThread, run_agent

PCAP = PCAPS / "KakaoTalk_chat.pcap"


def _stored(collector: CollectorThread) -> int:
    assert collector.collector is not None
    return collector.collector.store.count()


def test_the_first_capture_is_metered_from_start_up_and_every_flow_arrives(
    collector: CollectorThread, tmp_path: Path
) -> None:
    run = run_agent(
        collector.address, [PCAP, PCAPS / "trickbot.pcap"], tmp_path / "agent", "--log-level", "info"
    )
    assert run.returncode == 0, run.stderr
    assert f"metering of {PCAP.name} started before the models were loaded" in run.stderr
    expected = sum(1 for _ in meter_flows([str(PCAP), str(PCAPS / "trickbot.pcap")], [NFSTREAM]))
    assert _stored(collector) == expected
    # Replayed completely before: what started at start-up is dropped, nothing is metered anew.
    again = run_agent(
        collector.address, [PCAP, PCAPS / "trickbot.pcap"], tmp_path / "agent", "--log-level", "info"
    )
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("was replayed completely before") == 2
    assert "started before the models" not in again.stderr
    assert " anew" not in again.stderr
    assert _stored(collector) == expected


def test_a_start_up_metering_with_other_feature_sets_is_dropped(
    collector: CollectorThread, tmp_path: Path
) -> None:
    """A model in models_dir whose signature fails still names its feature set to the early
    metering (manifests are read, not verified, at start-up); the agent refuses the model, runs
    with one feature set fewer, and meters the capture anew."""
    models = tmp_path / "models"
    models.mkdir()
    for path in MODELS.glob("nfstream-*"):
        shutil.copy(path, models)
    shutil.copy(MODELS / "candidates" / "cic-rf.onnx", models)
    manifest = json.loads((MODELS / "candidates" / "cic-rf.manifest.json").read_text())
    manifest["description"] += " (changed after signing)"
    (models / "cic-rf.manifest.json").write_text(json.dumps(manifest))
    run = run_agent(
        collector.address, [PCAP], tmp_path / "agent", "--models-dir", str(models), "--log-level", "info"
    )
    assert run.returncode == 0, run.stderr
    assert "cic-rf" in run.stderr  # refused, and said so
    assert f"metering of {PCAP.name} started before" not in run.stderr
    assert f"metering {PCAP.name} anew" in run.stderr
    assert _stored(collector) == sum(1 for _ in meter_flows([str(PCAP)], [NFSTREAM]))


def test_claimed_only_by_the_same_metering_and_cancelled_otherwise(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="auris.agent.meter")
    options = MeterOptions()
    early = EarlyMeter(str(PCAP.resolve()), [NFSTREAM], options)
    assert not early.claim(str(PCAP.resolve()), [NFSTREAM], MeterOptions(bpf_filter="tcp"))
    assert not early.claim(str(PCAPS / "trickbot.pcap"), [NFSTREAM], options)
    assert early.claim(str(PCAP.resolve()), [NFSTREAM], options)
    flows = [flow for batch in early.batches() for flow in batch]
    assert len(flows) == sum(1 for _ in meter_flows([str(PCAP)], [NFSTREAM]))

    dropped = EarlyMeter(str(PCAP.resolve()), [NFSTREAM], options)
    deadline = time.monotonic() + 30
    while not dropped._meters and time.monotonic() < deadline:  # its meter process has started
        time.sleep(0.01)
    assert dropped._meters
    dropped.cancel()
    assert not dropped.claim(str(PCAP.resolve()), [NFSTREAM], options)
    dropped._thread.join(30)
    assert not dropped._thread.is_alive()
    for meter in dropped._meters:
        meter.process.join(30)
        assert meter.process.exitcode is not None
        # What it metered is not used: its packets leave the heartbeat's capture counters.
        assert not any(tracker is meter.tracker for tracker in _TRACKERS)
    # Ended on purpose: not a meter that died (the watchdog, every second, logs those as errors).
    report_dead_meters()
    time.sleep(1.5)
    assert "meter process died" not in caplog.text
