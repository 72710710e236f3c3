"""Load test: many simulated agents streaming at once to one collector on loopback, over mTLS.

    .venv/bin/python bench/load_bench.py                       # 50 agents, 30 s paced + 30 s flat out
    .venv/bin/python bench/load_bench.py --duration-s 10 --phases flat   # a quick look

A real ``auris-collector serve`` (its own CA from ``init_pki``, both ports on TLS, default limits)
on a fresh database; each simulated agent has its own certificate signed by that CA and its own
channel (its own TLS connection), and streams as the agent's uplink does: one StreamVerdicts
stream, requests pre-serialised with ``encode_batch``, at most ``--window`` unacknowledged batches,
resending from the last acknowledgement after an error. Agents run as threads, ``--agents /
--processes`` to a child process. Phases: ``paced`` (each agent spools ``--rate`` verdicts a second
in scoring batches every 0.25 s, as a busy sensor does) and ``flat`` (each agent sends as fast as
its window lets it: the collector's ceiling with this many streams). Reported per phase: ack latency
(a batch's send to its acknowledgement) p50 / p90 / p99 / max, verdicts acknowledged per second,
errors by status, the collector's CPU, and whether every verdict was stored exactly once (checked
in the database afterwards). Benchmark output, not a test: nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import select
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchlib import (
    REPO,
    Collector,
    add_figures_argument,
    cpu_s,
    fmt,
    loadavg,
    machine,
    percentile,
    say,
    versions,
    write_figures,
)

AGENT_PREFIX = "load-agent-"
_TICK_S = 0.25  # how often a paced agent's scoring loop spools a batch


# --------------------------------------------------------------------------------------------
# The child: a process running some of the simulated agents as threads
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AgentRun:
    agent_id: str
    produced: int = 0
    acked: int = 0
    accepted: int = 0
    duplicates: int = 0
    batches: int = 0
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    first_send: float = 0.0
    last_ack: float = 0.0


class Encoder:
    """Verdicts of one agent, the same bytes for a sequence every time (a resend must match)."""

    def __init__(self, seed: int, index: int, agent_id: str, start_ns: int, step_ns: int) -> None:
        from collector_bench import VerdictFactory

        factory = VerdictFactory(seed, index, 0.02)
        self.templates = factory.verdicts(1, 1024, start_ns, step_ns)
        self.agent_id = agent_id
        self.step_ns = step_ns
        for v in self.templates:
            v.agent_id = agent_id

    def encode(self, first: int, last: int) -> bytes:
        from auris.agent.uplink import encode_batch

        blobs = []
        for sequence in range(first, last + 1):
            v = self.templates[(sequence - 1) % len(self.templates)]
            shift_ns = (sequence - v.sequence) * self.step_ns
            v.sequence = sequence
            for ts in (v.scored_time, v.first_seen_time, v.last_seen_time):
                ts.FromNanoseconds(ts.ToNanoseconds() + shift_ns)
            blobs.append(v.SerializeToString())
        return encode_batch(self.agent_id, blobs)


def _stream_agent(channel: Any, encoder: Encoder, run: AgentRun, spec: dict[str, Any], go: float) -> None:
    """Produce for ``duration_s`` from ``go``, stream until everything produced is acknowledged."""
    import grpc

    from auris.v1 import agent_service_pb2

    service = agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
    stream = channel.stream_stream(
        f"/{service}/StreamVerdicts",
        request_serializer=None,
        response_deserializer=agent_service_pb2.StreamVerdictsResponse.FromString,
    )
    stop_at = go + spec["duration_s"]
    give_up = stop_at + spec["drain_s"]
    rate, batch = spec["rate"], spec["batch"]

    def produced(now: float) -> int:
        """Verdicts spooled by ``now``: paced, in ticks; flat out, whatever the window takes."""
        if rate <= 0:
            return 2**62 if now < stop_at else run.produced
        ticks = int((min(now, stop_at) - go) / _TICK_S)
        return int(ticks * _TICK_S * rate)

    while run.acked < produced(time.monotonic()) or time.monotonic() < stop_at:
        if time.monotonic() > give_up:
            run.errors["GAVE_UP"] = run.errors.get("GAVE_UP", 0) + 1
            return
        window = threading.Semaphore(spec["window"])
        dead = threading.Event()
        sent_at: dict[int, float] = {}

        def requests(
            window: threading.Semaphore = window,
            dead: threading.Event = dead,
            sent_at: dict[int, float] = sent_at,
        ) -> Iterator[bytes]:
            sent = run.acked  # resend everything not acknowledged
            while not dead.is_set():
                now = time.monotonic()
                ready = produced(now)
                if now >= stop_at and sent >= ready:
                    run.produced = max(run.produced, sent)
                    return  # half-close; the acknowledgements still come
                if sent >= ready:
                    time.sleep(min(_TICK_S / 5, max(0.0, stop_at - now)))
                    continue
                if not window.acquire(timeout=0.2):
                    continue
                top = min(ready, sent + batch)
                data = encoder.encode(sent + 1, top)
                sent_at[top] = time.monotonic()
                run.first_send = run.first_send or sent_at[top]
                run.produced = max(run.produced, top)
                sent = top
                yield data

        try:
            for response in stream(requests(), timeout=spec["duration_s"] + spec["drain_s"]):
                now = time.monotonic()
                top = response.acknowledged_sequence
                if top in sent_at:
                    run.latencies_ms.append((now - sent_at.pop(top)) * 1000)
                run.acked = max(run.acked, top)
                run.accepted += response.accepted
                run.duplicates += response.duplicates
                run.batches += 1
                run.last_ack = now
                window.release()
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            run.errors[code.name] = run.errors.get(code.name, 0) + 1
            time.sleep(0.5)  # the uplink's first backoff
        finally:
            dead.set()


def agents_child(spec: dict[str, Any]) -> None:
    """Hidden mode: connect this child's agents, say "ready", wait for "go", stream, print JSON."""
    import grpc

    from auris.agent.uplink import open_channel

    runs, encoders, channels = [], [], []
    for agent in spec["agents"]:
        runs.append(AgentRun(agent["id"]))
        encoders.append(Encoder(spec["seed"], agent["index"], agent["id"], spec["start_ns"], spec["step_ns"]))
        channel = open_channel(
            spec["address"],
            insecure=spec["insecure"],
            ca_file=spec["ca_file"],
            cert_file=agent["cert"],
            key_file=agent["key"],
        )
        grpc.channel_ready_future(channel).result(timeout=60)
        channels.append(channel)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    go = time.monotonic()
    cpu_before = time.process_time()
    threads = [
        threading.Thread(target=_stream_agent, args=(channel, encoder, run, spec, go), daemon=True)
        for channel, encoder, run in zip(channels, encoders, runs, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for channel in channels:
        channel.close()
    cpu = time.process_time() - cpu_before
    print(json.dumps({"go": go, "cpu_s": cpu, "agents": [dataclasses.asdict(r) for r in runs]}), flush=True)


# --------------------------------------------------------------------------------------------
# The parent: a CA, the collector, the children, the report
# --------------------------------------------------------------------------------------------


def make_certificates(pki: Path, count: int) -> tuple[Path, list[dict[str, Any]]]:
    """The collector's CA and serving certificate, and one client certificate per agent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from auris.collector.pki import init_pki, load_ca, sign_agent_csr

    paths = init_pki(pki, ["127.0.0.1"])
    ca, ca_key = load_ca(paths.ca_cert, paths.ca_key)
    agents = []
    for index in range(count):
        agent_id = f"{AGENT_PREFIX}{index:03d}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, agent_id)]))
            .sign(key, hashes.SHA256())
        )
        cert, _ = sign_agent_csr(ca, ca_key, csr.public_bytes(serialization.Encoding.PEM), agent_id, 1)
        key_path, cert_path = pki / f"{agent_id}.key", pki / f"{agent_id}.pem"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        cert_path.write_bytes(cert)
        agents.append({"id": agent_id, "index": index, "key": str(key_path), "cert": str(cert_path)})
    return pki, agents


def start_collector(work: Path, pki: Path, insecure: bool) -> Collector:
    """A collector on a fresh database: mTLS on loopback (an API port for the checks), or plaintext."""
    config = work / "collector.toml"
    lines = ['api_listen = ""'] if insecure else [
        'api_listen = "127.0.0.1:0"',
        f'ca_file = "{pki / "ca.pem"}"',
        f'cert_file = "{pki / "collector.pem"}"',
        f'key_file = "{pki / "collector.key"}"',
    ]  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    config.write_text("\n".join(lines) + "\n")
    return Collector(work, work / "auris.db", config=config, insecure=insecure)


class Child:
    def __init__(self, spec: dict[str, Any], stderr: Path) -> None:
        self._stderr_path = stderr
        self._stderr = stderr.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--agents-child", json.dumps(spec)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )

    def readline(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            self.kill()
            raise RuntimeError(f"agents child said nothing: {self._stderr_path.read_text()[-2000:]}")
        return line.strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._stderr.close()


@dataclasses.dataclass
class Phase:
    name: str
    rate: float
    agents: list[AgentRun]
    go: float
    seconds: float
    collector_cpu_s: float
    collector_rss_mb: float
    agents_cpu_s: float
    stored: dict[str, tuple[int, int, int]]  # agent -> (rows, distinct sequences, max sequence)

    @property
    def acked(self) -> int:
        return sum(a.acked for a in self.agents)

    @property
    def latencies(self) -> list[float]:
        return [x for a in self.agents for x in a.latencies_ms]

    @property
    def errors(self) -> dict[str, int]:
        out: collections.Counter[str] = collections.Counter()
        for a in self.agents:
            out.update(a.errors)
        return dict(out)

    @property
    def exactly_once(self) -> bool:
        return all(self.stored.get(a.agent_id, (0, 0, 0)) == (a.acked, a.acked, a.acked) for a in self.agents)


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_phase(
    name: str, rate: float, args: argparse.Namespace, pki: Path, agents: list[dict[str, Any]], work: Path
) -> Phase:
    phase_dir = work / name
    phase_dir.mkdir()
    collector = start_collector(phase_dir, pki, args.insecure)
    children: list[Child] = []
    try:
        step_ns = int(1e9 / rate) if rate > 0 else 1_000_000
        per_child = -(-len(agents) // args.processes)
        for k in range(0, len(agents), per_child):
            spec = {
                "address": collector.address,
                "insecure": args.insecure,
                "ca_file": str(pki / "ca.pem"),
                "agents": agents[k : k + per_child],
                "duration_s": args.duration_s,
                "drain_s": args.drain_s,
                "rate": rate,
                "batch": args.batch,
                "window": args.window,
                "seed": args.seed,
                "start_ns": time.time_ns(),
                "step_ns": step_ns,
            }
            children.append(Child(spec, phase_dir / f"child-{k}.err"))
        for child in children:
            if child.readline(180) != "ready":
                raise RuntimeError("an agents child did not get ready")
        cpu_before = cpu_s(collector.proc.pid) or 0.0
        say(f"{name}: {len(agents)} agents streaming for {args.duration_s:g} s")
        for child in children:
            child.send("go")
        results = [json.loads(child.readline(args.duration_s + args.drain_s + 120)) for child in children]
        cpu_after = cpu_s(collector.proc.pid) or 0.0
        rss = _rss_mb(collector.proc.pid)
    finally:
        for child in children:
            child.kill()
        collector.stop()
    runs = [AgentRun(**a) for r in results for a in r["agents"]]
    go = min(r["go"] for r in results)
    last = max((a.last_ack for a in runs), default=go)
    with contextlib.closing(sqlite3.connect(collector.db)) as db:
        stored = {
            agent: (rows, distinct, top)
            for agent, rows, distinct, top in db.execute(
                "SELECT agent_id, COUNT(*), COUNT(DISTINCT sequence), MAX(sequence) FROM verdicts"
                " GROUP BY agent_id"
            )
        }
    agents_cpu = sum(r["cpu_s"] for r in results)
    return Phase(name, rate, runs, go, last - go, cpu_after - cpu_before, rss, agents_cpu, stored)


def _ms(values: Sequence[float], q: float) -> str:
    return fmt(percentile(values, q), "ms")


def render(phases: list[Phase], args: argparse.Namespace, started: str, load_start: str) -> str:
    header = ["phase", "verdicts acked", "verdicts/s", "batches", "ack p50", "ack p90", "ack p99", "ack max",
              "errors", "stored exactly once", "collector CPU", "agents' CPU"]  # fmt: skip
    rows = [header, ["---"] * len(header)]
    for p in phases:
        lat = p.latencies
        errors = ", ".join(f"{k} {v}" for k, v in sorted(p.errors.items())) or "none"
        what = f"paced, {p.rate:g} verdicts/s per agent" if p.rate > 0 else "flat out"
        rows.append([
            f"{what} ({len(p.agents)} agents, {args.duration_s:g} s)", f"{p.acked:,}",
            fmt(p.acked / p.seconds if p.seconds > 0 else float("nan")), f"{len(lat):,}",
            _ms(lat, 50), _ms(lat, 90), _ms(lat, 99), fmt(max(lat, default=float("nan")), "ms"), errors,
            "yes" if p.exactly_once else "**NO**",
            f"{p.collector_cpu_s / p.seconds:.2f} cores" if p.seconds > 0 else "n/a",
            f"{p.agents_cpu_s / p.seconds:.2f} cores" if p.seconds > 0 else "n/a",
        ])  # fmt: skip
    table = "\n".join("| " + " | ".join(row) + " |" for row in rows)
    m = machine()
    v = versions(["grpcio", "protobuf"])
    transport = "plaintext (--insecure)" if args.insecure else "mTLS (a client certificate per agent)"
    in_flight = args.agents * args.window * args.batch
    flat = [p for p in phases if p.rate <= 0 and p.seconds > 0]
    queue = (
        f" Flat out, {args.agents} agents x window {args.window} x {args.batch} = {in_flight:,} verdicts are"
        f" in flight at once: at {fmt(flat[0].acked / flat[0].seconds)} verdicts/s that is"
        f" {in_flight / (flat[0].acked / flat[0].seconds):.1f} s of queue (Little's law), which is the"
        " latency measured there: the window, not the collector's work per batch, sets it."
        if flat and flat[0].acked
        else ""
    )
    per_agent = ", ".join(
        f"{p.name}: acked per agent min {min(a.acked for a in p.agents):,} / max "
        f"{max(a.acked for a in p.agents):,}; collector peak RSS {fmt(p.collector_rss_mb, 'MB')}"
        for p in phases
    )
    return f"""# Load test: {args.agents} agents against one collector

Run {started} by `bench/load_bench.py` ({" ".join(sys.argv[1:]) or "defaults"}).

{table}

- ack latency: from the moment a batch is handed to gRPC to its acknowledgement (the collector
  acknowledges once the group commit holding it is durable), over every batch of every agent;
  verdicts/s: acknowledged verdicts / (last acknowledgement - start); batches: acknowledged batches.{queue}
- setup: `auris-collector serve` on 127.0.0.1 (fresh SQLite database per phase, default settings:
  sqlite_synchronous normal, rate limits at their defaults), {transport}; {args.agents} simulated
  agents in {args.processes} processes, each agent its own channel and stream, batches of at most
  {args.batch}, window {args.window} (the uplink's defaults), verdicts as `collector_bench.py`'s
  VerdictFactory builds them (realistic 5-tuples, counters, two model scores, ~430 bytes).
  Paced: each agent spools {args.rate:g} verdicts/s in batches every {_TICK_S} s; flat out: each
  sends as fast as its window lets it. After {args.duration_s:g} s the agents stop producing and wait
  for their last acknowledgements; errors are counted and the stream resent from the last
  acknowledgement, as the agent's uplink does.
- stored exactly once: after the phase, each agent's rows in the database = its acknowledged
  sequence, with no duplicate or missing sequence.
- {per_agent}.
- machine: {m["cores"]}; {m["CPU"]}; {m["memory"]}; kernel {m["kernel"]}; load average {load_start} at
  the start, {loadavg()} at the end (the machine is shared with other work: absolute figures are noisy;
  the agents' processes share the same cores as the collector: their CPU is in the table).
- versions: python {v["python"]}, grpcio {v["grpcio"]}, protobuf {v["protobuf"]}, git {v["git"]}.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=50, help="simulated agents (default 50)")
    p.add_argument("--processes", type=int, default=5, help="child processes the agents run in (default 5)")
    p.add_argument("--duration-s", type=float, default=30.0, help="seconds each phase streams (default 30)")
    p.add_argument("--drain-s", type=float, default=60.0, help="at most this long for the last acks")
    p.add_argument("--phases", default="paced,flat", help="paced, flat or both (default paced,flat)")
    p.add_argument("--rate", type=float, default=200.0, help="paced: verdicts/s per agent (default 200)")
    p.add_argument("--batch", type=int, default=256, help="verdicts per batch at most (uplink_batch)")
    p.add_argument("--window", type=int, default=8, help="unacknowledged batches per agent (uplink_window)")
    p.add_argument("--insecure", action="store_true", help="plaintext instead of mTLS")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.md")
    add_figures_argument(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--agents-child"]:
        agents_child(json.loads(argv[1]))
        return 0
    args = _parser().parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or any(p not in ("paced", "flat") for p in phases):
        print("--phases: paced, flat or both", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = loadavg()
    work = Path(tempfile.mkdtemp(prefix="auris-load-"))
    try:
        say(f"certificates for {args.agents} agents")
        pki, agents = make_certificates(work / "pki", args.agents)
        results = [
            run_phase(name, args.rate if name == "paced" else 0.0, args, pki, agents, work) for name in phases
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = render(results, args, started, load_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    write_figures(args.figures, "load", figures(results, args))
    print(report)
    return 0


def figures(phases: list[Phase], args: argparse.Namespace) -> list[list[str]]:
    """Summary rows for bench/run.py: rate, ack latency, errors and exactly-once, per phase."""
    rows = []
    for p in phases:
        what = f"{len(p.agents)} agents over {'plaintext' if args.insecure else 'mTLS'}, " + (
            f"paced at {p.rate:g} verdicts/s each" if p.rate > 0 else "flat out"
        )
        rate = fmt(p.acked / p.seconds if p.seconds > 0 else float("nan"), "verdicts/s")
        errors = ", ".join(f"{k} {v}" for k, v in sorted(p.errors.items())) or "no errors"
        once = "every verdict stored once" if p.exactly_once else "**NOT stored exactly once**"
        rows.append([f"{what}: acknowledged", "", rate, "", "(information)"])
        rows.append([f"{what}: ack p50 / p99", "", f"{_ms(p.latencies, 50)} / {_ms(p.latencies, 99)}", "",
                     "(information)"])  # fmt: skip
        rows.append([f"{what}: errors; storage", "", f"{errors}; {once}", "", "(information)"])
    return rows


if __name__ == "__main__":
    sys.exit(main())
