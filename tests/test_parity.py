"""nfstream parity: the agent's flow table equals the nfstream project's golden files.

The same check the nfstream project runs on itself: flow count, per-flow packets and
bytes, and application name, in nfstream's own order. The committed fixtures run
everywhere; the full shared corpus runs when ../shared/data is beside the checkout.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auris.agent.features import NFSTREAM
from auris.agent.meter import meter_source
from tests.conftest import DATA, PCAPS, REPO

SHARED = REPO.parent / "shared" / "data" / "pcaps"


def _differing_apps(folder: Path) -> set[str]:
    listing = folder / "APPLICATION_NAME_DIFFERS_UNDER_NFSTREAM_6.6.0.txt"
    return {
        line.strip() for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#")
    }


def _check(pcap: Path, golden: Path, compare_apps: bool) -> None:
    with golden.open(newline="") as fh:
        expected = list(csv.DictReader(fh))
    flows = list(meter_source(str(pcap), [NFSTREAM]))
    assert len(flows) == len(expected), pcap.name
    for flow, row in zip(flows, expected, strict=True):
        assert flow.packets == int(row["bidirectional_packets"]), pcap.name
        assert flow.bytes == int(row["bidirectional_bytes"]), pcap.name
        if compare_apps:
            assert flow.application_name == row["application_name"], pcap.name


def _cases(pcaps: Path, golden: Path) -> list[tuple[Path, Path, bool]]:
    if not golden.is_dir():
        return []
    differ = _differing_apps(golden)
    return [
        (p, golden / p.name, p.name not in differ)
        for p in sorted(pcaps.iterdir())
        if (golden / p.name).is_file()
    ]


FIXTURES = _cases(PCAPS, DATA / "benign-expected")


@pytest.mark.parametrize(("pcap", "golden", "apps"), FIXTURES, ids=[c[0].name for c in FIXTURES])
def test_fixture_parity(pcap: Path, golden: Path, apps: bool) -> None:
    _check(pcap, golden, apps)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/pcaps is not beside this checkout")
def test_shared_corpus_parity() -> None:
    cases = _cases(SHARED / "benign", SHARED / "benign-expected")
    assert len(cases) >= 150
    failures = []
    for pcap, golden, apps in cases:
        try:
            _check(pcap, golden, apps)
        except AssertionError as exc:
            failures.append(f"{pcap.name}: {exc}")
    assert not failures, failures


def test_fixtures_include_damaged_captures() -> None:
    names = {c[0].name for c in FIXTURES}
    assert {"badpackets.pcap", "malformed_dns.pcap", "malformed_icmp.pcap", "tls-esni-fuzzed.pcap"} <= names


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_captures_never_crash_the_meter(tmp_path: Path, data: st.DataObject) -> None:
    """Flipped bytes and truncation anywhere in a real capture: flows or a ValueError, nothing else."""
    original = (PCAPS / "kerberos.pcap").read_bytes()
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 20), label="flips")):
        position = data.draw(st.integers(0, len(damaged) - 1), label="position")
        damaged[position] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(24, len(damaged)), label="truncate at")
    path = tmp_path / "damaged.pcap"
    path.write_bytes(bytes(damaged[:cut]))
    try:
        flows = list(meter_source(str(path), [NFSTREAM]))
    except ValueError:
        return  # declared: the capture as a whole is unreadable
    assert all(f.packets >= 1 for f in flows)
