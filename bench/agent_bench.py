"""Agent benchmark: bare nfstream vs the whole agent on one large synthetic capture, and scoring alone.

Run from the repository root::

    .venv/bin/python bench/agent_bench.py [--packets N] [--flows M] [--out bench/results/agent.md]

One run generates (or reuses) a synthetic classic pcap, meters it with bare nfstream, replays it
through ``auris-agent`` into a real loopback collector, times the ONNX models in ``models/`` alone,
and prints one table (also written as Markdown to ``--out``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from benchlib import Collector, add_figures_argument, write_figures
from benchlib import command as _command
from benchlib import cpu_s as _cpu_s
from benchlib import fmt as _fmt
from benchlib import loadavg as _loadavg
from benchlib import machine as _machine
from benchlib import percentile as _percentile
from benchlib import verdict as _verdict
from benchlib import versions as _versions

if TYPE_CHECKING:
    pass

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Bump when the generated traffic changes, so cached captures are not reused.
GEN_VERSION = 1

# --------------------------------------------------------------------------------------------
# Synthetic capture
# --------------------------------------------------------------------------------------------

_PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)  # microseconds, Ethernet
_RECORD = struct.Struct("<IIII")
_ETH_IP = struct.Struct("!6s6sHBBHHHBBH4s4s")  # Ethernet II + IPv4 header without options
_TCP = struct.Struct("!HHIIBBHHH")  # no options
_UDP = struct.Struct("!HHHH")
_FIN, _SYN, _PSH, _ACK = 0x01, 0x02, 0x08, 0x10
_MSS = 1460
_TCP_PORTS = (443, 443, 443, 443, 443, 443, 80, 80, 80, 22, 8080, 25, 993)
_UDP_PORTS = (443, 443, 443, 123, 5004, 5060, 3478)
_CLIENT_HOSTS = 2000
_SERVER_HOSTS = 600
_CONCURRENT_FLOWS = 1000
# Mean gap between packets on the wire: 1M packets span ~250 s, longer than nfstream's 120 s
# idle timeout, so flows expire (and stream out) during the replay rather than all at its end.
_MEAN_GAP_US = 250.0

# (to_server, TCP flags, payload length, payload bytes or None for filler)
_Step = tuple[bool, int, int, bytes | None]


@dataclasses.dataclass(slots=True)
class _GenFlow:
    proto: int
    plan: list[_Step]
    c_mac: bytes
    s_mac: bytes
    c_ip: bytes
    s_ip: bytes
    c_port: int
    s_port: int
    c_sum: int
    s_sum: int
    c_seq: int
    s_seq: int
    c_id: int
    s_id: int
    pos: int = 0


def _ip_sum(src: bytes, dst: bytes, ttl: int, proto: int) -> int:
    """The constant part of the IPv4 header checksum (everything but total length and id)."""
    words = 0x4500 + 0x4000 + ((ttl << 8) | proto)
    for addr in (src, dst):
        words += (addr[0] << 8 | addr[1]) + (addr[2] << 8 | addr[3])
    return words


def _dns_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"


def _dns_pair(rng: random.Random, index: int) -> tuple[bytes, bytes]:
    txid = rng.getrandbits(16)
    question = _dns_name(f"host{index % 5000}.example{index % 37}.com") + struct.pack("!HH", 1, 1)
    query = struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + question
    answer = struct.pack("!HHHIH", 0xC00C, 1, 1, 300, 4) + bytes([203, 0, 113, 1 + index % 250])
    response = struct.pack("!HHHHHH", txid, 0x8180, 1, 1, 0, 0) + question + answer
    return query, response


def _plan_counts(rng: random.Random, packets: int, flows: int) -> list[tuple[str, int]]:
    """Flow kinds and packet counts summing exactly to ``packets``, heavy-tailed like real traffic."""
    n_dns = flows // 4
    n_udp = flows // 10
    n_tcp = flows - n_dns - n_udp
    spare = packets - 2 * n_dns - 2 * n_udp - 6 * n_tcp
    if spare < 0:
        raise ValueError(f"{packets} packets are too few for {flows} flows (need about 5 per flow)")
    kinds = ["udp"] * n_udp + ["tcp"] * n_tcp
    weights = [min(rng.paretovariate(1.3), 1000.0) for _ in kinds]
    total = sum(weights)
    extra = [int(spare * w / total) for w in weights]
    for _ in range(spare - sum(extra)):
        extra[rng.randrange(len(extra))] += 1
    base = {"udp": 2, "tcp": 6}
    out = [("dns", 2)] * n_dns + [(k, base[k] + e) for k, e in zip(kinds, extra, strict=True)]
    rng.shuffle(out)
    return out


def _tcp_plan(rng: random.Random, n: int, port: int, index: int) -> list[_Step]:
    plan: list[_Step] = [(True, _SYN, 0, None), (False, _SYN | _ACK, 0, None), (True, _ACK, 0, None)]
    middle = n - 6
    upload = rng.random() < 0.15
    http = port in (80, 8080)
    if middle > 0:
        request = (
            f"GET /item/{index} HTTP/1.1\r\nHost: www.example{index % 37}.com\r\n"
            "User-Agent: auris-bench\r\nAccept: */*\r\n\r\n"
        ).encode()
        if http:
            plan.append((True, _PSH | _ACK, len(request), request))
        else:
            plan.append((True, _PSH | _ACK, rng.randint(90, 700), None))
        for j in range(middle - 1):
            if j % 3 == 2:
                plan.append((upload, _ACK, 0, None))  # the receiver acknowledges
                continue
            last = j == middle - 2
            size = rng.randint(60, _MSS) if last else _MSS
            payload: bytes | None = None
            if j == 0 and http and not upload:
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 48213\r\n\r\n"
                payload = head + b"<html>" * ((size - len(head)) // 6 + 1)
                payload = payload[:size]
            plan.append((not upload, _ACK | (_PSH if last else 0), size, payload))
    plan += [(True, _FIN | _ACK, 0, None), (False, _FIN | _ACK, 0, None), (True, _ACK, 0, None)]
    return plan


def _udp_plan(rng: random.Random, n: int, port: int) -> list[_Step]:
    plan: list[_Step] = []
    for i in range(n):
        to_server = i == 0 or rng.random() < 0.55
        if port == 123:
            size = 48
        elif port in (5004, 3478):
            size = rng.choice((172, 172, 172, 92))
        elif port == 443 and i < 2:
            size = 1252
        else:
            size = rng.randint(30, 1350)
        plan.append((to_server, 0, size, None))
    return plan


def _new_flow(rng: random.Random, index: int, kind: str, n: int) -> _GenFlow:
    host = index % _CLIENT_HOSTS
    c_ip = bytes([10, 1 + host // 250, host % 250, 10])
    c_port = 32768 + (index // _CLIENT_HOSTS) % 28000
    c_mac = bytes([0x02, 0, 0, 0, host >> 8, host & 0xFF])
    s_mac = bytes([0x02, 0xFF, 0, 0, 0, 1])  # the gateway
    if kind == "dns":
        s_ip, s_port, proto = bytes([10, 0, 0, 53]), 53, 17
        query, response = _dns_pair(rng, index)
        plan: list[_Step] = [(True, 0, len(query), query), (False, 0, len(response), response)]
    else:
        server = rng.randrange(_SERVER_HOSTS)
        s_ip = bytes([(203, 198, 192)[server % 3], (0, 51, 0)[server % 3], (113, 100, 2)[server % 3]])
        s_ip += bytes([1 + server // 3])
        if kind == "tcp":
            s_port, proto = rng.choice(_TCP_PORTS), 6
            plan = _tcp_plan(rng, n, s_port, index)
        else:
            s_port, proto = rng.choice(_UDP_PORTS), 17
            plan = _udp_plan(rng, n, s_port)
    return _GenFlow(
        proto=proto,
        plan=plan,
        c_mac=c_mac,
        s_mac=s_mac,
        c_ip=c_ip,
        s_ip=s_ip,
        c_port=c_port,
        s_port=s_port,
        c_sum=_ip_sum(c_ip, s_ip, 64, proto),
        s_sum=_ip_sum(s_ip, c_ip, 52, proto),
        c_seq=rng.getrandbits(32),
        s_seq=rng.getrandbits(32),
        c_id=rng.getrandbits(16),
        s_id=rng.getrandbits(16),
    )


def generate_pcap(path: Path, packets: int, flows: int, seed: int) -> None:
    """Write a classic pcap of ``packets`` packets in ``flows`` interleaved bidirectional flows."""
    rng = random.Random(seed)
    filler = rng.randbytes(0x8000 + 2 * _MSS)
    counts = _plan_counts(rng, packets, flows)
    pending = iter(enumerate(counts))
    active: list[_GenFlow] = []
    for index, (kind, n) in pending:
        active.append(_new_flow(rng, index, kind, n))
        if len(active) >= _CONCURRENT_FLOWS:
            break
    now_us = 1_700_000_000 * 1_000_000
    written = 0
    out: list[bytes] = []
    tmp = path.with_suffix(".part")
    with tmp.open("wb") as fh:
        fh.write(_PCAP_HEADER)
        while active:
            slot = int(rng.random() * len(active))
            f = active[slot]
            to_server, flags, size, payload = f.plan[f.pos]
            f.pos += 1
            if payload is None:
                start = (now_us * 7 + written) & 0x7FFF
                payload = filler[start : start + size]
            if to_server:
                smac, dmac, sip, dip, sport, dport, ttl = (
                    f.c_mac,
                    f.s_mac,
                    f.c_ip,
                    f.s_ip,
                    f.c_port,
                    f.s_port,
                    64,
                )
                f.c_id = ipid = (f.c_id + 1) & 0xFFFF
                base = f.c_sum
            else:
                smac, dmac, sip, dip, sport, dport, ttl = (
                    f.s_mac,
                    f.c_mac,
                    f.s_ip,
                    f.c_ip,
                    f.s_port,
                    f.c_port,
                    52,
                )
                f.s_id = ipid = (f.s_id + 1) & 0xFFFF
                base = f.s_sum
            if f.proto == 6:
                seq, ack = (f.c_seq, f.s_seq) if to_server else (f.s_seq, f.c_seq)
                l4 = _TCP.pack(sport, dport, seq, ack if flags & _ACK else 0, 0x50, flags, 64240, 0, 0)
                step = size + (1 if flags & (_SYN | _FIN) else 0)
                if to_server:
                    f.c_seq = (f.c_seq + step) & 0xFFFFFFFF
                else:
                    f.s_seq = (f.s_seq + step) & 0xFFFFFFFF
            else:
                l4 = _UDP.pack(sport, dport, 8 + size, 0)
            ip_len = 20 + len(l4) + size
            csum = base + ip_len + ipid
            csum = (csum & 0xFFFF) + (csum >> 16)
            csum = ~((csum & 0xFFFF) + (csum >> 16)) & 0xFFFF
            frame = _ETH_IP.pack(
                dmac, smac, 0x0800, 0x45, 0, ip_len, ipid, 0x4000, ttl, f.proto, csum, sip, dip
            )
            out += (_RECORD.pack(now_us // 1_000_000, now_us % 1_000_000, 14 + ip_len, 14 + ip_len), frame)
            out += (l4, payload)
            written += 1
            now_us += 1 + int(rng.expovariate(1.0 / _MEAN_GAP_US))
            if f.pos == len(f.plan):
                nxt = next(pending, None)
                if nxt is None:
                    active[slot] = active[-1]
                    active.pop()
                else:
                    active[slot] = _new_flow(rng, nxt[0], *nxt[1])
            if len(out) >= 40_000:
                fh.write(b"".join(out))
                out.clear()
        fh.write(b"".join(out))
    if written != packets:
        raise RuntimeError(f"generator wrote {written} packets, expected {packets}")
    tmp.replace(path)


def cached_pcap(cache_dir: Path, packets: int, flows: int, seed: int) -> tuple[Path, float | None]:
    """The capture for these parameters, generated once; and its generation time (None: cached)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"synthetic-v{GEN_VERSION}-p{packets}-f{flows}-s{seed}.pcap"
    if path.is_file():
        return path, None
    started = time.perf_counter()
    generate_pcap(path, packets, flows, seed)
    return path, time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# Running processes and watching their memory
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProcRun:
    """One monitored subprocess run."""

    returncode: int
    wall_s: float
    ru_maxrss_kb: int  # from wait4: the process or the largest descendant it reaped
    # Role ("main", "forkserver", "meter", "resource_tracker") -> largest VmHWM seen, kB.
    peak_kb: dict[str, int]
    # Largest sum over the whole process tree at one sample, kB: of VmRSS, and of Pss.
    tree_peak_kb: int
    tree_peak_pss_kb: int
    # Role -> user + system CPU seconds at the last sample (summed over processes of that role).
    cpu_s: dict[str, float]
    stdout: str
    stderr: str


