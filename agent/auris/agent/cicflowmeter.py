"""CICFlowMeter flow features, computed live from packets by an nfstream plugin.

The columns are those of the CIC-IDS2017 table in shared data (same names, same order), so a
model trained on that table can be fed directly. The definitions follow the CICFlowMeter
build that produced that table (the CICFlowMeter fork published with Engelen et al., "Troubleshooting
an Intrusion Detection Dataset: the CICIDS2017 Case Study", 2021), quirks included: a model
learnt those quirks. docs/cicflowmeter.md lists every column, and what differs and why.

nfstream meters the packets in a separate process started from a forkserver, so the plugin is a
module-level class: the child imports it by module path. Per-flow state lives in
``flow.udps.cicflowmeter_state`` while the flow is open and is replaced at expiry by the
finished vector in ``flow.udps.cicflowmeter``: only that tuple crosses back to the parent.
"""

from __future__ import annotations

import dataclasses
import math
from array import array
from typing import Any

from auris.agent import lean  # noqa: F401  (before nfstream: it imports nfstream without pandas)

# isort: split
from nfstream import NFPlugin

__all__ = [
    "ACTIVITY_TIMEOUT_US",
    "BULK_MIN_PACKETS",
    "BULK_TIMEOUT_US",
    "CICFLOWMETER_COLUMNS",
    "CICFlowMeterPlugin",
    "extract_cicflowmeter",
]

CICFLOWMETER_COLUMNS: tuple[str, ...] = (
    "Flow Duration",
    "Total Fwd Packet",
    "Total Bwd packets",
    "Total Length of Fwd Packet",
    "Total Length of Bwd Packet",
    "Fwd Packet Length Max",
    "Fwd Packet Length Min",
    "Fwd Packet Length Mean",
    "Fwd Packet Length Std",
    "Bwd Packet Length Max",
    "Bwd Packet Length Min",
    "Bwd Packet Length Mean",
    "Bwd Packet Length Std",
    "Flow Bytes/s",
    "Flow Packets/s",
    "Flow IAT Mean",
    "Flow IAT Std",
    "Flow IAT Max",
    "Flow IAT Min",
    "Fwd IAT Total",
    "Fwd IAT Mean",
    "Fwd IAT Std",
    "Fwd IAT Max",
    "Fwd IAT Min",
    "Bwd IAT Total",
    "Bwd IAT Mean",
    "Bwd IAT Std",
    "Bwd IAT Max",
    "Bwd IAT Min",
    "Fwd PSH Flags",
    "Bwd PSH Flags",
    "Fwd URG Flags",
    "Bwd URG Flags",
    "Fwd RST Flags",
    "Bwd RST Flags",
    "Fwd Header Length",
    "Bwd Header Length",
    "Fwd Packets/s",
    "Bwd Packets/s",
    "Packet Length Min",
    "Packet Length Max",
    "Packet Length Mean",
    "Packet Length Std",
    "Packet Length Variance",
    "FIN Flag Count",
    "SYN Flag Count",
    "RST Flag Count",
    "PSH Flag Count",
    "ACK Flag Count",
    "URG Flag Count",
    "CWR Flag Count",
    "ECE Flag Count",
    "Down/Up Ratio",
    "Average Packet Size",
    "Fwd Segment Size Avg",
    "Bwd Segment Size Avg",
    "Fwd Bytes/Bulk Avg",
    "Fwd Packet/Bulk Avg",
    "Fwd Bulk Rate Avg",
    "Bwd Bytes/Bulk Avg",
    "Bwd Packet/Bulk Avg",
    "Bwd Bulk Rate Avg",
    "Subflow Fwd Packets",
    "Subflow Fwd Bytes",
    "Subflow Bwd Packets",
    "Subflow Bwd Bytes",
    "FWD Init Win Bytes",
    "Bwd Init Win Bytes",
    "Fwd Act Data Pkts",
    "Fwd Seg Size Min",
    "Active Mean",
    "Active Std",
    "Active Max",
    "Active Min",
    "Idle Mean",
    "Idle Std",
    "Idle Max",
    "Idle Min",
)

