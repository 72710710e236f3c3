"""Collector benchmark: raw SQLite inserts vs the collector's gRPC ingest, queries, live subscriptions.

Run from the repository root::

    .venv/bin/python bench/collector_bench.py [--agents N] [--verdicts V] [--query-rows R]
    .venv/bin/python bench/collector_bench.py --quick      # a sanity check in about a minute

One run measures raw ``sqlite3`` executemany into the collector's schema, the real
``auris-collector`` ingesting from N simulated agent processes over gRPC, query latency on a
large database (built once and cached), and the latency of a live subscription while the
agents stream; it prints one table (also written as Markdown to ``--out``). See bench/README.md.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auris.collector import talkers
from auris.collector.client import CollectorClient
from auris.collector.store import (
    _INSERT_SQL,
    _ROLLUP_SELECT,
    _ROLLUP_UPSERT,
    SCHEMA_VERSION,
    VerdictStore,
    verdict_row,
)
from auris.v1 import flow_pb2, model_pb2, query_service_pb2, verdict_pb2
from benchlib import Collector, add_figures_argument, write_figures
from benchlib import cpu_s as _cpu_s
from benchlib import fmt as _fmt
from benchlib import loadavg as _loadavg
from benchlib import machine as _machine
from benchlib import percentile as _percentile
from benchlib import say as _say
from benchlib import verdict as _verdict
from benchlib import versions as _versions

if TYPE_CHECKING:
    pass

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Bump when the generated verdicts change, so cached databases are not reused.
GEN_VERSION = 2

# --------------------------------------------------------------------------------------------
# Synthetic verdicts
# --------------------------------------------------------------------------------------------

# The two models the repository ships (models/ and models/candidates/), as the agent reports them.
_RF = ("nfstream-rf", "1")
_RF_THRESHOLD = 0.5
_AE = ("nfstream-ae", "1")
_AE_THRESHOLD = 2.8189404010772705
_AE_FEATURES = (
    "bidirectional_duration_ms", "bidirectional_packets", "bidirectional_bytes", "src2dst_packets",
    "src2dst_bytes", "dst2src_packets", "dst2src_bytes", "bidirectional_mean_ps", "bidirectional_max_ps",
    "src2dst_max_ps", "dst2src_min_ps", "bidirectional_mean_piat_ms", "src2dst_max_piat_ms",
    "bidirectional_syn_packets", "bidirectional_rst_packets", "dst2src_fin_packets",
)  # fmt: skip
_TLS = ("TLS", "TLS", "TLS.Google", "TLS.Microsoft", "TLS.Amazon", "TLS.Cloudflare", "TLS.Facebook")
_TCP_SERVICES = (
    (443, _TLS),
    (443, _TLS),
    (443, _TLS),
    (443, _TLS),
    (80, ("HTTP", "HTTP.Apple", "HTTP.Microsoft")),
    (22, ("SSH",)),
    (8080, ("HTTP_Proxy",)),
    (25, ("SMTP",)),
    (993, ("IMAPS",)),
    (3389, ("RDP",)),
)
_UDP_SERVICES = (
    (443, ("QUIC", "QUIC.YouTube", "QUIC.Google")),
    (123, ("NTP",)),
    (5004, ("RTP",)),
    (3478, ("STUN",)),
    (5060, ("SIP",)),
)
_ATTACK_PORTS = ((22, "SSH"), (3389, "RDP"), (80, "HTTP"), (445, "SMBv23"), (23, "Telnet"), (8080, "HTTP"))
# The agent's meter defaults (agent/auris/agent/config.py): a flow ends when idle this long, or
# when it has lasted this long; the live-flow cap evicts a few early.
_IDLE_TIMEOUT_NS = 120_000_000_000
_ACTIVE_TIMEOUT_MS = 1_800_000
_IDLE, _ACTIVE, _EVICTED = (
    flow_pb2.FLOW_END_REASON_IDLE_TIMEOUT,
    flow_pb2.FLOW_END_REASON_ACTIVE_TIMEOUT,
    flow_pb2.FLOW_END_REASON_EVICTED,
)
_TEMPLATES = 1024  # distinct flow shapes (ports, counters, scores) per factory
_CLIENT_HOSTS = 2000  # per agent
_SERVERS = 20_000  # shared by all agents


class VerdictFactory:
    """Verdicts of one simulated agent, deterministic in (seed, agent).

    Each verdict is a realistic flow as the agent builds it (agent/auris/agent/verdicts.py): a
    5-tuple from the agent's client subnet to its resolver or to external servers (both picked
    with a heavy tail), per-direction counters, millisecond flow times that follow the meter's
    timeouts (most flows end idle: last packet 120-123 s before scoring), the deciding model and two
    ModelScore entries (the random forest with class probabilities, the autoencoder with its top
    three features), label, explanation, nDPI application name. A fraction is anomalous.
    """

    def __init__(self, seed: int, agent: int, anomalous_fraction: float) -> None:
        self.agent = agent
        self.agent_id = f"bench-agent-{agent:03d}"
        self.hostname = f"sensor-{agent:03d}.example.net"
        self.anomalous_fraction = anomalous_fraction
        shared = random.Random(seed)  # the same servers for every agent
        self.servers = [
            f"{shared.choice((23, 34, 52, 104, 142, 151, 157, 172, 185, 198, 203))}."
            f"{shared.randrange(256)}.{shared.randrange(256)}.{shared.randrange(1, 255)}"
            for _ in range(_SERVERS)
        ]
        self.server_cum = _zipf_cum(_SERVERS, 1.0)
        self.rng = random.Random(seed * 1_000_003 + agent)
        net = agent % 250
        self.clients = [f"10.{net}.{h // 250}.{h % 250 + 1}" for h in range(_CLIENT_HOSTS)]
        self.rng.shuffle(self.clients)
        self.client_cum = _zipf_cum(_CLIENT_HOSTS, 0.8)
        self.resolver = f"10.{net}.255.53"
        self.normal = [self._template(False) for _ in range(_TEMPLATES)]
        self.anomalous = [self._template(True) for _ in range(_TEMPLATES // 8)]

    def _template(self, anomalous: bool) -> tuple[verdict_pb2.Verdict, bool, int]:
        """(verdict without agent, addresses, times; whether it goes to the resolver; duration ms)."""
        rng = self.rng
        kind = rng.random()
        end = rng.random()
        end_reason = _IDLE if end < 0.96 else _ACTIVE if end < 0.99 else _EVICTED
        dns = False
        if anomalous:
            dst_port, app = rng.choice(_ATTACK_PORTS)
            proto = 6
            c2s_pk = rng.randint(1, 12)
            s2c_pk = rng.randint(0, c2s_pk)
            c2s_b, s2c_b = c2s_pk * rng.randint(40, 90), s2c_pk * rng.randint(40, 120)
            duration_ms = rng.randint(0, 3000)
            app = app if s2c_pk > 2 else "Unknown"
        elif kind < 0.25:
            dns, dst_port, proto, app = True, 53, 17, "DNS"
            c2s_pk, s2c_pk = 1, 1
            c2s_b, s2c_b = rng.randint(60, 90), rng.randint(90, 300)
            duration_ms = rng.randint(1, 40)
        else:
            tcp = kind < 0.9
            dst_port, apps = rng.choice(_TCP_SERVICES if tcp else _UDP_SERVICES)
            proto = 6 if tcp else 17
            app = rng.choice(apps)
            total = min(int(rng.paretovariate(1.2) * 8), 200_000)
            c2s_pk = max(1, int(total * rng.uniform(0.3, 0.6)))
            s2c_pk = max(1, total - c2s_pk)
            upload = rng.random() < 0.1
            c2s_b = c2s_pk * (rng.randint(600, 1500) if upload else rng.randint(60, 200))
            s2c_b = s2c_pk * (rng.randint(60, 200) if upload else rng.randint(600, 1500))
            duration_ms = min(int(rng.expovariate(1 / 20_000) + total * 2), _ACTIVE_TIMEOUT_MS)
        if end_reason == _ACTIVE:
            duration_ms = _ACTIVE_TIMEOUT_MS + rng.randrange(1000)
        v = verdict_pb2.Verdict(
            flow=flow_pb2.FlowKey(dst_port=dst_port, ip_protocol=proto, vlan_id=0, ip_version=4),
            counters=flow_pb2.FlowCounters(
                src_to_dst_packets=c2s_pk,
                dst_to_src_packets=s2c_pk,
                src_to_dst_bytes=c2s_b,
                dst_to_src_bytes=s2c_b,
            ),
            application_name=app,
            end_reason=end_reason,
            capture_source="eth0",
        )
        # Scores as the two models give them: most flows far from either threshold.
        if anomalous and rng.random() < 0.7:
            p_attack = rng.uniform(_RF_THRESHOLD, 1.0)
        elif anomalous:
            p_attack = rng.uniform(0.05, _RF_THRESHOLD - 0.01)
        else:
            p_attack = min(rng.betavariate(1.2, 30.0), _RF_THRESHOLD - 0.01)
        rf_fired = p_attack >= _RF_THRESHOLD
        error = (
            rng.uniform(_AE_THRESHOLD, 40.0)
            if anomalous and (not rf_fired or rng.random() < 0.5)
            else rng.lognormvariate(-0.7, 0.8)
        )
        error = error if anomalous else min(error, _AE_THRESHOLD * 0.99)
        ae_fired = error >= _AE_THRESHOLD
        features = rng.sample(_AE_FEATURES, 3)
        values = sorted((rng.uniform(0.01, error * 3) for _ in features), reverse=True)
        v.scores.add(
            model=model_pb2.ModelRef(model_id=_RF[0], version=_RF[1]),
            kind=model_pb2.MODEL_KIND_CLASSIFIER,
            score=p_attack,
            threshold=_RF_THRESHOLD,
            anomalous=rf_fired,
            label="attack" if rf_fired else "benign",
            class_probabilities={"attack": p_attack, "benign": 1.0 - p_attack},
        )
        v.scores.add(
            model=model_pb2.ModelRef(model_id=_AE[0], version=_AE[1]),
            kind=model_pb2.MODEL_KIND_AUTOENCODER,
            score=error,
            threshold=_AE_THRESHOLD,
            anomalous=ae_fired,
            top_features=[
                verdict_pb2.FeatureContribution(feature=f, value=x)
                for f, x in zip(features, values, strict=True)
            ],
        )
        # What decide() in agent/auris/agent/verdicts.py makes of the two scores.
        if rf_fired:
            v.model.model_id, v.model.version = _RF
            v.label, v.anomalous = "attack", True
            v.explanation = f"{_RF[0]} {p_attack:.3g} >= {_RF_THRESHOLD:.3g} (attack p={p_attack:.2f})"
            if ae_fired:
                v.explanation += f"; {_AE[0]} {error:.3g} >= {_AE_THRESHOLD:.3g} ({', '.join(features)})"
        elif ae_fired:
            v.model.model_id, v.model.version = _AE
            v.label, v.anomalous = "anomaly", True
            v.explanation = f"{_AE[0]} {error:.3g} >= {_AE_THRESHOLD:.3g} ({', '.join(features)})"
        else:
            v.model.model_id, v.model.version = _RF
            v.label, v.anomalous = "benign", False
            v.explanation = f"{_RF[0]} {p_attack:.3g} < {_RF_THRESHOLD:.3g}"
        return v, dns, duration_ms

    def verdicts(
        self, first_sequence: int, count: int, start_ns: int, step_ns: int
    ) -> list[verdict_pb2.Verdict]:
        """``count`` verdicts with sequences from ``first_sequence``, scored ``step_ns`` apart."""
        rng = self.rng
        clients = rng.choices(self.clients, cum_weights=self.client_cum, k=count)
        servers = rng.choices(self.servers, cum_weights=self.server_cum, k=count)
        out = []
        normal, anomalous, fraction = self.normal, self.anomalous, self.anomalous_fraction
        for i in range(count):
            pool = anomalous if rng.random() < fraction else normal
            template, dns, duration_ms = pool[int(rng.random() * len(pool))]
            v = verdict_pb2.Verdict()
            v.CopyFrom(template)
            v.agent_id = self.agent_id
            v.hostname = self.hostname
            v.sequence = first_sequence + i
            flow = v.flow
            flow.src_ip = clients[i]
            flow.dst_ip = self.resolver if dns else servers[i]
            flow.src_port = 32768 + int(rng.random() * 28000)
            scored_ns = start_ns + i * step_ns
            # The meter reports milliseconds. An idle flow is expired (and scored) an idle timeout
            # after its last packet, plus the meter's scan and the scoring batch; a flow cut at
            # the active timeout was seen just now; an evicted one, anywhere in the idle window.
            reason = template.end_reason
            if reason == _IDLE:
                last_ns = scored_ns - _IDLE_TIMEOUT_NS - int(rng.random() * 3e9)
            elif reason == _ACTIVE:
                last_ns = scored_ns - int(rng.random() * 1e9)
            else:
                last_ns = scored_ns - int(rng.random() * _IDLE_TIMEOUT_NS)
            last_ms = last_ns // 1_000_000
            v.scored_time.FromNanoseconds(scored_ns)
            v.last_seen_time.FromMilliseconds(last_ms)
            v.first_seen_time.FromMilliseconds(last_ms - duration_ms)
            out.append(v)
        return out

    def batches(
        self, count: int, batch: int, start_ns: int, step_ns: int
    ) -> Iterator[list[verdict_pb2.Verdict]]:
        """The agent's first ``count`` verdicts in batches of ``batch`` (the same for any caller)."""
        for first in range(0, count, batch):
            n = min(batch, count - first)
            yield self.verdicts(first + 1, n, start_ns + first * step_ns, step_ns)