def _status_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = dict(line.split(":", 1) for line in text.splitlines() if line.startswith(("VmRSS", "VmHWM")))
    if "VmRSS" not in values:
        return None  # a zombie
    return int(values["VmRSS"].split()[0]), int(values["VmHWM"].split()[0])


def _pss_kb(pid: int) -> int:
    """Proportional set size in kB (shared pages divided among the processes sharing them)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _role(cmdline: bytes, parent_role: str) -> str:
    if b"resource_tracker" in cmdline:
        return "resource_tracker"
    # The forkserver forks nfstream's meter from itself: same command line, child of the forkserver.
    if b"forkserver" in cmdline and parent_role != "forkserver":
        return "forkserver"
    return "meter"  # nfstream's meter, forked from the main process or from the forkserver


class _Watcher(threading.Thread):
    """Samples the memory of a process and all its descendants until stopped."""

    def __init__(self, root: int, interval_s: float = 0.2) -> None:
        super().__init__(name="rss-watcher", daemon=True)
        self.root = root
        self.interval_s = interval_s
        self.done = threading.Event()
        self.pid_peak_kb: dict[int, int] = {}
        self.tree_peak_kb = 0
        self.tree_peak_pss_kb = 0
        self.roles: dict[int, str] = {root: "main"}
        self.cmdlines: dict[int, bytes] = {}
        self.cpu: dict[int, float] = {}

    def _tree(self) -> Iterator[tuple[int, int]]:
        """(pid, parent pid) of the root and every descendant."""
        stack = [(self.root, 0)]
        while stack:
            pid, parent = stack.pop()
            yield pid, parent
            stack += [(child, pid) for child in _children(pid)]

    @property
    def peak_kb(self) -> dict[str, int]:
        """Role -> largest VmHWM of a process of that role."""
        out: dict[str, int] = {}
        for pid, kb in self.pid_peak_kb.items():
            role = self.roles.get(pid, "meter")
            out[role] = max(out.get(role, 0), kb)
        return out

    def sample(self) -> None:
        total = total_pss = 0
        for pid, parent in self._tree():
            cmdline = _cmdline(pid)
            # A new child has its parent's command line until it executes its own (the forkserver
            # does, right after it is forked): decide its role again whenever it changes.
            if pid != self.root and cmdline and cmdline != self.cmdlines.get(pid):
                self.cmdlines[pid] = cmdline
                self.roles[pid] = _role(cmdline, self.roles.get(parent, ""))
            got = _status_kb(pid)
            cpu = _cpu_s(pid)
            if got is None or cpu is None:
                continue
            rss, hwm = got
            total += rss
            total_pss += _pss_kb(pid)
            self.cpu[pid] = cpu
            self.pid_peak_kb[pid] = max(self.pid_peak_kb.get(pid, 0), hwm)
        self.tree_peak_kb = max(self.tree_peak_kb, total)
        self.tree_peak_pss_kb = max(self.tree_peak_pss_kb, total_pss)

    def cpu_by_role(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, seconds in self.cpu.items():
            role = self.roles.get(pid, "meter")
            out[role] = out.get(role, 0.0) + seconds
        return out

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()


def _kill_leftovers(watcher: _Watcher) -> None:
    """SIGKILL the descendants the watcher saw that are still running (same pid and command line)."""
    for pid, cmdline in watcher.cmdlines.items():
        if cmdline and _cmdline(pid) == cmdline:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def run_monitored(cmd: Sequence[str], workdir: Path, timeout_s: float) -> ProcRun:
    """Run ``cmd`` to the end, sampling its process tree's memory; kill what is left after it."""
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    watcher = _Watcher(proc.pid)
    watcher.start()
    timer = threading.Timer(timeout_s, lambda: os.kill(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    except BaseException:  # interrupted: leave nothing running behind
        proc.kill()
        proc.wait()
        _kill_leftovers(watcher)
        raise
    finally:
        timer.cancel()
        watcher.done.set()
        watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Descendants normally exit with their parent; end any that did not.
    time.sleep(0.5)
    _kill_leftovers(watcher)
    return ProcRun(
        returncode=proc.returncode,
        wall_s=wall,
        ru_maxrss_kb=usage.ru_maxrss,
        peak_kb=watcher.peak_kb,
        tree_peak_kb=watcher.tree_peak_kb,
        tree_peak_pss_kb=watcher.tree_peak_pss_kb,
        cpu_s=watcher.cpu_by_role(),
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------


def nfstream_child(pcap: str) -> None:
    """Hidden mode: bare nfstream iterated to the end; prints seconds, flows, packets as JSON."""
    from nfstream import NFStreamer

    started = time.perf_counter()
    flows = packets = 0
    for flow in NFStreamer(source=pcap, statistical_analysis=True, n_dissections=20, n_meters=1):
        flows += 1
        packets += flow.bidirectional_packets
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "flows": flows, "packets": packets}))


