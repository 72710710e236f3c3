"""The CIC-IDS2017 and TII-SSRC-23 flow tables, mapped onto the agent's ``cicflowmeter`` columns.

Both tables were written by CICFlowMeter builds, but not the same build. CIC-IDS2017 (the
corrected release of Engelen et al.) is the build the agent's extractor follows; TII-SSRC-23's
rows show the older build's definitions in some columns (checked on the rows, see
``HARMONISED_COLUMNS``). A model trained on both reads only the columns whose definitions agree,
so it cannot learn "which tool wrote this row" instead of "is this an attack".

Times are rounded to the agent's millisecond clock (``at_agent_resolution``).

Labels are mapped onto one taxonomy (``TAXONOMY``) that means the same thing in both tables;
each row keeps its source class (the table's own label) for splitting and reporting.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from auris.agent.cicflowmeter import CICFLOWMETER_COLUMNS
from auris.agent.manifest import file_sha256
from auris.agent.scoring import to_matrix

__all__ = [
    "BENIGN",
    "CIC_FILE",
    "HARMONISED_COLUMNS",
    "TAXONOMY",
    "TII_FILE",
    "FlowFrame",
    "at_agent_resolution",
    "cic_frame",
    "clean_features",
    "load_flow_frames",
    "tii_frame",
    "unified_label",
]

BENIGN = "benign"
CIC_FILE = Path("network/cicids2017/flows.csv.gz")
TII_FILE = Path("network/tii-ssrc-23/flows.csv.gz")

# Columns left out of models trained on both tables, and why (measured on the rows):
_NOT_HARMONISED = {
    # absent from TII-SSRC-23
    "Fwd RST Flags": "absent",
    "Bwd RST Flags": "absent",
    # TII: 0/1 per flow (Bwd always 0); CIC: packet counts
    "Fwd PSH Flags": "0/1",
    "Bwd PSH Flags": "0/1",
    "Fwd URG Flags": "0/1",
    "Bwd URG Flags": "0/1",
    # TII: Fwd bulk always 0, backward bulk holds forward totals
    "Fwd Bytes/Bulk Avg": "bulk",
    "Fwd Packet/Bulk Avg": "bulk",
    "Fwd Bulk Rate Avg": "bulk",
    "Bwd Bytes/Bulk Avg": "bulk",
    "Bwd Packet/Bulk Avg": "bulk",
    "Bwd Bulk Rate Avg": "bulk",
    # CIC: X // packets on 100% of rows; TII: 26-51%
    "Subflow Fwd Packets": "subflow",
    "Subflow Fwd Bytes": "subflow",
    "Subflow Bwd Packets": "subflow",
    "Subflow Bwd Bytes": "subflow",
    # TII: integer; CIC and the agent: float
    "Down/Up Ratio": "integer",
    # TII mixes sum/n and sum/(n+1) (the first packet counted twice); CIC: sum/n on every row
    "Packet Length Mean": "first packet twice",
    "Packet Length Std": "first packet twice",
    "Packet Length Variance": "first packet twice",
    "Average Packet Size": "first packet twice",
}
HARMONISED_COLUMNS: tuple[str, ...] = tuple(c for c in CICFLOWMETER_COLUMNS if c not in _NOT_HARMONISED)

# Source class -> unified class. TII's four benign traffic types are applications, not threats.
TAXONOMY: dict[str, str] = {
    "BENIGN": BENIGN,
    "Audio": BENIGN,
    "Background": BENIGN,
    "Text": BENIGN,
    "Video": BENIGN,
    "DoS GoldenEye": "dos",
    "DoS Hulk": "dos",
    "DoS Slowloris": "dos",
    "DoS Slowhttptest": "dos",
    "DoS": "dos",
    "DDoS": "ddos",
    "Mirai": "ddos",  # TII's Mirai flows are the bots' floods, bar one subtype (see unified_label)
    "Portscan": "scan",
    "Infiltration - Portscan": "scan",
    "Information Gathering": "scan",
    "FTP-Patator": "bruteforce",
    "SSH-Patator": "bruteforce",
    "Web Attack - Brute Force": "bruteforce",  # HTTP login guessing, as TII's Bruteforce HTTP
    "Bruteforce": "bruteforce",
    "Web Attack - XSS": "web-attack",
    "Web Attack - SQL Injection": "web-attack",
    "Botnet": "botnet",
    "Infiltration": "infiltration",
    "Heartbleed": "heartbleed",
}


def unified_label(source_class: str, subtype: str = "") -> str:
    """The taxonomy class of a row; Mirai's telnet scanning and guessing is brute force, not a flood."""
    if subtype == "Mirai Scan Bruteforce":
        return "bruteforce"
    try:
        return TAXONOMY[source_class]
    except KeyError:
        raise ValueError(f"no taxonomy class for source class {source_class!r}; add it to TAXONOMY") from None