def _zipf_cum(n: int, s: float) -> list[float]:
    """Cumulative weights 1/(rank+1)^s, for random.choices."""
    total = 0.0
    out = []
    for rank in range(n):
        total += 1.0 / (rank + 1) ** s
        out.append(total)
    return out


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's main thread and of the rest of its threads.

    Python 3.11 does not give its threads OS names, so the writer and reader pools and gRPC's
    own threads cannot be told apart from outside; py-spy (when given) splits the Python ones.
    """
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        key = (
            "main thread (asyncio event loop: gRPC aio server, parsing, validate_batch)"
            if task.name == str(pid)
            else "other threads (the SQLite writer, WAL checkpoints, readers, gRPC core)"
        )
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Child:
    """A child process of this script in a hidden mode, spoken to by lines on stdin/stdout."""

    def __init__(self, mode: str, spec: dict[str, Any], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(spec)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )

    def readline(self, timeout_s: float) -> str:
        """The child's next line; RuntimeError if it exits or says nothing in time."""
        stdout = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        line = stdout.readline().decode() if ready else ""
        if not line:
            self.kill()
            raise RuntimeError(
                f"child {self.proc.args!r} said nothing within {timeout_s:.0f} s or exited "
                f"({self.proc.poll()}): {self.stderr_path.read_text(errors='replace')[-2000:]}"
            )
        return line.strip()

    def send(self, line: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(line.encode() + b"\n")
        stdin.flush()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._stderr.close()


# --------------------------------------------------------------------------------------------
# Hidden child modes: a simulated agent, a live subscriber
# --------------------------------------------------------------------------------------------


def agent_child(spec: dict[str, Any]) -> None:
    """Stream pre-built verdict batches as the agent's uplink does; print per-batch timings as JSON.

    Like agent/auris/agent/uplink.py: one StreamVerdicts stream, requests pre-serialised with
    encode_batch, at most ``window`` unacknowledged batches in flight.
    """
    import grpc

    from auris.agent.uplink import encode_batch, open_channel
    from auris.v1 import agent_service_pb2

    factory = VerdictFactory(spec["seed"], spec["agent"], spec["anomalous_fraction"])
    tops: list[int] = []
    batches: list[bytes] = []
    anomalous = 0
    for verdicts in factory.batches(spec["count"], spec["batch"], spec["start_ns"], spec["step_ns"]):
        anomalous += sum(v.anomalous for v in verdicts)
        tops.append(verdicts[-1].sequence)
        batches.append(encode_batch(factory.agent_id, [v.SerializeToString() for v in verdicts]))
    channel = open_channel(spec["address"], insecure=True)
    grpc.channel_ready_future(channel).result(timeout=60)
    service = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
    stream = channel.stream_stream(
        f"/{service}/StreamVerdicts",
        request_serializer=None,
        response_deserializer=agent_service_pb2.StreamVerdictsResponse.FromString,
    )
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    window = threading.Semaphore(spec["window"])
    sent_at = [0.0] * len(batches)

    def requests() -> Iterator[bytes]:
        for i, data in enumerate(batches):
            window.acquire()
            sent_at[i] = time.monotonic()
            yield data

    acked_at: list[float] = []
    accepted = duplicates = top = 0
    cpu_before = time.process_time()
    started = time.monotonic()
    for response in stream(requests()):
        acked_at.append(time.monotonic())
        accepted += response.accepted
        duplicates += response.duplicates
        top = response.acknowledged_sequence
        window.release()
    ended = time.monotonic()
    cpu = time.process_time() - cpu_before
    channel.close()
    result = {
        "agent_id": factory.agent_id,
        "verdicts": spec["count"],
        "anomalous": anomalous,
        "accepted": accepted,
        "duplicates": duplicates,
        "top": top,
        "tops": tops,
        "sent_at": sent_at,
        "acked_at": acked_at,
        "started": started,
        "ended": ended,
        "cpu_s": cpu,
    }
    print(json.dumps(result), flush=True)


def subscriber_child(spec: dict[str, Any]) -> None:
    """SubscribeVerdicts with a filter; note when each verdict arrives; write them to spec["out"]."""
    import grpc

    from auris.agent.uplink import open_channel
    from auris.v1 import query_service_pb2, query_service_pb2_grpc

    channel = open_channel(spec["address"], insecure=True)
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = query_service_pb2_grpc.QueryServiceStub(channel)
    flt = query_service_pb2.VerdictFilter()
    if spec["filter"] == "anomalous":
        flt.anomalous = True
    call = stub.SubscribeVerdicts(
        query_service_pb2.SubscribeVerdictsRequest(filter=flt, max_batch=spec["max_batch"])
    )
    # (agent id, sequence, arrival on the monotonic clock, arrival wall-clock ns, collector's
    # received_time ns)
    arrivals: list[tuple[str, int, float, int, int]] = []
    errors: list[str] = []

    def pump() -> None:
        try:
            for response in call:
                now, wall = time.monotonic(), time.time_ns()
                for stored in response.verdicts or [response.verdict]:
                    arrivals.append(
                        (
                            stored.verdict.agent_id,
                            stored.verdict.sequence,
                            now,
                            wall,
                            stored.received_time.seconds * 1_000_000_000 + stored.received_time.nanos,
                        )
                    )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            if code != grpc.StatusCode.CANCELLED:
                details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                errors.append(f"{code.name}: {details}")

    cpu_before = time.process_time()
    thread = threading.Thread(target=pump, name="subscriber", daemon=True)
    thread.start()
    time.sleep(1.0)  # the collector registers the subscription when the request arrives
    print("ready", flush=True)
    sys.stdin.readline()  # "stop": the agents are done; drain what is still coming, then leave
    deadline = time.monotonic() + 30
    seen = -1
    while time.monotonic() < deadline and thread.is_alive() and len(arrivals) != seen:
        seen = len(arrivals)
        time.sleep(1.0)
    call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
    thread.join(10)
    cpu = time.process_time() - cpu_before
    Path(spec["out"]).write_text(json.dumps({"errors": errors, "arrivals": arrivals, "cpu_s": cpu}))
    print(json.dumps({"received": len(arrivals), "errors": errors}), flush=True)


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------

Row = tuple[Any, ...]


@dataclasses.dataclass
class Workload:
    """What the simulated agents send, as the stored rows, in round-robin batch order."""

    agents: int
    per_agent: int
    batch: int
    start_ns: int
    step_ns: int
    # (agent id, rows of one batch), agent 0 batch 0, agent 1 batch 0, ...
    batches: list[tuple[str, list[Row]]]
    anomalous: int

    @property
    def verdicts(self) -> int:
        return sum(len(rows) for _, rows in self.batches)


def build_workload(args: argparse.Namespace, start_ns: int) -> Workload:
    per_agent = args.verdicts // args.agents
    step_ns = 1_000_000
    per_agent_batches = []
    anomalous = 0
    for agent in range(args.agents):
        factory = VerdictFactory(args.seed, agent, args.anomalous_fraction)
        mine = []
        for verdicts in factory.batches(per_agent, args.batch, start_ns, step_ns):
            anomalous += sum(v.anomalous for v in verdicts)
            mine.append((factory.agent_id, [verdict_row(v, start_ns) for v in verdicts]))
        per_agent_batches.append(mine)
    ordered = [b for group in itertools.zip_longest(*per_agent_batches) for b in group if b is not None]
    return Workload(args.agents, per_agent, args.batch, start_ns, step_ns, ordered, anomalous)


def _fresh_schema(path: Path) -> None:
    """An empty database with the collector's schema and indexes (its own migrations)."""
    VerdictStore(path, "normal").close()


def _raw_connection(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def measure_raw(
    workload: Workload,
    db: Path,
    group: int = 1,
    drop: Callable[[str], bool] | None = None,
    *,
    multi_row: bool = False,
    checkpointer: bool = False,
) -> list[float]:
    """Baseline: executemany of the rows, one transaction per batch; seconds per transaction.

    What-ifs: ``group`` batches per transaction; dropping the indexes ``drop`` picks by name;
    one multi-row INSERT per batch instead of executemany; WAL checkpoints on another thread.
    """
    from auris.collector.store import _insert_rows_sql

    _fresh_schema(db)
    conn = _raw_connection(db)
    stop = threading.Event()
    thread = None
    if checkpointer:
        conn.execute("PRAGMA wal_autocheckpoint=4096")

        def checkpoint() -> None:
            with contextlib.closing(sqlite3.connect(str(db), isolation_level=None)) as other:
                while not stop.wait(0.05):
                    other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

        thread = threading.Thread(target=checkpoint, daemon=True)
        thread.start()
    times = []
    try:
        if drop is not None:
            for _, name, unique, *_ in conn.execute("PRAGMA index_list(verdicts)").fetchall():
                if not unique and drop(name):
                    conn.execute(f'DROP INDEX "{name}"')
        for first in range(0, len(workload.batches), group):
            t0 = time.perf_counter()
            conn.execute("BEGIN")
            for _, rows in workload.batches[first : first + group]:
                if multi_row:
                    conn.execute(_insert_rows_sql(len(rows)), list(itertools.chain.from_iterable(rows)))
                else:
                    conn.executemany(_INSERT_SQL, rows)
            conn.execute("COMMIT")
            times.append(time.perf_counter() - t0)
        (count,) = conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    if count != workload.verdicts:
        raise RuntimeError(f"raw executemany stored {count} rows of {workload.verdicts}")
    return times


def measure_raw_what_ifs(workload: Workload, work: Path) -> list[tuple[str, float]]:
    """Rows/s of the raw baseline changed one way at a time: where SQLite's time goes."""
    variants: list[tuple[str, int, Callable[[str], bool] | None, bool, bool]] = [
        ("one transaction per 8 batches (2,048 rows) instead of per batch", 8, None, False, False),
        ("one multi-row INSERT per batch instead of executemany", 1, None, True, False),
        ("WAL checkpoints on a thread of their own (autocheckpoint at 4096 pages)", 1, None, False, True),
        ("all three, as the collector does", 8, None, True, True),
        (
            "without the two address indexes ((id block, src_ip), (id block, dst_ip))",
            1,
            lambda name: name.endswith("_ip_block"),
            False,
            False,
        ),
        (
            "without the non-unique indexes (all but (agent_id, sequence))",
            1,
            lambda name: True,
            False,
            False,
        ),
    ]
    out = []
    for label, group, drop, multi_row, checkpointer in variants:
        times = measure_raw(
            workload, work / "what-if.db", group, drop, multi_row=multi_row, checkpointer=checkpointer
        )
        out.append((label, workload.verdicts / sum(times)))
        _say(f"raw executemany {label}: {_fmt(out[-1][1])} rows/s")
    return out


_BLOB = 21  # index of verdict_pb in verdict_row()'s tuples


def measure_store_ingest(workload: Workload, db: Path) -> list[float]:
    """VerdictStore.ingest in-process (no gRPC) on already parsed verdicts; seconds per batch."""
    store = VerdictStore(db, "normal")
    times = []
    try:
        for agent_id, rows in workload.batches:
            verdicts = [verdict_pb2.Verdict.FromString(row[_BLOB]) for row in rows]
            t0 = time.perf_counter()
            store.ingest(agent_id, verdicts)
            times.append(time.perf_counter() - t0)
        count = store.count()
    finally:
        store.close()
    if count != workload.verdicts:
        raise RuntimeError(f"store.ingest stored {count} rows of {workload.verdicts}")
    return times


@dataclasses.dataclass
class Stages:
    """In-process cost of each step of the collector's ingest path, seconds per verdict."""

    verdicts: int
    group: int  # batches per VerdictStore.ingest_group call
    parse: float  # StreamVerdictsRequest.FromString of the bytes the agent sends
    validate: float  # services.validate_batch: checks, canonical addresses, the rows to store
    executemany: float  # reference: the raw baseline's executemany + commit of the same rows
    ingest: float  # VerdictStore.ingest_group: resend check, multi-row INSERTs, agents, rollups, commit
    match: float  # with a subscriber: its compiled filter per verdict (anomalous only)
    wrap: float  # with an every-verdict subscriber: messages of 1000 StoredVerdicts from the rows, serialised


def measure_stages(workload: Workload, work: Path, max_batches: int, group: int = 8) -> Stages:
    """The steps one after the other in this process, on the first ``max_batches`` batches; the
    store commits ``group`` batches at a time (as group commit does under load)."""
    from auris.agent.uplink import encode_batch
    from auris.collector.broker import compile_filter
    from auris.collector.services import subscription_message, validate_batch
    from auris.collector.store import IngestBatch
    from auris.v1 import agent_service_pb2, query_service_pb2

    sample = workload.batches[:max_batches]
    requests = [(agent_id, encode_batch(agent_id, [row[_BLOB] for row in rows])) for agent_id, rows in sample]
    raw_db, store_db = work / "stages-raw.db", work / "stages-store.db"
    _fresh_schema(raw_db)
    conn = _raw_connection(raw_db)
    store = VerdictStore(store_db, "normal")
    store.checkpoint_in_background()
    wanted = compile_filter(query_service_pb2.VerdictFilter(anomalous=True))
    last: dict[str, int] = {}
    t = dict.fromkeys(("parse", "validate", "executemany", "ingest", "match", "wrap"), 0.0)
    n = 0
    try:
        for first in range(0, len(requests), group):
            batches = []
            for agent_id, data in requests[first : first + group]:
                t0 = time.perf_counter()
                request = agent_service_pb2.StreamVerdictsRequest.FromString(data)
                t1 = time.perf_counter()
                received_ns = time.time_ns()
                last[agent_id], rows = validate_batch(request, last.get(agent_id, 0), received_ns)
                t2 = time.perf_counter()
                conn.execute("BEGIN")
                conn.executemany(_INSERT_SQL, rows)
                conn.execute("COMMIT")
                t3 = time.perf_counter()
                t["parse"] += t1 - t0
                t["validate"] += t2 - t1
                t["executemany"] += t3 - t2
                batches.append(IngestBatch(agent_id, request.verdicts, rows, received_ns))
                n += len(rows)
            t0 = time.perf_counter()
            results = store.ingest_group(batches)
            t1 = time.perf_counter()
            new = [
                (row_id, row)
                for result in results
                if not isinstance(result, Exception)
                for row_id, row in zip(result.stored_ids, result.rows, strict=True)
            ]
            t2 = time.perf_counter()
            for _, row in new:
                wanted(row)
            t3 = time.perf_counter()
            for i in range(0, len(new), 1000):
                subscription_message(new[i : i + 1000], batched=True).SerializeToString()
            t4 = time.perf_counter()
            t["ingest"] += t1 - t0
            t["match"] += t3 - t2
            t["wrap"] += t4 - t3
    finally:
        conn.close()
        store.close()
    return Stages(n, group, *(t[k] / n for k in t))


@dataclasses.dataclass
class AgentResult:
    agent_id: str
    verdicts: int
    anomalous: int
    accepted: int
    duplicates: int
    top: int
    tops: list[int]
    sent_at: list[float]
    acked_at: list[float]
    started: float
    ended: float
    cpu_s: float


@dataclasses.dataclass
class SubscriberResult:
    filter: str
    expected: int
    cpu_s: float  # the subscriber process's CPU while subscribed
    errors: list[str]
    arrivals: list[tuple[str, int, float, int, int]]
    # Seconds: batch acknowledged -> arrival, batch sent -> arrival, collector's received_time
    # -> arrival (wall clock).
    from_ack: list[float]
    from_send: list[float]
    from_stored: list[float]


@dataclasses.dataclass
class IngestRun:
    label: str
    agents: list[AgentResult]
    stored: int
    collector_cpu_s: float
    thread_cpu_s: dict[str, float]
    collector_peak_mb: float
    subscriber: SubscriberResult | None
    profile: Path | None

    @property
    def acked(self) -> int:
        return sum(a.accepted + a.duplicates for a in self.agents)

    @property
    def seconds(self) -> float:
        return max(a.ended for a in self.agents) - min(a.started for a in self.agents)

    @property
    def rate(self) -> float:
        return self.acked / self.seconds

    def ack_latencies(self) -> list[float]:
        return [ack - sent for a in self.agents for sent, ack in zip(a.sent_at, a.acked_at, strict=True)]


def run_ingest(
    args: argparse.Namespace,
    workload: Workload,
    work: Path,
    label: str,
    subscribe: str | None = None,
    py_spy: Path | None = None,
) -> IngestRun:
    """The real collector on a fresh database, N agent processes streaming the workload at once."""
    work.mkdir(parents=True)
    collector = Collector(work, work / "ingest.db")
    children: list[Child] = []
    subscriber: Child | None = None
    profiler: subprocess.Popen[bytes] | None = None
    profile_path = work / "py-spy.txt"
    try:
        if subscribe is not None:
            spec: dict[str, Any] = {
                "address": collector.address,
                "filter": subscribe,
                "max_batch": args.subscribe_batch,
                "out": str(work / "arrivals.json"),
            }
            subscriber = Child("--subscriber-child", spec, work / "subscriber.err")
            if subscriber.readline(120) != "ready":
                raise RuntimeError("subscriber did not start")
        for agent in range(workload.agents):
            spec = {
                "address": collector.address,
                "agent": agent,
                "seed": args.seed,
                "anomalous_fraction": args.anomalous_fraction,
                "count": workload.per_agent,
                "batch": workload.batch,
                "window": args.window,
                "start_ns": workload.start_ns,
                "step_ns": workload.step_ns,
            }
            children.append(Child("--agent-child", spec, work / f"agent-{agent}.err"))
        for child in children:
            if child.readline(args.run_timeout_s) != "ready":
                raise RuntimeError("an agent did not start")
        if py_spy is not None:
            profiler = subprocess.Popen(
                [str(py_spy), "record", "--pid", str(collector.proc.pid), "--rate", "200", "--nonblocking",
                 "--threads", "--format", "raw", "--output", str(profile_path)],
                stdout=subprocess.DEVNULL,
                stderr=(work / "py-spy.err").open("wb"),
            )  # fmt: skip
            time.sleep(2.0)
        cpu_before = _cpu_s(collector.proc.pid) or 0.0
        threads_before = _thread_cpu(collector.proc.pid)
        for child in children:
            child.send("go")
        results = [AgentResult(**json.loads(child.readline(args.run_timeout_s))) for child in children]
        cpu = (_cpu_s(collector.proc.pid) or 0.0) - cpu_before
        threads_after = _thread_cpu(collector.proc.pid)
        thread_cpu = {k: v - threads_before.get(k, 0.0) for k, v in threads_after.items()}
        for child in children:
            child.wait(30)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            try:
                profiler.wait(60)
            except subprocess.TimeoutExpired:
                profiler.kill()
                profiler.wait()
        sub_result = None
        if subscriber is not None and subscribe is not None:
            subscriber.send("stop")
            subscriber.readline(120)
            subscriber.wait(30)
            got = json.loads((work / "arrivals.json").read_text())
            expected = sum(a.anomalous for a in results) if subscribe == "anomalous" else workload.verdicts
            sub_result = _subscriber_result(subscribe, expected, got, results)
        peak = _peak_rss_mb(collector.proc.pid)
    finally:
        for child in children:
            child.kill()
        if subscriber is not None:
            subscriber.kill()
        if profiler is not None and profiler.poll() is None:
            profiler.kill()
            profiler.wait()
        collector.stop()
    with contextlib.closing(sqlite3.connect(str(work / "ingest.db"))) as conn:
        (stored,) = conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()
    run = IngestRun(
        label,
        results,
        stored,
        cpu,
        thread_cpu,
        peak,
        sub_result,
        profile_path if profiler is not None and profile_path.is_file() else None,
    )
    for name in ("ingest.db", "ingest.db-wal", "ingest.db-shm"):
        (work / name).unlink(missing_ok=True)
    if run.acked != workload.verdicts or stored != workload.verdicts:
        raise RuntimeError(
            f"{label}: {run.acked} verdicts acknowledged and {stored} stored, of {workload.verdicts} sent"
        )
    return run


def _subscriber_result(
    flt: str, expected: int, got: dict[str, Any], agents: Sequence[AgentResult]
) -> SubscriberResult:
    by_agent = {a.agent_id: a for a in agents}
    from_ack, from_send, from_stored = [], [], []
    arrivals = [tuple(a) for a in got["arrivals"]]
    for agent_id, sequence, mono, wall, received in arrivals:
        a = by_agent[agent_id]
        i = bisect.bisect_left(a.tops, sequence)
        from_ack.append(mono - a.acked_at[i])
        from_send.append(mono - a.sent_at[i])
        from_stored.append((wall - received) / 1e9)
    return SubscriberResult(
        flt,
        expected,
        float(got["cpu_s"]),
        list(got["errors"]),
        arrivals,
        from_ack,
        from_send,
        from_stored,
    )


_SCAFFOLDING = re.compile(
    r"^(Thread\.|_bootstrap|<module>|run |_run_once|run_forever|main |_worker|_serve |Handle\._run|"
    r"BaseEventLoop\.|Runner\.|_run |asyncio_run|_?WorkItem\.run)"
)


def summarise_py_spy(path: Path, top: int = 12) -> list[str]:
    """Lines on where the sampled Python threads spent their time (py-spy raw format)."""
    by_thread: dict[str, int] = {}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\): ?", "", frames[0])
        thread = re.sub(r"[_-]?\d+$", "", thread) or "?"
        by_thread[thread] = by_thread.get(thread, 0) + count
        total += count
        calls = frames[1:]
        if calls:
            leaf = _short_frame(calls[-1], with_line=True)
            own[leaf] = own.get(leaf, 0) + count
        for name in {_short_frame(f, with_line=False) for f in calls}:
            inclusive[name] = inclusive.get(name, 0) + count
    if not total:
        return ["py-spy recorded no samples"]

    def pct(n: int) -> str:
        return f"{100 * n / total:.1f} %"

    def ranked(counts: dict[str, int]) -> list[tuple[str, int]]:
        return sorted(counts.items(), key=lambda kv: -kv[1])

    busy = [(k, v) for k, v in ranked(inclusive) if not _SCAFFOLDING.match(k)][:top]
    return [
        f"{total:,} samples of running Python threads (py-spy leaves idle ones out), by thread: "
        + ", ".join(f"{k} {pct(v)}" for k, v in ranked(by_thread)),
        "own time (the line running; C code called from it, such as SQLite or protobuf, counts here): "
        + "; ".join(f"`{k}` {pct(v)}" for k, v in ranked(own)[:top]),
        "including callees: " + "; ".join(f"`{k}` {pct(v)}" for k, v in busy),
    ]


def _short_frame(frame: str, with_line: bool) -> str:
    """'func (path/to/file.py:12)' -> 'func (file.py:12)' or 'func (file.py)'."""
    match = re.match(r"^(.*) \((.*?):(\d+)\)$", frame)
    if not match:
        return frame
    name, file, line = match.groups()
    base = file.rsplit("/", 1)[-1]
    return f"{name} ({base}:{line})" if with_line else f"{name} ({base})"


# --------------------------------------------------------------------------------------------
# Queries on a large database
# --------------------------------------------------------------------------------------------

PAGE = 100  # the collector's default page size
HOUR_NS = 3_600_000_000_000


def query_db_path(args: argparse.Namespace, schema: int = SCHEMA_VERSION) -> Path:
    name = (
        f"verdicts-v{GEN_VERSION}-schema{schema}-r{args.query_rows}-a{args.query_agents}"
        f"-h{args.query_span_hours:g}-x{args.anomalous_fraction:g}-s{args.seed}.db"
    )
    return Path(args.cache_dir) / name


def migrate_cached_query_db(args: argparse.Namespace, path: Path) -> tuple[int, float] | None:
    """A copy of the newest older-schema database of the same verdicts in the cache, migrated by
    VerdictStore to ``path`` (far quicker than building it again): (its schema, seconds the
    migration took), or None when the cache holds none."""
    for schema in range(SCHEMA_VERSION - 1, 0, -1):
        older = query_db_path(args, schema)
        if older.is_file():
            tmp = path.with_name(path.name + ".part")
            _say(f"copying {older} to migrate it to schema {SCHEMA_VERSION}")
            shutil.copyfile(older, tmp)
            started = time.perf_counter()
            VerdictStore(tmp).close()
            seconds = time.perf_counter() - started
            tmp.replace(path)
            return schema, seconds
    return None


def build_query_db(path: Path, rows: int, agents: int, span_hours: float, fraction: float, seed: int) -> None:
    """``rows`` verdicts from ``agents`` agents over ``span_hours`` up to now, by raw executemany.

    Agents' shares are heavy-tailed; rows arrive in scored-time order, interleaved across agents,
    so ids grow with time as in a live collector. Rollups, the top-talker summary and the agents
    table are filled in too.
    """
    tmp = path.with_name(path.name + ".part")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    _fresh_schema(tmp)
    conn = _raw_connection(tmp)
    rng = random.Random(seed + 7)
    factories = [VerdictFactory(seed, a, fraction) for a in range(agents)]
    weights = [1.0 / (a + 1) ** 0.7 for a in range(agents)]
    rng.shuffle(weights)
    span_ns = int(span_hours * HOUR_NS)
    end_ns = time.time_ns() // 1_000_000_000 * 1_000_000_000
    start_ns = end_ns - span_ns
    sequences = [0] * agents
    chunk = 20_000
    last_report = time.monotonic()
    for first in range(0, rows, chunk):
        n = min(chunk, rows - first)
        slice_start = start_ns + span_ns * first // rows
        slice_ns = span_ns * n // rows
        counts: dict[int, int] = {}
        for a in rng.choices(range(agents), weights, k=n):
            counts[a] = counts.get(a, 0) + 1
        batch: list[Row] = []
        for a, k in sorted(counts.items()):
            step = max(slice_ns // k, 1)
            offset = slice_start + int(rng.random() * step)
            verdicts = factories[a].verdicts(sequences[a] + 1, k, offset, step)
            sequences[a] += k
            for i, v in enumerate(verdicts):
                batch.append(verdict_row(v, offset + i * step + int(rng.uniform(0.02, 2.0) * 1e9)))
        batch.sort(key=lambda row: row[11])  # scored_ns
        conn.execute("BEGIN")
        conn.executemany(_INSERT_SQL, batch)
        conn.execute("COMMIT")
        if time.monotonic() - last_report > 30:
            _say(f"query database: {first + n:,} of {rows:,} rows")
            last_report = time.monotonic()
    conn.execute("BEGIN")
    conn.execute(_ROLLUP_UPSERT.format(select=_ROLLUP_SELECT + " WHERE true"))
    talkers.backfill(conn, time.time_ns())
    conn.executemany(
        "INSERT INTO agents (agent_id, hostname, first_seen_ns, last_seen_ns, acknowledged_sequence,"
        " verdicts_stored) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (f.agent_id, f.hostname, start_ns, end_ns, sequences[a], sequences[a])
            for a, f in enumerate(factories)
            if sequences[a]
        ],
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    tmp.replace(path)
    Path(f"{tmp}-wal").unlink(missing_ok=True)
    Path(f"{tmp}-shm").unlink(missing_ok=True)


@dataclasses.dataclass
class QueryCall:
    rpc: str  # "query", "aggregate", "rollups", "talkers", "talkers_exact" or "anomalies"
    filter: query_service_pb2.VerdictFilter
    page2: bool = False
    metric: query_service_pb2.TalkerMetric.ValueType = query_service_pb2.TALKER_METRIC_BYTES


@dataclasses.dataclass
class QueryResult:
    name: str
    grpc_s: list[float]
    store_s: list[float]
    sql_s: list[float]
    items: list[int]
    plan: str
    note: str = ""
    # ListTopTalkers: how many timed answers said approximate.
    approximate: int = 0


def _grpc_call(client: CollectorClient, call: QueryCall, token: str) -> tuple[int, bool]:
    """(items returned, whether the answer said approximate)."""
    if call.rpc == "query":
        return len(client.query_page(call.filter, PAGE, token).verdicts), False
    if call.rpc in ("aggregate", "rollups"):
        rows = client.aggregate(
            call.filter, [query_service_pb2.GROUP_BY_LABEL], rollups=call.rpc == "rollups"
        )
        return len(rows), False
    if call.rpc == "anomalies":
        return len(client.top_anomalies(call.filter, 10)), False
    exact = call.rpc == "talkers_exact"
    answer = client.list_top_talkers(call.filter, call.metric, 10, exact=exact)
    return len(answer.talkers), answer.approximate


def _store_call(store: VerdictStore, call: QueryCall, token: str) -> int:
    if call.rpc == "query":
        return len(store.query(call.filter, PAGE, token).verdicts)
    if call.rpc == "aggregate":
        return len(store.aggregate(call.filter, [query_service_pb2.GROUP_BY_LABEL], 0))
    if call.rpc == "rollups":
        return len(store.aggregate_rollups(call.filter, [query_service_pb2.GROUP_BY_LABEL], 0))
    if call.rpc == "anomalies":
        return len(store.top_anomalies(call.filter, 10))
    exact = call.rpc == "talkers_exact"
    return len(store.top_talkers(call.filter, call.metric, 10, exact=exact).talkers)


def query_kinds(db: Path, seed: int) -> list[tuple[str, Callable[[int], QueryCall]]]:
    """The typical filters, each varying its parameter with the repetition number."""
    rng = random.Random(seed + 11)
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (newest_ns, max_id) = conn.execute("SELECT MAX(scored_ns), MAX(id) FROM verdicts").fetchone()
        agents = [row[0] for row in conn.execute("SELECT agent_id FROM agents ORDER BY agent_id")]
        # Addresses an analyst would look up: those of random stored flows (so, frequent ones
        # more often than rare ones).
        ips = [
            conn.execute("SELECT src_ip FROM verdicts WHERE id = ?", (rng.randint(1, max_id),)).fetchone()[0]
            for _ in range(64)
        ]
    rng.shuffle(agents)

    def last_hour(**fields: Any) -> query_service_pb2.VerdictFilter:
        flt = query_service_pb2.VerdictFilter(**fields)
        flt.time_range.start_time.FromNanoseconds(newest_ns - HOUR_NS)
        flt.time_range.end_time.FromNanoseconds(newest_ns + 1)
        return flt

    vf = query_service_pb2.VerdictFilter
    anomalies = query_service_pb2.TALKER_METRIC_ANOMALIES
    return [
        ("QueryVerdicts newest page, no filter", lambda i: QueryCall("query", vf())),
        ("QueryVerdicts by agent", lambda i: QueryCall("query", vf(agent_ids=[agents[i % len(agents)]]))),
        (
            "QueryVerdicts by agent, page 2 (cursor)",
            lambda i: QueryCall("query", vf(agent_ids=[agents[i % len(agents)]]), page2=True),
        ),
        ("QueryVerdicts by src_ip", lambda i: QueryCall("query", vf(src_ip=ips[i % len(ips)]))),
        ("QueryVerdicts last hour (scored time)", lambda i: QueryCall("query", last_hour())),
        ("QueryVerdicts anomalous only", lambda i: QueryCall("query", vf(anomalous=True))),
        (
            "QueryVerdicts by label (attack, anomaly)",
            lambda i: QueryCall("query", vf(labels=[("attack", "anomaly")[i % 2]])),
        ),
        (
            "QueryVerdicts score range (min 0.5-0.9)",
            lambda i: QueryCall("query", vf(min_score=(0.5, 0.6, 0.7, 0.8, 0.9)[i % 5], max_score=1.0)),
        ),
        ("AggregateVerdicts by label, last hour (raw rows)", lambda i: QueryCall("aggregate", last_hour())),
        ("AggregateVerdicts by label, last hour (rollups)", lambda i: QueryCall("rollups", last_hour())),
        ("ListTopAnomalies, all time, top 10", lambda i: QueryCall("anomalies", vf())),
        ("ListTopAnomalies, last hour, top 10", lambda i: QueryCall("anomalies", last_hour())),
        (
            "ListTopAnomalies, last hour, one agent, top 10",
            lambda i: QueryCall("anomalies", last_hour(agent_ids=[agents[i % len(agents)]])),
        ),
        ("ListTopTalkers by bytes, last hour, top 10", lambda i: QueryCall("talkers", last_hour())),
        (
            "ListTopTalkers by bytes, last hour, top 10, exact=true (raw rows, as before the summary)",
            lambda i: QueryCall("talkers_exact", last_hour()),
        ),
        # Filtered: answered from the summary's slices since schema 11, from the raw rows before.
        (
            "ListTopTalkers by bytes, last hour, one agent, top 10",
            lambda i: QueryCall("talkers", last_hour(agent_ids=[agents[i % len(agents)]])),
        ),
        (
            "ListTopTalkers by bytes, last hour, one agent, top 10, exact=true (raw rows)",
            lambda i: QueryCall("talkers_exact", last_hour(agent_ids=[agents[i % len(agents)]])),
        ),
        (
            "ListTopTalkers by anomalies, last hour, anomalous only, top 10",
            lambda i: QueryCall("talkers", last_hour(anomalous=True), metric=anomalies),
        ),
        (
            "ListTopTalkers by anomalies, last hour, anomalous only, top 10, exact=true (raw rows)",
            lambda i: QueryCall("talkers_exact", last_hour(anomalous=True), metric=anomalies),
        ),
        (
            "ListTopTalkers by bytes, last hour, label (attack, anomaly), top 10",
            lambda i: QueryCall("talkers", last_hour(labels=[("attack", "anomaly")[i % 2]])),
        ),
        (
            "ListTopTalkers by bytes, last hour, model (nfstream-rf, nfstream-ae), top 10",
            lambda i: QueryCall("talkers", last_hour(model_id=(_RF[0], _AE[0])[i % 2])),
        ),
        (
            "ListTopTalkers by bytes, last hour, one agent, anomalous only, top 10",
            lambda i: QueryCall("talkers", last_hour(agent_ids=[agents[i % len(agents)]], anomalous=True)),
        ),
    ]


def measure_queries(
    args: argparse.Namespace, db: Path, work: Path, budget_left: Callable[[], float]
) -> tuple[list[QueryResult], float]:
    """Each kind through the real collector over gRPC, in-process through VerdictStore, and as raw
    SQL (the statement the store ran, captured with sqlite3's trace callback); and the seconds
    the database file took to read once (to warm the page cache)."""
    started = time.perf_counter()
    with db.open("rb") as fh:
        while fh.read(16 << 20):
            pass
    warm_s = time.perf_counter() - started
    kinds = query_kinds(db, args.seed)
    # Read only: the collector below migrates the database if it needs to, not this process.
    store = VerdictStore(db, "normal", migrate=False)
    captured: list[str] = []
    store._reader().set_trace_callback(captured.append)
    raw = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    results: list[QueryResult] = []
    collector = Collector(work, db, "query-collector")
    try:
        with CollectorClient(collector.address, insecure=True, timeout_s=300) as client:
            for k, (name, make) in enumerate(kinds):
                kind_budget = min(args.query_kind_budget_s, max(2.0, budget_left() / (len(kinds) - k)))
                result = QueryResult(name, [], [], [], [], "")
                kind_started = time.perf_counter()
                i = 0
                while len(result.grpc_s) < args.query_repeats:
                    call = make(i)
                    token = client.query_page(call.filter, PAGE).next_page_token if call.page2 else ""
                    t0 = time.perf_counter()
                    items, approximate = _grpc_call(client, call, token)
                    t1 = time.perf_counter()
                    captured.clear()
                    _store_call(store, call, token)
                    t2 = time.perf_counter()
                    statements = [s for s in captured if s.lstrip().upper().startswith("SELECT")]
                    for sql in statements:
                        raw.execute(sql).fetchall()
                    t3 = time.perf_counter()
                    if not result.plan and statements:
                        result.plan = " / ".join(
                            "; ".join(str(row[3]) for row in raw.execute("EXPLAIN QUERY PLAN " + sql))
                            for sql in statements
                        )
                    i += 1
                    if i > args.query_warmup:
                        result.grpc_s.append(t1 - t0)
                        result.store_s.append(t2 - t1)
                        result.sql_s.append(t3 - t2)
                        result.items.append(items)
                        result.approximate += approximate
                    spent = time.perf_counter() - kind_started
                    if len(result.grpc_s) >= 3 and spent > kind_budget:
                        result.note = f"stopped after {len(result.grpc_s)} repetitions ({spent:.0f} s budget)"
                        break
                if call.rpc == "talkers":
                    answer = client.list_top_talkers(call.filter, call.metric, 10)
                    metric = "bytes" if call.metric == query_service_pb2.TALKER_METRIC_BYTES else "anomalies"
                    largest = max((getattr(t, f"{metric}_error") for t in answer.talkers), default=0)
                    summary = (
                        f"approximate, {metric} errors up to {largest:,}, omitted_max {answer.omitted_max:,}"
                        if answer.approximate
                        else "exact (approximate=false: every count exact, nothing left out ranks higher)"
                    )
                    share = f"{result.approximate} of {len(result.grpc_s)} timed answers approximate"
                    result.note = "; ".join(filter(None, [result.note, share, f"the last answer: {summary}"]))
                results.append(result)
                _say(
                    f"{name}: gRPC p50 {_ms(_percentile(result.grpc_s, 50))}, "
                    f"p99 {_ms(_percentile(result.grpc_s, 99))} (n={len(result.grpc_s)})"
                )
    finally:
        raw.close()
        store.close()
        collector.stop()
    return results, warm_s


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return _fmt(seconds * 1000, "ms")


def _p50_p99(values: Sequence[float]) -> str:
    return f"{_fmt(_percentile(values, 50) * 1000)} / {_ms(_percentile(values, 99))}"


@dataclasses.dataclass
class Report:
    args: argparse.Namespace
    workload_verdicts: int
    workload_anomalous: int
    per_agent: int
    verdict_bytes: float
    raw: list[list[float]]  # seconds per batch, per run
    e2e: list[IngestRun]
    store_ingest: list[float]
    stages: Stages
    what_ifs: list[tuple[str, float]]
    subscribed: list[IngestRun]
    profiled: IngestRun | None
    profile_lines: list[str]
    query_db: Path
    query_db_bytes: int
    query_db_built_s: float | None
    query_db_migrated: tuple[int, float] | None
    query_warm_s: float
    queries: list[QueryResult]
    load_before: str
    load_after: str
    load_samples: list[float]  # the 1-minute load average every 15 s during the run
    started: str
    elapsed_s: float
    notes: list[str]


def _raw_rate(times: Sequence[float], verdicts: int) -> float:
    return verdicts / sum(times)


def build_table(r: Report) -> list[list[str]]:
    n = r.workload_verdicts
    raw_rate = statistics.median(_raw_rate(t, n) for t in r.raw)
    e2e_rate = statistics.median(run.rate for run in r.e2e)
    agents = r.args.agents
    ratio = e2e_rate / raw_rate
    raw_batches = [x for t in r.raw for x in t]
    acks = [x for run in r.e2e for x in run.ack_latencies()]
    rows: list[list[str]] = [
        [
            f"Ingest verdicts/s: collector end-to-end over gRPC from {agents} agent processes, counted by "
            f"acknowledgements (median of {len(r.e2e)}) vs raw executemany of the same rows "
            f"(median of {len(r.raw)})",
            _fmt(raw_rate),
            _fmt(e2e_rate),
            f"{ratio:.2f}x",
            f">= 0.5x: {_verdict(ratio >= 0.5)}; >= 150k/s: {_verdict(e2e_rate >= 150_000)}",
        ],
        [
            f"  per batch of {r.args.batch}, p50 / p99: executemany + commit vs send to acknowledgement "
            f"(window {r.args.window} batches per agent)",
            _p50_p99(raw_batches),
            _p50_p99(acks),
            f"{_percentile(acks, 99) / _percentile(raw_batches, 99):.0f}x",
            "(information)",
        ],
    ]
    store_rate = n / sum(r.store_ingest)
    rows.append(
        [
            "  VerdictStore.ingest alone, in-process (no gRPC; verdicts already parsed), verdicts/s",
            _fmt(raw_rate),
            _fmt(store_rate),
            f"{store_rate / raw_rate:.2f}x",
            "(information)",
        ]
    )
    for run in r.subscribed:
        sub = run.subscriber
        assert sub is not None
        cut = (
            f" (cut off after {len(sub.arrivals):,} verdicts; no subscriber for the rest of the run)"
            if sub.errors
            else ""
        )
        rows.append(
            [
                f"  end-to-end verdicts/s while one subscriber takes {_filter_text(sub.filter)}{cut}",
                _fmt(raw_rate),
                _fmt(run.rate),
                f"{run.rate / raw_rate:.2f}x",
                "(information)",
            ]
        )
    for run in r.subscribed:
        sub = run.subscriber
        assert sub is not None
        complete = len(sub.arrivals) == sub.expected and not sub.errors
        p99 = _percentile(sub.from_ack, 99)
        got = f"{len(sub.arrivals):,} of {sub.expected:,} verdicts arrived" + (
            f"; {'; '.join(sub.errors)}" if sub.errors else ""
        )
        rows.append(
            [
                f"Subscription latency, {_filter_text(sub.filter)}, during full-rate ingest: batch "
                f"acknowledged to the agent -> verdict at the subscriber, p50 / p99 ({got})",
                "",
                _p50_p99(sub.from_ack),
                "",
                f"p99 <= 1 s: {_verdict(p99 <= 1.0 and complete)}",
            ]
        )
        rows.append(
            [
                "  same from the batch's send; from the collector's received_time (wall clock), p50 / p99",
                "",
                f"{_p50_p99(sub.from_send)}; {_p50_p99(sub.from_stored)}",
                "",
                "(information)",
            ]
        )
    for q in r.queries:
        p99 = _percentile(q.grpc_s, 99)
        base99 = _percentile(q.sql_s, 99)
        rows.append(
            [
                f"Query p50 / p99 on {r.args.query_rows:,} verdicts: {q.name} (n={len(q.grpc_s)})",
                _p50_p99(q.sql_s),
                _p50_p99(q.grpc_s),
                f"{p99 / base99:.2f}x" if base99 > 0 else "",
                f"p99 <= 50 ms: {_verdict(p99 <= 0.050)}",
            ]
        )
    return rows


def _filter_text(flt: str) -> str:
    return "anomalous verdicts only" if flt == "anomalous" else "every verdict"


def _cpu_line(run: IngestRun) -> str:
    per_k = 1000 / run.acked
    threads = sorted(run.thread_cpu_s.items(), key=lambda kv: -kv[1])
    return (
        f"{run.collector_cpu_s:.1f} s CPU in {run.seconds:.1f} s wall "
        f"({run.collector_cpu_s / run.seconds:.2f} cores; "
        f"{run.collector_cpu_s * per_k * 1000:.0f} µs per verdict): "
        + ", ".join(
            f"{name} {sec:.1f} s ({sec * per_k * 1000:.0f} µs/verdict)"
            for name, sec in threads
            if sec >= 0.05
        )
    )


def where_the_time_goes(r: Report) -> list[str]:
    s = r.stages
    us = 1e6
    e2e = statistics.median(run.rate for run in r.e2e)
    median_run = sorted(r.e2e, key=lambda run: run.rate)[len(r.e2e) // 2]
    cpu_per = median_run.collector_cpu_s / median_run.acked
    cores = median_run.collector_cpu_s / median_run.seconds
    in_process = s.parse + s.validate + s.ingest
    lines = [
        f"Ingest path step by step, in one process on {s.verdicts:,} verdicts of the same workload "
        "(µs per verdict, single thread):",
        "",
        "| step | µs/verdict | share of the in-process path |",
        "| --- | --- | --- |",
    ]
    steps = [
        ("parse StreamVerdictsRequest (protobuf, event-loop thread)", s.parse),
        (
            "services.validate_batch: checks, canonical addresses (cached), the stored rows with "
            "SerializeToString(deterministic) (event-loop thread)",
            s.validate,
        ),
        (
            f"VerdictStore.ingest_group, {s.group} batches a transaction: resend check, multi-row INSERTs, "
            "agents, rollups, commit (writer thread; WAL checkpoints on their own thread)",
            s.ingest,
        ),
    ]
    for name, cost in steps:
        lines.append(f"| {name} | {cost * us:.2f} | {100 * cost / in_process:.0f} % |")
    lines += [
        f"| **sum: the collector's work per verdict without gRPC** | **{in_process * us:.2f}** | 100 % |",
        f"| for reference: the raw baseline's executemany + commit of the same rows, a batch a "
        f"transaction | {s.executemany * us:.2f} | {100 * s.executemany / in_process:.0f} % |",
        f"| with a subscriber, extra: its compiled filter per verdict (anomalous only) | "
        f"{s.match * us:.2f} | +{100 * s.match / in_process:.0f} % |",
        f"| with an every-verdict subscriber, extra: messages of 1000 StoredVerdicts from the stored rows, "
        "serialised (as gRPC sends them) "
        f"| {s.wrap * us:.2f} | +{100 * s.wrap / in_process:.0f} % |",
        "",
        f"End to end ({_fmt(e2e)} verdicts/s) the collector spent {us / e2e:.1f} µs of wall time and "
        f"{cpu_per * us:.1f} µs of CPU ({cores:.2f} cores) per verdict (median run); the steps above, "
        f"run one after the other in one thread, account for {in_process * us:.1f} µs. The rest of the "
        "CPU is gRPC (HTTP/2, the aio server), asyncio, the hand-offs to the writer thread and WAL "
        "checkpoints. Only the SQLite work runs without the GIL, beside the event loop's Python.",
        "",
    ]
    lines += [
        f"- collector CPU, {run.label}: {_cpu_line(run)}; peak RSS {run.collector_peak_mb:.0f} MB"
        for run in r.e2e[:1]
    ]
    for run in r.subscribed:
        assert run.subscriber is not None
        lines.append(
            f"- collector CPU with a subscriber to {_filter_text(run.subscriber.filter)}: {_cpu_line(run)}; "
            f"the subscriber process used {run.subscriber.cpu_s:.1f} s CPU for "
            f"{len(run.subscriber.arrivals):,} verdicts"
        )
    raw_rate = statistics.median(_raw_rate(t, r.workload_verdicts) for t in r.raw)
    lines.append(
        f"- SQLite alone: the raw baseline ({_fmt(raw_rate)} rows/s, median) changed one way at a time, "
        "same rows, one run each: "
        + "; ".join(f"{label} {_fmt(rate)} rows/s ({rate / raw_rate:.2f}x)" for label, rate in r.what_ifs)
    )
    clients = [sum(a.cpu_s for a in run.agents) for run in r.e2e]
    lines.append(
        f"- the {r.args.agents} agent processes together used "
        + ", ".join(f"{c:.1f}" for c in clients)
        + " s CPU while streaming (per run), "
        + ", ".join(f"{c / run.seconds:.2f}" for c, run in zip(clients, r.e2e, strict=True))
        + " cores: the simulated clients are cheap next to the collector but do share the 2 cores"
    )
    if r.profiled is not None:
        lines.append(
            f"- py-spy ({r.profiled.rate:,.0f} verdicts/s in the profiled run; 200 Hz, non-blocking):"
        )
        lines += [f"  - {line}" for line in r.profile_lines]
    lines.append("- query plans (EXPLAIN QUERY PLAN of the statement the store ran, no ANALYZE statistics):")
    lines += [f"  - {q.name}: `{q.plan}`" for q in r.queries]
    return lines


def render(r: Report) -> str:
    header = ["what", "baseline (measured in the same run)", "ours", "ratio", "target"]
    table = [header, ["---"] * len(header), *build_table(r)]
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
    args = r.args
    raw_rates = [_raw_rate(t, r.workload_verdicts) for t in r.raw]
    params = [
        f"workload: {args.agents} simulated agents x {r.per_agent:,} verdicts = {r.workload_verdicts:,} "
        f"({r.workload_anomalous:,} anomalous, {100 * args.anomalous_fraction:g} %), seed {args.seed}; "
        "each verdict as the agent builds it: 5-tuple (client subnet per agent, heavy-tailed servers, "
        "25 % DNS to the agent's resolver), counters, millisecond flow times by end reason (96 % idle "
        "timeout: last packet 120-123 s before scoring; 3 % active timeout; 1 % evicted), scored time, "
        "the deciding model and two ModelScore entries (nfstream-rf@1 with class probabilities, "
        "nfstream-ae@1 with three top features), label, explanation, application; "
        f"{r.verdict_bytes:.0f} bytes serialised on average",
        "baseline: a fresh database with the collector's own schema and indexes (VerdictStore's "
        "migrations), then one sqlite3 connection, PRAGMA journal_mode=WAL, synchronous=NORMAL, and per "
        f"batch BEGIN; executemany(_INSERT_SQL, rows); COMMIT with the rows verdict_row() makes, batches of "
        f"{args.batch} in the order the collector receives them (agents round-robin); rows built beforehand, "
        "not timed; runs: " + ", ".join(_fmt(x) for x in raw_rates) + " rows/s. The collector does more "
        "than this loop: one transaction for the batches of several streams (group commit), multi-row "
        "INSERTs, WAL checkpoints on a thread of their own; the raw what-ifs below show what each is "
        "worth to SQLite alone",
        f"end to end: `auris-collector serve --insecure --listen 127.0.0.1:0 --db FRESH_TMP_DB` (plaintext "
        "gRPC on loopback, default settings: sqlite_synchronous normal, one writer thread committing "
        "groups of batches), and "
        f"{args.agents} agent processes (this script's hidden --agent-child mode) that pre-build and "
        "pre-serialise their verdicts with encode_batch, open the channel with the agent's open_channel, "
        f"then, all at one signal, stream batches of {args.batch} on one StreamVerdicts stream each with at "
        f"most {args.window} unacknowledged batches (the agent's uplink defaults). Rate = acknowledged "
        "verdicts / (last acknowledgement - first send); every run checks that all were acknowledged and "
        "stored. Runs: "
        + ", ".join(f"{run.rate:,.0f}/s in {run.seconds:.1f} s" for run in r.e2e)
        + " (raw and end-to-end runs alternated)",
        "subscription: a separate client process calls SubscribeVerdicts (filter: "
        + ", ".join(_filter_text(run.subscriber.filter) for run in r.subscribed if run.subscriber is not None)
        + ") before the agents start, while they stream the same workload into a fresh collector; the "
        "arrival of each verdict (monotonic clock, shared by the processes) is matched with its batch's "
        "acknowledgement in the agent process. The collector hands a group commit's verdicts to "
        "subscribers (matched in memory, no re-read) once the streams in it have acknowledged; the "
        f"subscriber asks for up to {args.subscribe_batch} verdicts a message (max_batch)",
        f"queries: a database of {args.query_rows:,} verdicts from {args.query_agents} agents (shares "
        f"heavy-tailed) over {args.query_span_hours:g} h, scored time increasing with id, "
        f"{100 * args.anomalous_fraction:g} % anomalous, rollups, top-talker summary and agents table "
        "filled, no ANALYZE: "
        f"{r.query_db} ({r.query_db_bytes / 1e9:.2f} GB), "
        + (
            f"built by raw executemany in {r.query_db_built_s:.0f} s"
            if r.query_db_built_s is not None
            else f"a copy of the cached schema-{r.query_db_migrated[0]} database, migrated by the "
            f"collector's VerdictStore in {r.query_db_migrated[1]:.0f} s"
            if r.query_db_migrated is not None
            else "reused from the cache"
        )
        + f"; read once before the queries ({r.query_warm_s:.1f} s) so that the page cache holds it. "
        "A fresh `auris-collector serve --insecure` on it; each query kind repeated "
        f"(up to {args.query_repeats} times after {args.query_warmup} untimed, for at most "
        f"{args.query_kind_budget_s:g} s a kind) with its parameter varying (agents in turn, source "
        f"addresses of random stored flows, labels, score bounds); page size {PAGE}; 'last hour' is the "
        "hour before the newest scored time. 'ours' = the call through CollectorClient over gRPC "
        "(the client aurisctl uses), timed in this process; baseline = the SQL statement(s) "
        "VerdictStore ran for the same call (captured with sqlite3's trace callback, values inlined), "
        "executed and fetched on a direct "
        "read-only sqlite3 connection in this process. One query at a time, no ingest running",
        "queries in-process through VerdictStore (SQL + building protobufs, no gRPC), p50 / p99 ms: "
        + "; ".join(f"{q.name} {_p50_p99(q.store_s)}" for q in r.queries),
        "query result sizes (rows or verdicts returned, median): "
        + "; ".join(f"{q.name} {statistics.median(q.items) if q.items else 0:g}" for q in r.queries),
    ]
    params += [f"{q.name}: {q.note}" for q in r.queries if q.note]
    machine = _machine()
    versions = _versions(
        ("auris", "grpcio", "protobuf", "sqlite-utils"), **{"SQLite library": sqlite3.sqlite_version}
    )
    out = [
        "# Collector benchmark",
        "",
        f"Run {r.started} by `bench/collector_bench.py`, {r.elapsed_s / 60:.1f} min in all.",
        "",
        *lines,
        "",
        "Machine: "
        + "; ".join(f"{k} {v}" for k, v in machine.items())
        + f"; load average {r.load_before} at the start, {r.load_after} at the end"
        + (
            f"; 1-minute load during the run (every 15 s, {len(r.load_samples)} samples): min "
            f"{min(r.load_samples):.2f}, median {statistics.median(r.load_samples):.2f}, max "
            f"{max(r.load_samples):.2f} (this benchmark alone keeps about 1-2 of the 2 cores busy)."
            if r.load_samples
            else "."
        ),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        "Parameters and method:",
        "",
        *[f"- {p}" for p in params],
        *[f"- {n}" for n in r.notes],
        "",
        "## Where the time goes",
        "",
        *where_the_time_goes(r),
        "",
    ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

_QUICK = {
    "agents": 4,
    "verdicts": 40_000,
    "runs": 1,
    "query_rows": 200_000,
    "query_agents": 20,
    "query_repeats": 20,
    "query_kind_budget_s": 2.0,
    "stage_batches": 40,
    "subscribers": "anomalous",
    "time_budget_s": 300.0,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=8, help="concurrent simulated agent processes (default 8)")
    p.add_argument(
        "--verdicts",
        type=int,
        default=1_000_000,
        help="verdicts sent per run, all agents (default 1,000,000)",
    )
    p.add_argument("--batch", type=int, default=256, help="verdicts per batch (the agent's uplink_batch)")
    p.add_argument("--window", type=int, default=8, help="unacknowledged batches per agent (uplink_window)")
    p.add_argument(
        "--runs",
        type=int,
        default=3,
        help="raw and end-to-end ingest runs each, alternated (median; default 3)",
    )
    p.add_argument("--anomalous-fraction", type=float, default=0.02, help="share of anomalous verdicts")
    p.add_argument(
        "--subscribers",
        default="anomalous,all",
        help="subscriber filters to measure, one ingest run each: anomalous, all (default anomalous,all)",
    )
    p.add_argument(
        "--subscribe-batch",
        type=int,
        default=1000,
        help="the subscriber's max_batch: verdicts per message (0: one each; default 1000)",
    )
    p.add_argument(
        "--query-rows", type=int, default=10_000_000, help="verdicts in the query database (default 10M)"
    )
    p.add_argument("--query-agents", type=int, default=50, help="agents in the query database (default 50)")
    p.add_argument(
        "--query-span-hours", type=float, default=24.0, help="time the query database spans (default 24)"
    )
    p.add_argument("--query-repeats", type=int, default=100, help="timed repetitions per query kind")
    p.add_argument("--query-warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    p.add_argument(
        "--query-kind-budget-s", type=float, default=40.0, help="stop repeating a query kind after this long"
    )
    p.add_argument(
        "--stage-batches", type=int, default=400, help="batches for the in-process step-by-step timing"
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        default=shutil.which("py-spy"),
        help="py-spy executable: profile the collector in one more ingest run (default: from PATH, if any)",
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=2400.0,
        help="skip optional runs and shorten query repetitions to finish near this (default 2400)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a sanity check in about a minute")
    add_figures_argument(p)
    p.add_argument("--seed", type=int, default=1, help="random seed of the generator")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "auris-bench",
        help="where query databases are kept between runs (default: $TMPDIR/auris-bench)",
    )
    p.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "collector.md", help="Markdown report"
    )
    p.add_argument("--run-timeout-s", type=float, default=900.0, help="give up on a child after this long")
    p.add_argument("--agent-child", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--subscriber-child", metavar="JSON", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.agent_child:
        agent_child(json.loads(args.agent_child))
        return 0
    if args.subscriber_child:
        subscriber_child(json.loads(args.subscriber_child))
        return 0
    if args.quick:
        for key, value in _QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    args.subscribers = [s for s in args.subscribers.split(",") if s]
    if (
        args.agents < 1
        or args.verdicts < args.agents * args.batch
        or args.batch < 1
        or args.window < 1
        or args.runs < 1
        or args.query_rows < 1000
        or args.query_agents < 1
        or not set(args.subscribers) <= {"anomalous", "all"}
    ):
        print(
            "collector_bench: need --agents >= 1, --verdicts >= agents x batch, --runs >= 1, "
            "--query-rows >= 1000, --subscribers from anomalous,all",
            file=sys.stderr,
        )
        return 2
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    started = time.perf_counter()
    load_before = _loadavg()
    _say(f"load average (1, 5, 15 min) at the start: {load_before}")
    load_samples: list[float] = []
    sampling = threading.Event()

    def sample_load() -> None:
        while not sampling.wait(15.0):
            with contextlib.suppress(OSError, ValueError):
                load_samples.append(float(Path("/proc/loadavg").read_text().split()[0]))

    threading.Thread(target=sample_load, name="load", daemon=True).start()
    notes: list[str] = []

    def budget_left() -> float:
        return float(args.time_budget_s) - (time.perf_counter() - started)

    with tempfile.TemporaryDirectory(prefix="auris-collector-bench-") as tmp:
        work = Path(tmp)
        _say(f"workload: {args.agents} agents x {args.verdicts // args.agents:,} verdicts")
        workload = build_workload(args, time.time_ns())
        raw: list[list[float]] = []
        e2e: list[IngestRun] = []
        for run_no in range(1, args.runs + 1):
            round_started = time.perf_counter()
            raw.append(measure_raw(workload, work / f"raw-{run_no}.db"))
            _say(f"raw executemany run {run_no}: {_fmt(_raw_rate(raw[-1], workload.verdicts))} rows/s")
            e2e.append(run_ingest(args, workload, work / f"e2e-{run_no}", f"run {run_no}"))
            _say(f"end-to-end run {run_no}: {_fmt(e2e[-1].rate)} verdicts/s in {e2e[-1].seconds:.1f} s")
            round_s = time.perf_counter() - round_started
            if run_no < args.runs and round_s * 3 > budget_left():
                notes.append(
                    f"only {run_no} of {args.runs} ingest rounds were run: one took {round_s:.0f} s and the "
                    f"{args.time_budget_s:.0f} s budget was short"
                )
                break
        store_times = measure_store_ingest(workload, work / "store.db")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{work / 'store.db'}{suffix}").unlink(missing_ok=True)
        _say(f"store.ingest in-process: {_fmt(workload.verdicts / sum(store_times))} verdicts/s")
        stages = measure_stages(workload, work, args.stage_batches)
        what_ifs = measure_raw_what_ifs(workload, work)
        subscribed: list[IngestRun] = []
        ingest_s = e2e[-1].seconds + 20
        for flt in args.subscribers:
            if budget_left() < ingest_s * 3 and flt != args.subscribers[0]:
                notes.append(f"the subscriber run with filter {flt!r} was skipped for the time budget")
                continue
            run = run_ingest(args, workload, work / f"subscribe-{flt}", f"subscriber {flt}", subscribe=flt)
            subscribed.append(run)
            assert run.subscriber is not None
            _say(
                f"subscriber ({flt}): {len(run.subscriber.arrivals):,} of {run.subscriber.expected:,} "
                f"arrived, p99 from ack {_ms(_percentile(run.subscriber.from_ack, 99))}; "
                f"ingest {_fmt(run.rate)}/s"
            )
        profiled = None
        profile_lines: list[str] = []
        if args.py_spy is not None and budget_left() > ingest_s * 3:
            profiled = run_ingest(args, workload, work / "profile", "py-spy", py_spy=args.py_spy)
            if profiled.profile is not None:
                profile_lines = summarise_py_spy(profiled.profile)
            else:
                notes.append(
                    "py-spy wrote no profile: " + (work / "profile" / "py-spy.err").read_text()[-500:]
                )
            _say(f"profiled run: {_fmt(profiled.rate)} verdicts/s")
        elif args.py_spy is None:
            notes.append("py-spy was not found (give --py-spy PATH): no sampled profile of the collector")
        else:
            notes.append("the py-spy run was skipped for the time budget")
        verdicts, anomalous, per_agent = workload.verdicts, workload.anomalous, workload.per_agent
        verdict_bytes = statistics.mean(len(row[_BLOB]) for _, rows in workload.batches[:50] for row in rows)
        del workload

        db = query_db_path(args)
        built_s = None
        migrated = None if db.is_file() else migrate_cached_query_db(args, db)
        if migrated is not None:
            _say(f"migrated from schema {migrated[0]} in {migrated[1]:.0f} s")
        if not db.is_file():
            _say(f"building the query database {db} ({args.query_rows:,} rows); cached for later runs")
            t0 = time.perf_counter()
            build_query_db(
                db,
                args.query_rows,
                args.query_agents,
                args.query_span_hours,
                args.anomalous_fraction,
                args.seed,
            )
            built_s = time.perf_counter() - t0
            _say(f"built in {built_s:.0f} s")
        queries, warm_s = measure_queries(args, db, work / "queries", budget_left)

    sampling.set()
    report = Report(
        args=args,
        workload_verdicts=verdicts,
        workload_anomalous=anomalous,
        per_agent=per_agent,
        verdict_bytes=verdict_bytes,
        raw=raw,
        e2e=e2e,
        store_ingest=store_times,
        stages=stages,
        what_ifs=what_ifs,
        subscribed=subscribed,
        profiled=profiled,
        profile_lines=profile_lines,
        query_db=db,
        query_db_bytes=db.stat().st_size,
        query_db_built_s=built_s,
        query_db_migrated=migrated,
        query_warm_s=warm_s,
        queries=queries,
        load_before=load_before,
        load_samples=load_samples,
        load_after=_loadavg(),
        started=started_at,
        elapsed_s=time.perf_counter() - started,
        notes=[
            *notes,
            "the machine is shared (2 vCPUs, other workloads running): absolute figures are noisy; "
            "ratios measured in the same run are the meaningful part",
        ],
    )
    text = render(report)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    write_figures(args.figures, "collector", build_table(report))
    _say(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