@dataclasses.dataclass
class NfstreamRun:
    seconds: float
    flows: int
    packets: int
    proc: ProcRun


def measure_nfstream(pcap: Path, workdir: Path, timeout_s: float) -> NfstreamRun:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--nfstream-child", str(pcap)]
    run = run_monitored(cmd, workdir, timeout_s)
    if run.returncode != 0:
        raise RuntimeError(f"bare nfstream run failed ({run.returncode}): {run.stderr[-2000:]}")
    got = json.loads(run.stdout.strip().splitlines()[-1])
    return NfstreamRun(float(got["seconds"]), int(got["flows"]), int(got["packets"]), run)


_METERED = re.compile(
    r"metered (\d+) flows \((\d+) anomalous, (\d+) skipped as already spooled\) in ([\d.]+)s; "
    r"(\d+) verdicts acknowledged"
)


@dataclasses.dataclass
class AgentRun:
    flows: int
    anomalous: int
    acknowledged: int
    pipeline_s: float  # the agent's own figure: metering start to last acknowledgement
    collector_cpu_s: float
    proc: ProcRun


def measure_agent(
    pcap: Path, collector: Collector, workdir: Path, timeout_s: float, config: Path | None
) -> AgentRun:
    state = workdir / "state"
    cmd = [
        *_command("auris-agent", "auris.agent"),
        "--pcap",
        str(pcap),
        "--insecure",
        "--collector",
        collector.address,
        "--models-dir",
        str(REPO / "models"),
        "--state-dir",
        str(state),
    ]
    if config is not None:
        cmd += ["--config", str(config)]
    cpu_before = collector.cpu_s()
    run = run_monitored(cmd, workdir, timeout_s)
    collector_cpu = collector.cpu_s() - cpu_before
    found = _METERED.findall(run.stderr)
    if run.returncode != 0 or not found:
        raise RuntimeError(f"agent run failed (exit {run.returncode}): {run.stderr[-3000:]}")
    flows, anomalous, skipped, seconds, acked = found[-1]
    if int(skipped):
        raise RuntimeError("the agent skipped flows as already spooled: the state dir was not fresh")
    return AgentRun(int(flows), int(anomalous), int(acked), float(seconds), collector_cpu, run)


