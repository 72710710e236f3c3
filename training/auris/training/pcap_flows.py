"""Labelled flow tables built from captures with the agent's own meter and feature sets."""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from auris.agent.features import FeatureSet
from auris.agent.manifest import file_sha256
from auris.agent.meter import meter_flows

__all__ = ["CaptureFile", "FlowTable", "capture_files", "flow_table"]

logger = logging.getLogger(__name__)

BENIGN, ATTACK = "benign", "attack"
# Captures damaged on purpose: they test robustness, they are not traffic to learn from.
_DAMAGED_PREFIXES = ("fuzz-", "malformed_", "badpackets")


@dataclasses.dataclass(frozen=True)
class CaptureFile:
    path: Path
    label: str


@dataclasses.dataclass
class FlowTable:
    """Feature rows with their label, first-seen time and capture of origin."""

    columns: tuple[str, ...]
    rows: list[Sequence[float]] = dataclasses.field(default_factory=list)
    labels: list[str] = dataclasses.field(default_factory=list)
    first_seen_ms: list[int] = dataclasses.field(default_factory=list)
    captures: list[str] = dataclasses.field(default_factory=list)
    # Capture path -> (sha256, flows kept).
    provenance: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)


def capture_files(data_dir: Path) -> list[CaptureFile]:
    """Benign captures (minus the damaged ones) and the labelled attack captures under data_dir/pcaps."""
    pcaps = data_dir / "pcaps"
    files = [
        CaptureFile(p, BENIGN)
        for p in sorted((pcaps / "benign").iterdir())
        if p.suffix in (".pcap", ".pcapng", ".cap") and not p.name.startswith(_DAMAGED_PREFIXES)
    ]
    with (pcaps / "attack" / "labels.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["label"] != ATTACK:
                raise ValueError(f"labels.csv: unexpected label {row['label']!r} for {row['path']}")
            files.append(CaptureFile(pcaps / row["path"], ATTACK))
    return files


def flow_table(
    files: Iterable[CaptureFile],
    feature_set: FeatureSet,
    max_flows_per_capture: int = 2000,
    progress: Callable[[Sequence[CaptureFile]], Iterable[CaptureFile]] | None = None,
) -> FlowTable:
    """Meter every capture; keep the first ``max_flows_per_capture`` flows of each in time.

    The cap stops one flood capture (tens of thousands of spoofed flows) from
    standing in for a whole class.
    """
    files = list(files)
    table = FlowTable(columns=feature_set.columns)
    for capture in progress(files) if progress else files:
        flows = sorted(meter_flows([str(capture.path)], [feature_set]), key=lambda f: f.first_seen_ms)
        kept = flows[:max_flows_per_capture]
        for flow in kept:
            table.rows.append(flow.features[feature_set.name])
            table.labels.append(capture.label)
            table.first_seen_ms.append(flow.first_seen_ms)
            table.captures.append(capture.path.name)
        table.provenance[str(capture.path)] = (file_sha256(capture.path), len(kept))
        if len(flows) > len(kept):
            logger.info("%s: kept %d of %d flows", capture.path.name, len(kept), len(flows))
    return table