@dataclasses.dataclass
class FlowFrame:
    """Rows of one or more tables in the agent's full ``cicflowmeter`` column order."""

    x: npt.NDArray[np.float32]
    dataset: npt.NDArray[np.str_]
    source_class: npt.NDArray[np.str_]
    subtype: npt.NDArray[np.str_]
    label: npt.NDArray[np.str_]
    time_ns: npt.NDArray[np.int64]
    # File (relative to the data root) -> (sha256, rows).
    provenance: dict[str, tuple[str, int]]

    def __len__(self) -> int:
        return len(self.label)

    def take(self, idx: npt.NDArray[np.intp]) -> FlowFrame:
        return FlowFrame(
            self.x[idx],
            self.dataset[idx],
            self.source_class[idx],
            self.subtype[idx],
            self.label[idx],
            self.time_ns[idx],
            self.provenance,
        )

    @staticmethod
    def concat(frames: list[FlowFrame]) -> FlowFrame:
        provenance: dict[str, tuple[str, int]] = {}
        for f in frames:
            provenance.update(f.provenance)
        return FlowFrame(
            np.concatenate([f.x for f in frames]),
            np.concatenate([f.dataset for f in frames]),
            np.concatenate([f.source_class for f in frames]),
            np.concatenate([f.subtype for f in frames]),
            np.concatenate([f.label for f in frames]),
            np.concatenate([f.time_ns for f in frames]),
            provenance,
        )


def clean_features(
    table: pd.DataFrame, columns: tuple[str, ...] = CICFLOWMETER_COLUMNS
) -> npt.NDArray[np.float32]:
    """The agent's cleaning: undefined values (NaN, ±Infinity) are 0 as its extractor writes them.

    Missing columns are 0 too; callers that train on a table lacking a column must leave it out
    of the model (``HARMONISED_COLUMNS``), not learn the zeros.
    """
    values = np.zeros((len(table), len(columns)), dtype=np.float64)
    for j, column in enumerate(columns):
        if column in table.columns:
            values[:, j] = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    values[~np.isfinite(values)] = 0.0
    return to_matrix(values.tolist(), len(columns))


# Columns in microseconds, and the rates over the flow's duration.
_TIME_COLUMNS = tuple(
    c for c in CICFLOWMETER_COLUMNS if "IAT" in c or c.startswith(("Active", "Idle")) or c == "Flow Duration"
)
_RATES = {
    "Flow Bytes/s": ("Total Length of Fwd Packet", "Total Length of Bwd Packet"),
    "Flow Packets/s": ("Total Fwd Packet", "Total Bwd packets"),
    "Fwd Packets/s": ("Total Fwd Packet",),
    "Bwd Packets/s": ("Total Bwd packets",),
}


def at_agent_resolution(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Rows as the agent's clock would have measured them: times in whole milliseconds.

    nfstream stamps packets in milliseconds, so the agent's durations, gaps and active/idle times
    are multiples of 1,000 µs (29% of the flows of the shared benign captures last 0 µs), while the
    tables were measured in µs. Each time column is rounded to the nearest 1,000 µs (an
    approximation for means and deviations, which the per-packet times would give exactly) and the
    rates are recomputed from the rounded duration, 0 when it is 0 as the agent writes them.
    """
    out = x.astype(np.float64)
    col = {c: i for i, c in enumerate(CICFLOWMETER_COLUMNS)}
    for c in _TIME_COLUMNS:
        out[:, col[c]] = np.round(out[:, col[c]] / 1000.0) * 1000.0
    seconds = out[:, col["Flow Duration"]] / 1e6
    positive = seconds > 0
    for rate, parts in _RATES.items():
        total = sum(out[:, col[p]] for p in parts)
        out[:, col[rate]] = np.where(positive, total / np.where(positive, seconds, 1.0), 0.0)
    return out.astype(np.float32)


def _frame(
    table: pd.DataFrame,
    dataset: str,
    source: pd.Series,
    subtype: pd.Series,
    times: pd.Series,
    provenance: dict[str, tuple[str, int]],
) -> FlowFrame:
    source_arr = source.astype(str).to_numpy()
    subtype_arr = subtype.astype(str).to_numpy()
    return FlowFrame(
        x=at_agent_resolution(clean_features(table)),
        dataset=np.full(len(table), dataset),
        source_class=source_arr,
        subtype=subtype_arr,
        label=np.array([unified_label(s, t) for s, t in zip(source_arr, subtype_arr, strict=True)]),
        time_ns=times.to_numpy(dtype="datetime64[ns]").astype(np.int64),
        provenance=provenance,
    )


def cic_frame(path: Path, shown_as: str | None = None) -> FlowFrame:
    table = pd.read_csv(path, low_memory=False)
    times = pd.to_datetime(table["Timestamp"], format="ISO8601")
    label = table["Label"]
    provenance = {shown_as or str(path): (file_sha256(path), len(table))}
    return _frame(table, "cicids2017", label, label, times, provenance)


def tii_frame(path: Path, shown_as: str | None = None) -> FlowFrame:
    table = pd.read_csv(path, low_memory=False)
    # Day-first or month-first: both orders sort the same on these rows (days 1-3 of month 1, or
    # days 7-8 of month 2), which is all a split by time inside each class needs.
    times = pd.to_datetime(table["Timestamp"], format="%d/%m/%Y %I:%M:%S %p")
    provenance = {shown_as or str(path): (file_sha256(path), len(table))}
    return _frame(table, "tii-ssrc-23", table["Traffic Type"], table["Traffic Subtype"], times, provenance)


def load_flow_frames(data_root: Path) -> tuple[FlowFrame, FlowFrame]:
    """(CIC-IDS2017, TII-SSRC-23) from ``data_root``; raises FileNotFoundError naming a missing file."""
    for rel in (CIC_FILE, TII_FILE):
        if not (data_root / rel).is_file():
            raise FileNotFoundError(f"{data_root / rel} is missing; pass --data DIR")
    return (
        cic_frame(data_root / CIC_FILE, str(CIC_FILE)),
        tii_frame(data_root / TII_FILE, str(TII_FILE)),
    )