@dataclasses.dataclass
class ScoreResult:
    batch: int
    rows: int
    ours_s: float
    base_s: float
    ours_call_us: list[float]
    base_call_us: list[float]

    def rate(self, baseline: bool = False) -> float:
        return self.rows / (self.base_s if baseline else self.ours_s)


@dataclasses.dataclass
class ScoringBench:
    models: list[str]
    source_flows: int
    rows: int
    results: list[ScoreResult]
    modelset_batch: int
    modelset_s: float
    errors: list[str]


def measure_scoring(rows_wanted: int, batches: Sequence[int], modelset_batch: int) -> ScoringBench:
    import numpy as np

    from auris.agent.meter import meter_flows
    from auris.agent.scoring import load_models, to_matrix

    models, errors = load_models(REPO / "models", threads=1)
    if not models.models:
        raise RuntimeError(f"no usable model in models/: {errors}")
    pcaps = sorted(str(p) for p in (REPO / "tests" / "data" / "pcaps").glob("*.pcap"))
    features = [flow.features for flow in meter_flows(pcaps, models.feature_sets)]
    if not features:
        raise RuntimeError("no flows metered from tests/data/pcaps")
    repeats = math.ceil(rows_wanted / len(features))
    all_features = (features * repeats)[:rows_wanted]
    matrices = {
        fs.name: to_matrix([f[fs.name] for f in all_features], len(fs.columns)) for fs in models.feature_sets
    }
    # Baseline: onnxruntime alone on inputs already in the graph's column order.
    graph_inputs = [
        np.ascontiguousarray(matrices[m.feature_set.name][:, m.column_index]) for m in models.models
    ]
    names = [
        [m.manifest.score_output] + ([m.manifest.explanation_output] if m.manifest.explanation_output else [])
        for m in models.models
    ]

    def ours(start: int, stop: int) -> None:
        for model in models.models:
            model.score_matrix(matrices[model.feature_set.name][start:stop])

    def bare(start: int, stop: int) -> None:
        for model, inputs, outs in zip(models.models, graph_inputs, names, strict=True):
            model.session.run(outs, {model.manifest.input_name: inputs[start:stop]})

    results = []
    for batch in batches:
        timings: list[list[float]] = []
        for fn in (ours, bare):
            for start in range(0, min(50 * batch, rows_wanted - batch), batch):  # warm-up
                fn(start, start + batch)
            calls: list[float] = []
            for start in range(0, rows_wanted - batch + 1, batch):
                t0 = time.perf_counter_ns()
                fn(start, start + batch)
                calls.append((time.perf_counter_ns() - t0) / 1000)
            timings.append(calls)
        rows = len(timings[0]) * batch
        results.append(
            ScoreResult(batch, rows, sum(timings[0]) / 1e6, sum(timings[1]) / 1e6, timings[0], timings[1])
        )
    # What the agent's loop calls: ModelSet.score, which also stacks the flows' feature vectors into matrices.
    started = time.perf_counter()
    done = 0
    for start in range(0, rows_wanted - modelset_batch + 1, modelset_batch):
        models.score(all_features[start : start + modelset_batch])
        done += modelset_batch
    modelset_s = (time.perf_counter() - started) * rows_wanted / done
    return ScoringBench(
        [m.ref for m in models.models],
        len(features),
        rows_wanted,
        results,
        modelset_batch,
        modelset_s,
        errors,
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mb(kb: float) -> float:
    return kb / 1024


@dataclasses.dataclass
class Report:
    args: argparse.Namespace
    pcap: Path
    pcap_bytes: int
    gen_s: float | None
    nfstream: list[NfstreamRun]
    agent: list[AgentRun]
    scoring: ScoringBench
    load_before: str
    load_after: str
    started: str
    elapsed_s: float
    notes: list[str]


def paired_ratios(bare_s: Sequence[float], agent_s: Sequence[float]) -> list[float]:
    """Per agent run: the bare runs beside it (run i of each alternate, bare first), averaged,
    over the agent's seconds."""
    ratios = []
    for i, agent in enumerate(agent_s):
        beside = bare_s[i : i + 2]
        if beside and agent > 0:
            ratios.append(statistics.fmean(beside) / agent)
    return ratios


def build_table(r: Report) -> list[list[str]]:
    packets = r.args.packets
    nf_s = statistics.median(run.seconds for run in r.nfstream)
    nf_flows = r.nfstream[0].flows
    ag_wall = statistics.median(run.proc.wall_s for run in r.agent)
    ag_pipe = statistics.median(run.pipeline_s for run in r.agent)
    ag_flows = r.agent[0].flows
    nf_pps, nf_fps = packets / nf_s, nf_flows / nf_s
    ag_pps, ag_fps = packets / ag_wall, ag_flows / ag_wall
    n_nf, n_ag = len(r.nfstream), len(r.agent)
    rows: list[list[str]] = []
    rows.append(
        [
            f"End-to-end packets/s: agent wall time (median of {n_ag}) vs bare nfstream (median of {n_nf})",
            _fmt(nf_pps),
            _fmt(ag_pps),
            f"{ag_pps / nf_pps:.2f}x",
            f">= 0.9x: {_verdict(ag_pps / nf_pps >= 0.9)}",
        ]
    )
    rows.append(
        [
            "End-to-end flows/s, same runs",
            _fmt(nf_fps),
            _fmt(ag_fps),
            f"{ag_fps / nf_fps:.2f}x",
            f">= 0.9x: {_verdict(ag_fps / nf_fps >= 0.9)}",
        ]
    )
    rows.append(
        [
            "  same, agent's own time from its 'metered N flows ... in Xs' line (no start-up, model load)",
            _fmt(nf_pps) + " pkt/s, " + _fmt(nf_fps) + " flows/s",
            _fmt(packets / ag_pipe) + " pkt/s, " + _fmt(ag_flows / ag_pipe) + " flows/s",
            f"{nf_s / ag_pipe:.2f}x",
            "(information)",
        ]
    )
    paired = paired_ratios([run.seconds for run in r.nfstream], [run.proc.wall_s for run in r.agent])
    if paired:
        rows.append(
            [
                "  same, paired: median over the agent runs of (the bare runs just before and after it,"
                " averaged) / agent wall (a host whose speed drifts moves both sides of a pair alike)",
                "",
                ", ".join(f"{x:.2f}x" for x in paired),
                f"{statistics.median(paired):.2f}x",
                "(information)",
            ]
        )
    nf_wall = statistics.median(run.proc.wall_s for run in r.nfstream)
    rows.append(
        [
            "  same, both timed as processes from start to exit (Python start-up and imports on both sides)",
            _fmt(packets / nf_wall) + " pkt/s",
            _fmt(ag_pps) + " pkt/s",
            f"{nf_wall / ag_wall:.2f}x",
            "(information)",
        ]
    )
    rows.append(
        [
            "  seconds per run (bare nfstream timed inside, as a process | agent wall, agent's own)",
            f"{_fmt(nf_s, 's')}, {_fmt(nf_wall, 's')}",
            f"{_fmt(ag_wall, 's')}, {_fmt(ag_pipe, 's')}",
            "",
            "(information)",
        ]
    )
    by_batch = {res.batch: res for res in r.scoring.results}
    for res in r.scoring.results:
        ours, base = res.rate(), res.rate(baseline=True)
        default = " (the default score_batch)" if res.batch == 64 else ""
        rows.append(
            [
                f"Scoring flows/s on one core, batch {res.batch}{default}: score_matrix vs bare session.run",
                _fmt(base),
                _fmt(ours),
                f"{ours / base:.2f}x",
                f">= 100k flows/s: {_verdict(ours >= 100_000)}",
            ]
        )
    ms_rate = r.scoring.rows / r.scoring.modelset_s
    rows.append(
        [
            f"  scoring incl. stacking the flows' feature vectors into matrices (ModelSet.score), batch "
            f"{r.scoring.modelset_batch}",
            _fmt(by_batch[64].rate(baseline=True)) if 64 in by_batch else "",
            _fmt(ms_rate),
            f"{ms_rate / by_batch[64].rate(baseline=True):.2f}x" if 64 in by_batch else "",
            f">= 100k flows/s: {_verdict(ms_rate >= 100_000)}",
        ]
    )
    if 64 in by_batch:
        res = by_batch[64]
        ours_p99 = _percentile(res.ours_call_us, 99) / 64
        base_p99 = _percentile(res.base_call_us, 99) / 64
        rows.append(
            [
                "Scoring p99 latency per flow at batch 64 (per-call p99 / 64)",
                _fmt(base_p99, "µs"),
                _fmt(ours_p99, "µs"),
                f"{ours_p99 / base_p99:.2f}x",
                f"<= 50 µs: {_verdict(ours_p99 <= 50)}",
            ]
        )
    for res in r.scoring.results:
        op50, op99 = _percentile(res.ours_call_us, 50), _percentile(res.ours_call_us, 99)
        bp50, bp99 = _percentile(res.base_call_us, 50), _percentile(res.base_call_us, 99)
        b = res.batch
        rows.append(
            [
                f"  scoring latency at batch {b}, p50 / p99 per call (per flow)",
                f"{_fmt(bp50)} / {_fmt(bp99)} µs ({_fmt(bp50 / b)} / {_fmt(bp99 / b)})",
                f"{_fmt(op50)} / {_fmt(op99)} µs ({_fmt(op50 / b)} / {_fmt(op99 / b)})",
                f"{op99 / bp99:.2f}x",
                "(information)",
            ]
        )

    def peak(runs: Sequence[ProcRun], role: str) -> float:
        return _mb(max(p.peak_kb.get(role, 0) for p in runs))

    nf_procs = [run.proc for run in r.nfstream]
    ag_procs = [run.proc for run in r.agent]
    ag_main, nf_main = peak(ag_procs, "main"), peak(nf_procs, "main")
    ag_pss = _mb(max(p.tree_peak_pss_kb for p in ag_procs))
    nf_pss = _mb(max(p.tree_peak_pss_kb for p in nf_procs))
    ag_rss = _mb(max(p.tree_peak_kb for p in ag_procs))
    nf_rss = _mb(max(p.tree_peak_kb for p in nf_procs))
    ag_meter, nf_meter = peak(ag_procs, "meter"), peak(nf_procs, "meter")
    ag_fork = peak(ag_procs, "forkserver")
    rows += [
        [
            "Peak RSS, agent process alone (VmHWM) vs a bare nfstream consumer process",
            _fmt(nf_main, "MB"),
            _fmt(ag_main, "MB"),
            f"{ag_main / nf_main:.2f}x",
            f"<= 150 MB: {_verdict(ag_main <= 150)}",
        ],
        [
            "Peak memory, whole process tree (agent + forkserver + meter): largest sampled sum of Pss",
            _fmt(nf_pss, "MB"),
            _fmt(ag_pss, "MB"),
            f"{ag_pss / nf_pss:.2f}x",
            f"<= 150 MB: {_verdict(ag_pss <= 150)}",
        ],
        [
            "  same as a sum of VmRSS (counts pages shared after fork again in each process)",
            _fmt(nf_rss, "MB"),
            _fmt(ag_rss, "MB"),
            f"{ag_rss / nf_rss:.2f}x",
            f"<= 150 MB: {_verdict(ag_rss <= 150)}",
        ],
        [
            "  peak RSS (VmHWM) of nfstream's meter process; of the agent's forkserver",
            _fmt(nf_meter, "MB"),
            f"{_fmt(ag_meter, 'MB')}; {_fmt(ag_fork, 'MB')}",
            f"{ag_meter / nf_meter:.2f}x" if nf_meter else "",
            "(information)",
        ],
    ]
    return rows


def _cpu_text(run: ProcRun) -> str:
    parts = [
        f"{run.cpu_s.get(role, 0.0):.1f}" for role in ("main", "meter", "forkserver") if role in run.cpu_s
    ]
    return " + ".join(parts)


def render(r: Report) -> str:
    header = ["what", "baseline (measured in the same run)", "ours", "ratio", "target"]
    table = [header, ["---"] * len(header), *build_table(r)]
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
    args = r.args
    nf0, ag0 = r.nfstream[0], r.agent[0]
    params = [
        f"capture: {r.pcap} ({r.pcap_bytes / 1e6:,.0f} MB, classic pcap, Ethernet/IPv4, TCP and UDP), "
        f"{args.packets:,} packets in {args.flows:,} generated flows, seed {args.seed}; "
        + (f"generated in {r.gen_s:.1f} s" if r.gen_s is not None else "reused from the cache"),
        f"bare nfstream saw {nf0.flows:,} flows and {nf0.packets:,} packets; "
        f"the agent metered {ag0.flows:,} flows ({ag0.anomalous:,} anomalous), "
        f"{ag0.acknowledged:,} verdicts acknowledged by the collector",
        "bare nfstream: NFStreamer(source=pcap, statistical_analysis=True, n_dissections=20, n_meters=1) "
        "iterated to the end in a child process (timed inside it, from construction to the last flow)",
        f"agent: `auris-agent --pcap CAPTURE --insecure --collector 127.0.0.1:PORT --models-dir models "
        f"--state-dir FRESH_TMP{' --config ' + str(args.agent_config) if args.agent_config else ''}` "
        "(defaults otherwise: score_batch 64, score_threads 1), "
        "timed from process start to exit (includes Python start-up, model loading, waiting for the last "
        "acknowledgement); a real `auris-collector serve --insecure` on 127.0.0.1 with a temp SQLite db "
        "ran on the same machine",
        "runs: "
        + ", ".join(f"nfstream {run.seconds:.2f} s" for run in r.nfstream)
        + "; "
        + ", ".join(f"agent {run.proc.wall_s:.2f} s wall / {run.pipeline_s:.2f} s own" for run in r.agent)
        + " (bare nfstream and agent runs alternated)",
        "CPU seconds per run, sampled (agent process + meter + forkserver): "
        + ", ".join(_cpu_text(run.proc) for run in r.agent)
        + "; collector during each agent run: "
        + ", ".join(f"{run.collector_cpu_s:.1f}" for run in r.agent)
        + "; bare nfstream (consumer + meter): "
        + ", ".join(_cpu_text(run.proc) for run in r.nfstream),
        "memory and CPU: sampled every 0.2 s from /proc/PID/{status,smaps_rollup,stat} of the process and "
        "all its descendants (VmHWM per process; VmRSS and Pss summed over the tree at each sample; the "
        "last 0.2 s of CPU may be missed); agent ru_maxrss from wait4, for comparison: "
        + ", ".join(f"{_mb(run.proc.ru_maxrss_kb):.0f} MB" for run in r.agent)
        + ". This is a pcap replay whose meter held the flows seen in the last 120 s of capture time "
        "(nfstream's idle timeout), not a live capture with 100k concurrent flows",
        f"scoring: models {', '.join(r.scoring.models)} loaded with load_models(models/, threads=1); "
        f"{r.scoring.source_flows:,} flows metered from tests/data/pcaps/*.pcap, rows repeated to "
        f"{r.scoring.rows:,}; one pass per batch size after a warm-up, in one Python thread with "
        "intra_op_num_threads=1; 'ours' = LoadedModel.score_matrix (all models), baseline = "
        "InferenceSession.run alone on inputs already in column order"
        + (f"; models refused: {'; '.join(r.scoring.errors)}" if r.scoring.errors else ""),
    ]
    machine = _machine()
    versions = _versions(("auris", "nfstream", "onnxruntime", "numpy", "grpcio", "protobuf", "sqlite-utils"))
    out = [
        "# Agent benchmark",
        "",
        f"Run {r.started} by `bench/agent_bench.py`, {r.elapsed_s / 60:.1f} min in all.",
        "",
        *lines,
        "",
        "Machine: "
        + "; ".join(f"{k} {v}" for k, v in machine.items())
        + f"; load average {r.load_before} at the start, {r.load_after} at the end.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "Parameters and method:",
        "",
        *[f"- {p}" for p in params],
        *[f"- {n}" for n in r.notes],
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--packets", type=int, default=1_000_000, help="packets in the capture (default 1,000,000)"
    )
    p.add_argument("--flows", type=int, default=50_000, help="flows in the capture (default 50,000)")
    p.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "agent.md", help="Markdown report"
    )
    p.add_argument(
        "--runs", type=int, default=3, help="bare nfstream and agent runs each (median; default 3)"
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=900.0,
        help="stop repeating runs once another round would pass this (default 900)",
    )
    p.add_argument("--seed", type=int, default=1, help="random seed of the generator")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "auris-bench",
        help="where generated captures are kept between runs (default: $TMPDIR/auris-bench)",
    )
    p.add_argument("--score-rows", type=int, default=100_000, help="rows scored per batch size")
    p.add_argument("--agent-config", type=Path, help="TOML config passed to the agent with --config")
    p.add_argument("--run-timeout-s", type=float, default=1800.0, help="kill a run after this long")
    p.add_argument("--nfstream-child", metavar="PCAP", help=argparse.SUPPRESS)
    add_figures_argument(p)
    return p


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.nfstream_child:
        nfstream_child(args.nfstream_child)
        return 0
    if args.packets < 5 * args.flows or args.flows < 10 or args.runs < 1:
        print("agent_bench: need --flows >= 10, --packets >= 5 x --flows and --runs >= 1", file=sys.stderr)
        return 2
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    started = time.perf_counter()
    load_before = _loadavg()
    notes: list[str] = []

    _say(f"capture: {args.packets:,} packets, {args.flows:,} flows (cache {args.cache_dir})")
    pcap, gen_s = cached_pcap(args.cache_dir, args.packets, args.flows, args.seed)
    _say(f"capture ready: {pcap}" + (f" (generated in {gen_s:.1f} s)" if gen_s is not None else " (cached)"))

    nf_runs: list[NfstreamRun] = []
    ag_runs: list[AgentRun] = []
    with tempfile.TemporaryDirectory(prefix="auris-bench-") as tmp:
        work = Path(tmp)
        collector_dir = work / "collector"
        collector_dir.mkdir()
        collector = Collector(collector_dir)
        _say(f"collector on {collector.address}")
        try:
            for round_no in range(1, args.runs + 1):
                round_started = time.perf_counter()
                nf_dir = work / f"nfstream-{round_no}"
                nf_dir.mkdir()
                nf = measure_nfstream(pcap, nf_dir, args.run_timeout_s)
                nf_runs.append(nf)
                _say(
                    f"bare nfstream run {round_no}: {nf.seconds:.2f} s, {nf.flows:,} flows, "
                    f"{nf.packets:,} packets"
                )
                ag_dir = work / f"agent-{round_no}"
                ag_dir.mkdir()
                ag = measure_agent(pcap, collector, ag_dir, args.run_timeout_s, args.agent_config)
                ag_runs.append(ag)
                shutil.rmtree(ag_dir / "state", ignore_errors=True)
                _say(
                    f"agent run {round_no}: {ag.proc.wall_s:.2f} s wall, {ag.pipeline_s:.2f} s own, "
                    f"{ag.flows:,} flows, {ag.acknowledged:,} acknowledged"
                )
                round_s = time.perf_counter() - round_started
                if round_no < args.runs and time.perf_counter() - started + round_s > args.time_budget_s:
                    notes.append(
                        f"only {round_no} of {args.runs} rounds were run: one round took {round_s:.0f} s "
                        f"and another would pass the {args.time_budget_s:.0f} s budget"
                    )
                    break
        finally:
            collector.stop()
    if nf_runs[0].packets != args.packets or nf_runs[0].flows != args.flows:
        notes.append(
            f"nfstream counted {nf_runs[0].flows:,} flows / {nf_runs[0].packets:,} packets for the "
            f"{args.flows:,} flows / {args.packets:,} packets generated"
        )
    if ag_runs[0].flows != nf_runs[0].flows:
        notes.append(f"the agent metered {ag_runs[0].flows:,} flows, bare nfstream {nf_runs[0].flows:,}")

    _say(f"scoring: {args.score_rows:,} rows at batch 1, 64 and 256")
    scoring = measure_scoring(args.score_rows, (1, 64, 256), 64)
    notes.append(
        "the machine is shared (2 vCPUs, other workloads running): absolute figures are noisy; "
        "ratios measured in the same run are the meaningful part"
    )
    report = Report(
        args=args,
        pcap=pcap,
        pcap_bytes=pcap.stat().st_size,
        gen_s=gen_s,
        nfstream=nf_runs,
        agent=ag_runs,
        scoring=scoring,
        load_before=load_before,
        load_after=_loadavg(),
        started=started_at,
        elapsed_s=time.perf_counter() - started,
        notes=notes,
    )
    text = render(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    write_figures(args.figures, "agent", build_table(report))
    _say(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