# CICFlowMeter's defaults: a gap longer than 5 s ends an active period; a gap longer than 1 s
# between data packets of one direction ends a bulk, and a bulk needs 4 data packets.
ACTIVITY_TIMEOUT_US = 5_000_000
BULK_TIMEOUT_US = 1_000_000
BULK_MIN_PACKETS = 4

_TCP = 6
_UDP = 17
_US_PER_MS = 1000  # nfstream stamps packets in whole milliseconds
_FLAGS = ("fin", "syn", "rst", "psh", "ack", "urg", "cwr", "ece")


class _Stats:
    """Running count, sum, extrema and variance (Welford), as Apache SummaryStatistics."""

    __slots__ = ("high", "low", "m2", "mean", "n", "total")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.mean = 0.0
        self.m2 = 0.0
        self.low = math.inf
        self.high = -math.inf

    def add(self, value: float) -> None:
        self.n += 1
        self.total += value
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)
        if value < self.low:
            self.low = value
        if value > self.high:
            self.high = value

    def variance(self) -> float:
        """Sample variance (n - 1), 0 below two values."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0

    def summary(self) -> tuple[float, float, float, float]:
        """(mean, std, max, min); zeros when empty, as CICFlowMeter writes them."""
        if self.n == 0:
            return (0.0, 0.0, 0.0, 0.0)
        return (self.mean, math.sqrt(self.variance()), self.high, self.low)


class _Bulk:
    """One direction's bulk detector: runs of >= 4 data packets, no gap over 1 s, not interleaved."""

    __slots__ = ("bulks", "count_run", "duration", "last", "packets", "size", "size_run", "start")

    def __init__(self) -> None:
        self.start = 0  # 0: no candidate run (CICFlowMeter's sentinel)
        self.last = 0
        self.count_run = 0
        self.size_run = 0
        self.bulks = 0
        self.packets = 0
        self.size = 0
        self.duration = 0

    def update(self, ts: int, size: int, other_last: int) -> None:
        if other_last > self.start:  # the other direction sent data since this run began
            self.start = 0
        if size <= 0:
            return
        if self.start == 0 or ts - self.last > BULK_TIMEOUT_US:
            self.start = ts
            self.last = ts
            self.count_run = 1
            self.size_run = size
            return
        self.count_run += 1
        self.size_run += size
        if self.count_run == BULK_MIN_PACKETS:
            self.bulks += 1
            self.packets += self.count_run
            self.size += self.size_run
            self.duration += ts - self.start
        elif self.count_run > BULK_MIN_PACKETS:
            self.packets += 1
            self.size += size
            self.duration += ts - self.last
        self.last = ts

    def averages(self) -> tuple[float, float, float]:
        """(bytes per bulk, packets per bulk, bytes/s in bulks), truncated to integers as in Java."""
        if self.bulks == 0:
            return (0.0, 0.0, 0.0)
        rate = float(int(self.size / (self.duration / 1e6))) if self.duration else 0.0
        return (float(self.size // self.bulks), float(self.packets // self.bulks), rate)


@dataclasses.dataclass(slots=True)
class _FlowState:
    """Everything the plugin keeps for one open flow; O(1) in the number of packets."""

    first_ts: int
    last_ts: int
    fwd_last_ts: int = 0
    bwd_last_ts: int = 0
    fwd_len: _Stats = dataclasses.field(default_factory=_Stats)
    bwd_len: _Stats = dataclasses.field(default_factory=_Stats)
    all_len: _Stats = dataclasses.field(default_factory=_Stats)
    flow_iat: _Stats = dataclasses.field(default_factory=_Stats)
    fwd_iat: _Stats = dataclasses.field(default_factory=_Stats)
    bwd_iat: _Stats = dataclasses.field(default_factory=_Stats)
    active: _Stats = dataclasses.field(default_factory=_Stats)
    idle: _Stats = dataclasses.field(default_factory=_Stats)
    active_start: int = 0
    active_end: int = 0
    fwd_bulk: _Bulk = dataclasses.field(default_factory=_Bulk)
    bwd_bulk: _Bulk = dataclasses.field(default_factory=_Bulk)
    flags: list[int] = dataclasses.field(default_factory=lambda: [0] * len(_FLAGS))
    fwd_psh: int = 0
    bwd_psh: int = 0
    fwd_urg: int = 0
    bwd_urg: int = 0
    fwd_rst: int = 0
    bwd_rst: int = 0
    fwd_header: int = 0
    bwd_header: int = 0
    fwd_header_min: int = 0
    init_win_fwd: int = 0
    last_win_bwd: int = 0
    fwd_data_packets: int = 0


def _packet_fields(packet: Any) -> tuple[int, int, int]:
    """(payload bytes, transport header bytes, TCP window) as CICFlowMeter reads them.

    Payload and header come from the IP and transport headers (nfstream's sizes), so link-layer
    padding never counts. Protocols other than TCP and UDP count neither, as in CICFlowMeter.
    """
    protocol = packet.protocol
    if protocol == _TCP:
        payload = packet.payload_size
        header = packet.transport_size - payload
        # The window sits 14 bytes into the TCP header, which starts where the transport part
        # begins inside the captured IP packet; a capture cut short reads as window 0.
        offset = packet.ip_size - packet.transport_size + 14
        raw = packet.ip_packet
        window = (
            int.from_bytes(raw[offset : offset + 2], "big") if offset >= 0 and offset + 2 <= len(raw) else 0
        )
        return payload, header, window
    if protocol == _UDP:
        payload = packet.payload_size
        return payload, packet.transport_size - payload, 0
    return 0, 0, 0


def _count_flags(state: _FlowState, packet: Any) -> None:
    flags = state.flags
    for i, name in enumerate(_FLAGS):
        if getattr(packet, name):
            flags[i] += 1


def _update_active_idle(state: _FlowState, ts: int) -> None:
    if ts - state.active_end > ACTIVITY_TIMEOUT_US:
        if state.active_end - state.active_start > 0:
            state.active.add(float(state.active_end - state.active_start))
        state.idle.add(float(ts - state.active_end))
        state.active_start = ts
    state.active_end = ts


class CICFlowMeterPlugin(NFPlugin):  # type: ignore[misc]  # nfstream ships no type hints
    """nfstream plugin computing the CICFlowMeter columns of each flow."""

    def on_init(self, packet: Any, flow: Any) -> None:
        ts = packet.time * _US_PER_MS
        payload, header, window = _packet_fields(packet)
        state = _FlowState(first_ts=ts, last_ts=ts, active_start=ts, active_end=ts)
        # The first packet defines the forward direction (nfstream's src2dst, as CICFlowMeter).
        state.fwd_bulk.update(ts, payload, 0)
        _count_flags(state, packet)
        state.all_len.add(float(payload))
        state.fwd_len.add(float(payload))
        state.fwd_last_ts = ts
        state.fwd_header = header
        state.fwd_header_min = header
        state.init_win_fwd = window
        # CICFlowMeter counts PSH/URG on the first packet but not RST, nor it as a data packet.
        state.fwd_psh = int(bool(packet.psh))
        state.fwd_urg = int(bool(packet.urg))
        flow.udps.cicflowmeter_state = state

    def on_update(self, packet: Any, flow: Any) -> None:
        state: _FlowState = flow.udps.cicflowmeter_state
        ts = packet.time * _US_PER_MS
        payload, header, window = _packet_fields(packet)
        forward = packet.direction == 0
        if forward:
            state.fwd_bulk.update(ts, payload, state.bwd_bulk.last)
        else:
            state.bwd_bulk.update(ts, payload, state.fwd_bulk.last)
        _update_active_idle(state, ts)
        _count_flags(state, packet)
        state.all_len.add(float(payload))
        if forward:
            if payload >= 1:
                state.fwd_data_packets += 1
            state.fwd_len.add(float(payload))
            state.fwd_header += header
            state.fwd_iat.add(float(ts - state.fwd_last_ts))
            state.fwd_last_ts = ts
            state.fwd_header_min = min(state.fwd_header_min, header)
            state.fwd_psh += packet.psh
            state.fwd_urg += packet.urg
            state.fwd_rst += packet.rst
        else:
            state.bwd_len.add(float(payload))
            # CICFlowMeter overwrites this on every backward packet: the table holds the last one.
            state.last_win_bwd = window
            state.bwd_header += header
            if state.bwd_len.n > 1:
                state.bwd_iat.add(float(ts - state.bwd_last_ts))
            state.bwd_last_ts = ts
            state.bwd_psh += packet.psh
            state.bwd_urg += packet.urg
            state.bwd_rst += packet.rst
        state.flow_iat.add(float(ts - state.last_ts))
        state.last_ts = ts

    def on_expire(self, flow: Any) -> None:
        flow.udps.cicflowmeter = _finish(flow.udps.cicflowmeter_state)
        del flow.udps.cicflowmeter_state


def _finish(s: _FlowState) -> tuple[float, ...]:
    """The flow's vector in CICFLOWMETER_COLUMNS order; undefined ratios are 0, never NaN or inf."""
    duration = s.last_ts - s.first_ts
    seconds = duration / 1e6
    n_fwd, n_bwd = s.fwd_len.n, s.bwd_len.n
    packets = n_fwd + n_bwd
    fwd_bytes, bwd_bytes = int(s.fwd_len.total), int(s.bwd_len.total)

    def per_second(count: float) -> float:
        return count / seconds if duration > 0 else 0.0

    fwd_mean, fwd_std, fwd_max, fwd_min = s.fwd_len.summary()
    bwd_mean, bwd_std, bwd_max, bwd_min = s.bwd_len.summary()
    all_mean, all_std, all_max, all_min = s.all_len.summary()
    flow_iat = s.flow_iat.summary()
    fwd_iat = s.fwd_iat.summary()
    bwd_iat = s.bwd_iat.summary()
    active = s.active.summary()
    idle = s.idle.summary()
    return (
        float(duration),
        float(n_fwd),
        float(n_bwd),
        float(fwd_bytes),
        float(bwd_bytes),
        fwd_max,
        fwd_min,
        fwd_mean,
        fwd_std,
        bwd_max,
        bwd_min,
        bwd_mean,
        bwd_std,
        per_second(fwd_bytes + bwd_bytes),
        per_second(packets),
        *flow_iat,
        s.fwd_iat.total,
        *fwd_iat,
        s.bwd_iat.total,
        *bwd_iat,
        float(s.fwd_psh),
        float(s.bwd_psh),
        float(s.fwd_urg),
        float(s.bwd_urg),
        float(s.fwd_rst),
        float(s.bwd_rst),
        float(s.fwd_header),
        float(s.bwd_header),
        per_second(n_fwd),
        per_second(n_bwd),
        all_min,
        all_max,
        all_mean,
        all_std,
        s.all_len.variance(),
        *(float(count) for count in s.flags),
        n_bwd / n_fwd if n_fwd else 0.0,
        s.all_len.total / packets if packets else 0.0,
        fwd_mean,
        bwd_mean,
        *s.fwd_bulk.averages(),
        *s.bwd_bulk.averages(),
        # CICFlowMeter's subflow test is always true (an operator-precedence slip), so every
        # packet opens a "subflow" and these are integer divisions by the packet count.
        float(n_fwd // packets),
        float(fwd_bytes // packets),
        float(n_bwd // packets),
        float(bwd_bytes // packets),
        float(s.init_win_fwd),
        float(s.last_win_bwd),
        float(s.fwd_data_packets),
        float(s.fwd_header_min),
        *active,
        *idle,
    )


def extract_cicflowmeter(flow: Any) -> array[float]:
    """The vector the plugin left on an expired flow (metered with ``CICFlowMeterPlugin``)."""
    return array("d", flow.udps.cicflowmeter)
