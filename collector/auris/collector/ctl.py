"""``aurisctl``: query and administer an Auris collector.

Exit codes: 0 ok, 1 the collector answered with an error, 2 bad usage or
configuration, 3 the collector is unreachable.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import datetime as dt
import getpass
import json
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from auris.agent import __version__
from auris.agent.config import ConfigError, build_config
from auris.collector.client import EXPORT_COLUMNS, CollectorClient, flat_verdict, verdict_filter
from auris.v1 import admin_service_pb2, feed_service_pb2, model_pb2, query_service_pb2, verdict_pb2

if TYPE_CHECKING:
    from auris.collector.feed_files import FileFormat

__all__ = ["main", "parse_since"]

EXIT_OK, EXIT_RPC, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# The collector's API port on this host (its default api_listen).
DEFAULT_API = "127.0.0.1:50052"
# The feed models shipped in a source checkout (an installed package names its own with --models).
SHIPPED_FEED_MODELS = Path(__file__).resolve().parents[3] / "models" / "feeds"

_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclasses.dataclass(frozen=True)
class CtlConfig:
    """Connection settings for ``aurisctl`` (TOML file, AURIS_CTL_* environment, flags)."""

    # The collector's API port (TLS; API tokens).
    collector: str = DEFAULT_API
    insecure: bool = False
    # The collector's CA certificate, to check the collector's TLS certificate.
    ca_file: str = ""
    # An API token (better set as AURIS_CTL_TOKEN than written in a file).
    token: str = ""
    # A client certificate and key, for collectors that want one (optional).
    cert_file: str = ""
    key_file: str = ""
    timeout_s: float = 30.0


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """``1h``, ``30m``, ``2d``... before now, or an ISO-8601 time (UTC when no zone is given)."""
    now = now or dt.datetime.now(dt.UTC)
    match = _DURATION.match(text.strip())
    try:
        if match:
            when = now - dt.timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
        else:
            when = dt.datetime.fromisoformat(text)
            when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
            when.astimezone(dt.UTC)  # raises for times that do not exist in UTC (year 0, 10000)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30s, 15m, 1h, 7d) nor an ISO-8601 time"
        ) from None
    except OverflowError:
        raise argparse.ArgumentTypeError(f"{text!r} is too far from now") from None
    if when.astimezone(dt.UTC).year < 1970:
        raise argparse.ArgumentTypeError(f"{text!r} is before 1970")
    return when


_GROUPS = {
    "agent": query_service_pb2.GROUP_BY_AGENT,
    "label": query_service_pb2.GROUP_BY_LABEL,
    "model": query_service_pb2.GROUP_BY_MODEL,
    "anomalous": query_service_pb2.GROUP_BY_ANOMALOUS,
}
_ALERT_STATES = {
    "open": admin_service_pb2.ALERT_STATE_OPEN,
    "acknowledged": admin_service_pb2.ALERT_STATE_ACKNOWLEDGED,
    "resolved": admin_service_pb2.ALERT_STATE_RESOLVED,
}
_ROLES = {
    "reader": admin_service_pb2.ROLE_READER,
    "analyst": admin_service_pb2.ROLE_ANALYST,
    "admin": admin_service_pb2.ROLE_ADMIN,
    "feed": admin_service_pb2.ROLE_FEED,
}
_DOMAINS = {
    "network": model_pb2.MODEL_DOMAIN_NETWORK_FLOW,
    "transaction": model_pb2.MODEL_DOMAIN_TRANSACTION,
    "tick": model_pb2.MODEL_DOMAIN_TICK,
}
_METRICS = {
    "bytes": query_service_pb2.TALKER_METRIC_BYTES,
    "flows": query_service_pb2.TALKER_METRIC_FLOWS,
    "anomalies": query_service_pb2.TALKER_METRIC_ANOMALIES,
}


def _duration(text: str) -> dt.timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (30s, 5m, 1h, 1d)")
    return dt.timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _add_filter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=parse_since, help="only verdicts after this (1h, 30m, ISO time)")
    p.add_argument("--until", type=parse_since, help="only verdicts before this")
    p.add_argument(
        "--flow-time",
        action="store_true",
        help="apply --since/--until to when flows were last seen, not when they were scored (pcap replays)",
    )
    p.add_argument("--anomalous", action="store_true", help="only anomalous verdicts")
    p.add_argument("--agent", action="append", default=[], help="only this agent id (repeatable)")
    p.add_argument("--label", action="append", default=[], help="only this label (repeatable)")
    p.add_argument("--ip", default="", help="only flows with this address at either end")
    p.add_argument("--model", default="", help="only verdicts decided by this model id")
    p.add_argument("--min-score", type=float, help="only verdicts whose deciding score is at least this")


def _filter(args: argparse.Namespace) -> query_service_pb2.VerdictFilter:
    return verdict_filter(
        since=args.since,
        until=args.until,
        time_field=query_service_pb2.TIME_FIELD_FLOW
        if args.flow_time
        else query_service_pb2.TIME_FIELD_SCORED,
        anomalous=True if args.anomalous else None,
        agent_ids=args.agent,
        labels=args.label,
        ip=args.ip,
        model_id=args.model,
        min_score=args.min_score,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aurisctl",
        description="Query and administer an Auris collector.",
        epilog="Exit codes: 0 ok, 1 collector error, 2 usage or configuration, 3 collector unreachable.",
    )
    p.add_argument("--version", action="version", version=f"aurisctl {__version__}")
    p.add_argument(
        "--config", metavar="FILE", help="TOML file with collector, insecure, ca_file, cert_file, key_file"
    )
    p.add_argument(
        "--collector", metavar="HOST:PORT", help=f"the collector's API address (default {DEFAULT_API})"
    )
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="plaintext gRPC to a loopback collector (development)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    verdicts = sub.add_parser("verdicts", help="list stored verdicts (newest first)")
    verdicts.add_argument(
        "verb",
        nargs="?",
        choices=["query", "tail", "top", "label", "explain", "export"],
        default="query",
        help="query (default): stored verdicts, newest first; tail: new verdicts as they arrive; "
        "top: the anomalous verdicts furthest above their model's threshold; "
        "label ID...: attach an analyst label (--as); explain ID: which features made a tree "
        "classifier's score (--model); export: write them to --out",
    )
    verdicts.add_argument("ids", nargs="*", type=int, metavar="ID", help="verdict ids (label, explain)")
    verdicts.add_argument(
        "--as", dest="label_as", metavar="LABEL", help="label: benign, unsure, or an attack class"
    )
    verdicts.add_argument("--note", default="", help="label: a note kept with the label")
    verdicts.add_argument("--out", type=Path, help="export: file to write (.jsonl, .csv or .parquet)")
    _add_filter_options(verdicts)
    verdicts.add_argument(
        "--limit",
        type=int,
        help="at most this many (0: all; default 100 when listing, 10 for top, all when exporting)",
    )
    verdicts.add_argument("--json", action="store_true", help="one JSON object per line")
    verdicts.add_argument(
        "--format",
        choices=["ecs"],
        help="ecs: one Elastic Common Schema record per line, as the collector's SIEM sinks write "
        "them (docs/siem.md); export --format ecs writes them to --out FILE or to stdout (-)",
    )

    stats = sub.add_parser("stats", help="verdict counts per group and time bucket")
    _add_filter_options(stats)
    stats.add_argument(
        "--by", action="append", choices=sorted(_GROUPS), default=[], help="group by this (repeatable)"
    )
    stats.add_argument(
        "--bucket", type=_duration, help="time bucket width (30s, 5m, 1h); default: one bucket"
    )
    stats.add_argument(
        "--rollups",
        action="store_true",
        help="read the per-minute rollups (they outlive raw-verdict retention; agent/label/model only)",
    )
    stats.add_argument("--json", action="store_true", help="one JSON object per line")

    talkers = sub.add_parser("talkers", help="top talkers: addresses by bytes, flows or anomalies")
    _add_filter_options(talkers)
    talkers.add_argument("--by", choices=sorted(_METRICS), default="bytes", help="ranking (default bytes)")
    talkers.add_argument("--limit", type=int, default=10, help="how many (default 10)")
    talkers.add_argument(
        "--exact", action="store_true", help="count from the raw verdicts, not the summary (slow over hours)"
    )
    talkers.add_argument("--json", action="store_true", help="one JSON object per line")

    sub.add_parser("services", help="list the collector's gRPC services (server reflection) and health")

    agents = sub.add_parser("agents", help="the agent registry, from heartbeats")
    verbs = agents.add_subparsers(dest="verb", metavar="VERB")
    listed = verbs.add_parser("list", help="every agent with its state and counters")
    listed.add_argument("--json", action="store_true", help="one JSON object per line")
    shown = verbs.add_parser("show", help="one agent in full")
    shown.add_argument("agent_id")
    shown.add_argument("--json", action="store_true", help="JSON output")
    revoked = verbs.add_parser("revoke", help="refuse this agent's certificate from now on")
    revoked.add_argument("agent_id")
    revoked.add_argument("--reason", default="", help="kept in the registry and the audit log")

    enroll = sub.add_parser("enroll", help="enrollment tokens for new agents")
    verbs = enroll.add_subparsers(dest="verb", metavar="VERB")
    created = verbs.add_parser("create", help="a one-time token an agent exchanges for its certificate")
    created.add_argument(
        "--ttl", type=_duration, default=dt.timedelta(hours=1), help="valid for (default 1h)"
    )
    created.add_argument("--note", default="", help="what it is for (kept with the token)")

    tokens = sub.add_parser("tokens", help="API tokens for aurisctl and other gRPC clients")
    verbs = tokens.add_subparsers(dest="verb", metavar="VERB")
    created = verbs.add_parser("create", help="a new token with a role; shown once")
    created.add_argument("--name", required=True, help="who or what uses it")
    created.add_argument("--role", required=True, choices=sorted(_ROLES))
    created.add_argument("--ttl", type=_duration, help="valid for (default: until revoked)")
    created.add_argument(
        "--db",
        dest="db_path",
        metavar="FILE",
        help="write it straight into this collector database (bootstrap: the first admin token)",
    )
    revoked = verbs.add_parser("revoke", help="refuse a token from now on")
    revoked.add_argument("token_id")

    audit = sub.add_parser("audit", help="the audit log: who did what, when, with what result")
    audit.add_argument("--since", type=parse_since, help="only events after this (1h, 7d, ISO time)")
    audit.add_argument("--limit", type=int, default=100, help="at most this many (0: all; default 100)")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")

    ca = sub.add_parser("ca", help="the collector's certificate authority, on the collector's host")
    verbs = ca.add_subparsers(dest="verb", metavar="VERB")
    init = verbs.add_parser("init", help="create the CA and the collector's certificate")
    init.add_argument(
        "--dir", type=Path, required=True, help="where to write ca.pem, ca.key, collector.pem/.key"
    )
    init.add_argument(
        "--name",
        action="append",
        required=True,
        help="a DNS name or IP address agents and clients use for the collector (repeatable)",
    )
    init.add_argument(
        "--days", type=float, default=825, help="the collector certificate's lifetime (default 825)"
    )
    init.add_argument(
        "--force", action="store_true", help="replace an existing CA (every agent must enroll again)"
    )

    alerts = sub.add_parser("alerts", help="alerts raised by the collector's rules")
    verbs = alerts.add_subparsers(dest="verb", metavar="VERB")
    for name, text in (("list", "alerts, newest first"), ("tail", "alert changes as they happen")):
        shown = verbs.add_parser(name, help=text)
        shown.add_argument(
            "--state",
            action="append",
            choices=sorted(_ALERT_STATES),
            default=[],
            help="only alerts in this state (repeatable; default: all)",
        )
        shown.add_argument("--rule", action="append", default=[], help="only this rule (repeatable)")
        if name == "list":
            shown.add_argument(
                "--limit", type=int, default=100, help="at most this many (0: all; default 100)"
            )
        shown.add_argument("--json", action="store_true", help="one JSON object per line")
        shown.add_argument(
            "--format", choices=["ecs"], help="ecs: one Elastic Common Schema record per line (docs/siem.md)"
        )
    for name, text in (("ack", "acknowledge: someone is on it"), ("resolve", "resolve: it is dealt with")):
        changed = verbs.add_parser(name, help=text)
        changed.add_argument("ids", nargs="+", type=int, metavar="ID")
        changed.add_argument("--note", default="", help="a note kept with the alert")
        changed.add_argument("--json", action="store_true", help="each changed alert as a JSON object")

    models = sub.add_parser("models", help="the collector's model registry")
    verbs = models.add_subparsers(dest="verb", metavar="VERB")
    listed = verbs.add_parser(
        "list", help="every registered model version with its stage and headline metrics"
    )
    listed.add_argument("--domain", choices=sorted(_DOMAINS), help="only models of this domain")
    listed.add_argument("--json", action="store_true", help="one JSON object per line")
    shown = verbs.add_parser("show", help="one model version in full (ID: its production version)")
    shown.add_argument("model", metavar="ID[@VERSION]")
    shown.add_argument("--json", action="store_true", help="JSON output (the whole manifest)")
    imported = verbs.add_parser(
        "import", help="register models (NAME.manifest.json beside its ONNX file, or folders of them)"
    )
    imported.add_argument("paths", nargs="+", type=Path, metavar="MANIFEST|DIR")
    promoted = verbs.add_parser("promote", help="put a version into production; agents switch to it")
    promoted.add_argument("model", metavar="ID@VERSION")
    rolled = verbs.add_parser("rollback", help="put back the version in production before the current one")
    rolled.add_argument("model_id", metavar="ID")
    shadowed = verbs.add_parser(
        "shadow", help="run a candidate beside production on agents (scores recorded, never deciding)"
    )
    shadowed.add_argument("model", metavar="ID@VERSION")
    shadowed.add_argument("--off", action="store_true", help="stop shadowing it (back to candidate)")
    compared = verbs.add_parser(
        "compare", help="a shadow version beside production on the same flows: agreement, would-be alerts"
    )
    compared.add_argument("model", metavar="ID@VERSION", help="the shadow version")
    compared.add_argument(
        "--since", type=parse_since, default="1h", help="flows scored after this (default 1h)"
    )
    compared.add_argument("--json", action="store_true")
    drifted = verbs.add_parser(
        "drift",
        help="inputs and scores of the agents' recent window against each model's reference (PSI, KS)",
    )
    drifted.add_argument("model_id", nargs="?", metavar="ID", help="one model (default: all)")
    drifted.add_argument("--json", action="store_true", help="one JSON object per agent and model")
    retired = verbs.add_parser(
        "retire", help="take a version out of service for good (the production one: agents stop the model)"
    )
    retired.add_argument("model", metavar="ID@VERSION")
    diffed = verbs.add_parser("diff", help="two versions side by side: metrics, threshold, features, data")
    diffed.add_argument("a", metavar="ID[@VERSION]")
    diffed.add_argument("b", metavar="ID[@VERSION]")
    trained = verbs.add_parser(
        "train",
        help="train any model of the zoo on a numeric table (CSV or Parquet) here and register it "
        "(needs the training extra; the collector signs it)",
    )
    trained.add_argument("--data", required=True, type=Path, metavar="FILE.csv|.parquet")
    trained.add_argument("--kind", required=True, help="random-forest, gradient-boosting, mlp, "
                         "isolation-forest, one-class-svm, kmeans, dbscan or autoencoder")  # fmt: skip
    trained.add_argument("--label", metavar="COLUMN", help="the label column (supervised kinds need one)")
    trained.add_argument("--time-column", metavar="COLUMN", help="split by this time inside each class")
    trained.add_argument("--model-id", metavar="ID", help="default: zoo-KIND")
    trained.add_argument("--version", dest="new_version", default="1")
    retrain = verbs.add_parser(
        "retrain",
        help="train a new version of a classifier from analyst-labelled flows, judge it against the "
        "production version on the same held-back slice, register it as a candidate (on the "
        "collector's host: reads --db; needs the training extra)",
    )
    retrain.add_argument("--feed", choices=["network"], default="network")
    retrain.add_argument("--model", required=True, metavar="ID", help="the classifier to retrain")
    retrain.add_argument(
        "--db", dest="db_path", required=True, metavar="PATH", help="the collector's database"
    )
    retrain.add_argument(
        "--signing-key", type=Path, metavar="FILE", help="the collector's model key (signing_key_file)"
    )
    retrain.add_argument("--version", dest="new_version", help="the new version (default: a UTC timestamp)")
    retrain.add_argument("--trees", type=int, default=40)
    retrain.add_argument(
        "--base-data", type=Path, metavar="FILE.csv|.parquet",
        help="more labelled rows: the model's feature columns by name and a label column; rows with no "
        "time count as older than every labelled flow (they train, the recent flows judge)",
    )  # fmt: skip
    retrain.add_argument("--base-label-column", default="label", metavar="COLUMN")
    retrain.add_argument("--base-time-column", metavar="COLUMN", help="flow time in ns (default: none)")
    retrain.add_argument(
        "--promote-if-better", action="store_true",
        help="promote it (through the collector's API) when every figure is at least as good as production's",
    )  # fmt: skip
    retrain.add_argument("--json", action="store_true", help="the comparison as one JSON object")
    signed = verbs.add_parser(
        "sign", help="sign manifests with an Ed25519 key, on this host (no collector needed)"
    )
    signed.add_argument("--key", required=True, type=Path, help="the private key (PEM)")
    signed.add_argument("manifests", nargs="+", type=Path, metavar="MANIFEST")

    feed = sub.add_parser("feed", help="transaction and tick feeds: import, replay, scores, rejects")
    feed_verbs = feed.add_subparsers(dest="verb", metavar="VERB")
    for name, text in (
        ("import", "send a CSV (plain or .gz) or Parquet file to a feed, with a progress line"),
        ("replay", "stream a file into a feed at --rate records per second (demonstrations, load)"),
        ("score", "score a file on this host with the feed models (no collector needed): one output"
                  " row per input row"),
    ):  # fmt: skip
        sender = feed_verbs.add_parser(name, help=text)
        sender.add_argument("kind", choices=["transactions", "ticks"])
        sender.add_argument("file", type=Path)
        if name == "score":
            sender.add_argument("--feed", default="offline", metavar="ID", help="the records' feed id")
        else:
            sender.add_argument("--feed", required=True, metavar="ID", help="the feed's id")
        sender.add_argument(
            "--map", action="append", default=[], metavar="COLUMN=FIELD", help="map a column onto a field"
        )
        sender.add_argument("--ignore", action="append", default=[], metavar="COLUMN", help="skip a column")
        sender.add_argument(
            "--rest-as-features", action="store_true", help="transactions: other numeric columns are features"
        )
        sender.add_argument("--symbol", default="", help="ticks: the symbol, when the file has no column")
        sender.add_argument("--time-unit", choices=["s", "ms", "us", "ns"], default="s", help="numeric times")
        sender.add_argument("--batch", type=int, default=1000, help="records per request (default 1000)")
        if name == "replay":
            sender.add_argument("--rate", type=float, required=True, help="records per second")
        if name == "score":
            sender.add_argument(
                "--out", required=True, metavar="FILE",
                help="where the scores go: .csv, .jsonl or .parquet (by suffix); - for CSV on stdout",
            )  # fmt: skip
            sender.add_argument(
                "--models", type=Path, default=None, metavar="DIR",
                help="the feed models (default: the shipped models/feeds of this checkout)",
            )  # fmt: skip
            sender.add_argument("--detector", default=None, help="ticks: the detector's model id")
            sender.add_argument(
                "--model-key", action="append", default=[], type=Path, metavar="PEM",
                help="also trust this public key's model signatures (the release keys always are)",
            )  # fmt: skip
    scores = feed_verbs.add_parser("scores", help="stored feed records with their scores, newest first")
    scores.add_argument("--feed", default="", metavar="ID")
    scores.add_argument("--since", type=parse_since, help="records after this (1h, 7d, ISO time)")
    scores.add_argument("--anomalous", action="store_const", const=True, help="only anomalous records")
    scores.add_argument("--limit", type=int, default=100)
    scores.add_argument("--json", action="store_true")
    rejects = feed_verbs.add_parser("rejects", help="rejected records with their reasons, newest first")
    rejects.add_argument("--feed", default="", metavar="ID")
    rejects.add_argument("--limit", type=int, default=100)
    rejects.add_argument("--json", action="store_true")
    feed_tail = feed_verbs.add_parser("tail", help="new feed scores as they are stored")
    feed_tail.add_argument("--feed", default="", metavar="ID")
    feed_tail.add_argument("--anomalous", action="store_const", const=True)
    feed_tail.add_argument("--json", action="store_true")
    feed_verbs.add_parser("list", help="every feed with its counts")

    db = sub.add_parser("db", help="the collector's SQLite database, on this host (no collector needed)")
    db.add_argument(
        "verb",
        choices=["status", "migrate", "vacuum"],
        help="status: schema version, size and row counts; migrate: bring the schema up to this "
        "version; vacuum: give free pages back to the file system (pauses a running collector's ingest)",
    )
    db.add_argument(
        "--db", dest="db_path", metavar="FILE", help="the database file (default: from --collector-config)"
    )
    db.add_argument(
        "--collector-config", metavar="FILE", help="read the database path from this collector configuration"
    )
    db.add_argument("--json", action="store_true", help="JSON output")
    return p


def _fmt_time(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _verdict_cells(stored: verdict_pb2.StoredVerdict) -> tuple[str, ...]:
    v = stored.verdict
    decider = next((s.score for s in v.scores if s.model.model_id == v.model.model_id), None)
    c = v.counters
    return (
        str(stored.id),
        _fmt_time(v.last_seen_time),
        v.agent_id,
        _PROTOCOLS.get(v.flow.ip_protocol, str(v.flow.ip_protocol)),
        _endpoint(v.flow.src_ip, v.flow.src_port),
        _endpoint(v.flow.dst_ip, v.flow.dst_port),
        str(c.src_to_dst_packets + c.dst_to_src_packets),
        str(c.src_to_dst_bytes + c.dst_to_src_bytes),
        v.label + ("*" if v.anomalous else ""),
        "" if decider is None else f"{decider:.3f}",
        v.application_name,
    )


def print_table(verdicts: Iterable[verdict_pb2.StoredVerdict], out: TextIO) -> int:
    header = (
        "ID",
        "LAST SEEN (UTC)",
        "AGENT",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "PKTS",
        "BYTES",
        "LABEL",
        "SCORE",
        "APP",
    )
    rows = [_verdict_cells(stored) for stored in verdicts]
    if not rows:
        print("no verdicts match", file=out)
        return 0
    _print_rows(header, rows, out)
    print(f"{len(rows)} verdict(s); * = anomalous", file=out)
    return len(rows)


def _verdicts(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.limit is not None and args.limit < 0:
        raise ConfigError("--limit must not be negative")
    flt = _filter(args)
    if args.verb == "label":
        if not args.ids or not args.label_as:
            raise ConfigError("verdicts label needs verdict ids and --as LABEL")
        labeled = client.label(args.ids, args.label_as, args.note, author=getpass.getuser())
        print(f"labeled {labeled} of {len(args.ids)} verdict(s) as {args.label_as}", file=out)
        return EXIT_OK if labeled == len(args.ids) else EXIT_RPC
    if args.verb == "explain":
        if len(args.ids) != 1:
            raise ConfigError("verdicts explain needs one verdict id")
        e = client.explain_verdict(args.ids[0], args.model, args.limit or 10)
        if args.json:
            print(_json(e), file=out)
            return EXIT_OK
        rows = [(c.feature, f"{c.value:+.4f}") for c in e.contributions]
        print(f"{e.model.model_id}@{e.model.version}: attack score {e.score:.4f} = bias {e.bias:.4f} + the "
              "contributions of every feature; the largest:", file=out)  # fmt: skip
        _print_rows(("FEATURE", "CONTRIBUTION"), rows, out)
        print(e.method, file=out)
        return EXIT_OK
    if args.ids:
        raise ConfigError("verdict ids are only for 'verdicts label' and 'verdicts explain'")
    if args.verb == "export" and args.format == "ecs":
        if args.out is None:
            raise ConfigError("verdicts export --format ecs needs --out FILE (- for stdout)")
        results = client.query(flt, limit=args.limit or None, page_size=1000)
        if str(args.out) == "-":
            written = _print_ecs(results, out)
        else:
            with args.out.open("w", encoding="utf-8") as fh:
                written = _print_ecs(results, fh)
            print(f"exported {written} verdict(s) to {args.out}", file=out)
        return EXIT_OK
    if args.verb == "export":
        if args.out is None:
            raise ConfigError("verdicts export needs --out FILE.jsonl|.csv|.parquet")
        written = export(
            client.query(flt, limit=args.limit or None, page_size=1000), args.out
        )  # all by default
        print(f"exported {written} verdict(s) to {args.out}", file=out)
        return EXIT_OK
    if args.verb == "top":
        top = client.top_anomalies(flt, 10 if args.limit is None else args.limit)
        if args.format == "ecs":
            _print_ecs(top, out)
        elif args.json:
            for stored in top:
                print(_json(stored), file=out)
        else:
            print_table(top, out)
        return EXIT_OK
    if args.verb == "tail":
        for stored in client.subscribe(flt):
            if args.format == "ecs":
                _print_ecs([stored], out)
            elif args.json:
                print(_json(stored), file=out)
            else:
                print("  ".join(_verdict_cells(stored)), file=out)
            out.flush()
        return EXIT_OK
    limit = 100 if args.limit is None else args.limit
    results = client.query(flt, limit=limit or None, page_size=min(limit or 1000, 1000))
    if args.format == "ecs":
        _print_ecs(results, out)
    elif args.json:
        for stored in results:
            print(_json(stored), file=out)
    else:
        print_table(results, out)
    return EXIT_OK


def _print_ecs(items: Iterable[verdict_pb2.StoredVerdict | admin_service_pb2.Alert], out: TextIO) -> int:
    """ECS records, one a line, with the mapping of the collector's SIEM sinks; return how many."""
    from auris.collector.siem import ecs_alert, ecs_line, ecs_verdict

    count = 0
    for item in items:
        doc = ecs_alert(item) if isinstance(item, admin_service_pb2.Alert) else ecs_verdict(item)
        print(ecs_line(doc), file=out)
        count += 1
    return count


def export(verdicts: Iterable[verdict_pb2.StoredVerdict], path: Path) -> int:
    """Write verdicts as JSON lines (full messages), CSV or Parquet (flat rows); return how many."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".parquet"):
        raise ConfigError(f"cannot export to {path.name}: use .jsonl, .csv or .parquet")
    count = 0
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for stored in verdicts:
                fh.write(_json(stored) + "\n")
                count += 1
        return count
    rows = [flat_verdict(stored) for stored in verdicts]
    if suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        return len(rows)
    import pyarrow as pa  # the collector extra ships it; only exports need it
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in EXPORT_COLUMNS})
    pq.write_table(table, path)
    return len(rows)


def _stats(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    groups = [_GROUPS[name] for name in args.by]
    rows = client.aggregate(_filter(args), groups, args.bucket, rollups=args.rollups)
    if args.json:
        for row in rows:
            print(_json(row), file=out)
        return EXIT_OK
    header = (
        "BUCKET (UTC)",
        *(name.upper() for name in args.by),
        "VERDICTS",
        "ANOMALIES",
        "PACKETS",
        "BYTES",
    )
    cells = [
        (
            _fmt_time(r.bucket_start_time) if r.HasField("bucket_start_time") else "all",
            *r.group_values,
            str(r.verdicts),
            str(r.anomalies),
            str(r.packets),
            str(r.bytes),
        )
        for r in rows
    ]
    _print_rows(header, cells, out)
    return EXIT_OK


def _talkers(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    response = client.list_top_talkers(_filter(args), _METRICS[args.by], args.limit, exact=args.exact)
    talkers = response.talkers
    if args.json:  # one talker a line, with whether the answer is exact and its bound on the rest
        # 64-bit counts as strings, as protobuf's JSON mapping writes the talkers' own.
        bound = {"approximate": response.approximate, "omitted_max": str(response.omitted_max)}
        for t in talkers:
            line = json_format.MessageToDict(t, preserving_proto_field_name=True) | bound
            print(json.dumps(line), file=out)
        return EXIT_OK

    def count(value: int, error: int) -> str:
        return f"{value}+{error}" if error else str(value)

    rows = [
        (
            t.ip,
            count(t.flows, t.flows_error),
            count(t.bytes, t.bytes_error),
            count(t.anomalies, t.anomalies_error),
        )
        for t in talkers
    ]
    _print_rows(("ADDRESS", "FLOWS", "BYTES", "ANOMALIES"), rows, out)
    if response.approximate:
        print(
            f"approximate (heavy-hitter summary): N+E means between N and N+E; an address not listed has"
            f" at most {response.omitted_max} {args.by}; --exact counts the raw verdicts",
            file=out,
        )
    return EXIT_OK


def _agents(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.verb is None:
        raise ConfigError("agents needs a verb: list or show")
    agents = client.list_agents() if args.verb == "list" else [client.get_agent(args.agent_id)]
    if args.json:
        for agent in agents:
            print(_json(agent), file=out)
        return EXIT_OK
    if args.verb == "show":
        print(json_format.MessageToJson(agents[0], preserving_proto_field_name=True, indent=2), file=out)
        return EXIT_OK
    header = (
        "AGENT",
        "HOSTNAME",
        "STATE",
        "VERSION",
        "LAST HEARTBEAT (UTC)",
        "FLOWS",
        "ACKED",
        "SPOOL",
        "MODELS",
    )
    rows = [
        (
            a.agent_id,
            a.hostname,
            admin_service_pb2.AgentState.Name(a.state).removeprefix("AGENT_STATE_").lower(),
            a.agent_version,
            _fmt_time(a.last_heartbeat_time) if a.HasField("last_heartbeat_time") else "never",
            str(a.health.flows_metered),
            str(a.health.verdicts_acknowledged),
            str(a.health.spool_depth),
            ", ".join(f"{m.model_id}@{m.version}" for m in a.models),
        )
        for a in agents
    ]
    _print_rows(header, rows, out)
    print(f"{len(rows)} agent(s)", file=out)
    return EXIT_OK


def _json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))


def _alert_cells(a: admin_service_pb2.Alert) -> tuple[str, ...]:
    state = admin_service_pb2.AlertState.Name(a.state).removeprefix("ALERT_STATE_").lower()
    who = {"acknowledged": a.acknowledged_by, "resolved": a.resolved_by}.get(state, "")
    return (
        str(a.id),
        state + (f" ({who})" if who else ""),
        a.severity,
        a.rule,
        a.key,
        str(a.events),
        _fmt_time(a.first_time),
        _fmt_time(a.last_time),
        a.summary,
    )


_ALERT_HEADER = ("ID", "STATE", "SEVERITY", "RULE", "KEY", "EVENTS", "FIRST (UTC)", "LAST (UTC)", "SUMMARY")


def _alerts(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.verb is None:
        raise ConfigError("alerts needs a verb: list, tail, ack or resolve")
    if args.verb in ("ack", "resolve"):
        change = client.acknowledge_alert if args.verb == "ack" else client.resolve_alert
        for alert_id in args.ids:
            alert = change(alert_id, args.note)
            print(_json(alert) if args.json else f"alert {alert.id}: {_alert_cells(alert)[1]}", file=out)
        return EXIT_OK
    states = [_ALERT_STATES[name] for name in args.state]
    if args.verb == "tail":
        for alert in client.subscribe_alerts(states, args.rule):
            if args.format == "ecs":
                _print_ecs([alert], out)
            else:
                print(_json(alert) if args.json else "  ".join(_alert_cells(alert)), file=out)
            out.flush()
        return EXIT_OK
    if args.limit < 0:
        raise ConfigError("--limit must not be negative")
    alerts = list(client.alerts(states, args.rule, limit=args.limit or None))
    if args.format == "ecs":
        _print_ecs(alerts, out)
        return EXIT_OK
    if args.json:
        for alert in alerts:
            print(_json(alert), file=out)
        return EXIT_OK
    if not alerts:
        print("no alerts match", file=out)
        return EXIT_OK
    _print_rows(_ALERT_HEADER, [_alert_cells(a) for a in alerts], out)
    print(f"{len(alerts)} alert(s)", file=out)
    return EXIT_OK


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _ref(text: str, *, version: bool) -> tuple[str, str]:
    model_id, _, ver = text.partition("@")
    if not model_id or (version and not ver):
        raise ConfigError(
            f"expected ID@VERSION, got {text!r}" if version else f"expected ID[@VERSION], got {text!r}"
        )
    return model_id, ver


def _rollout(model: admin_service_pb2.RegisteredModel) -> str:
    if model.stage != admin_service_pb2.MODEL_STAGE_PRODUCTION:
        return ""
    r = model.rollout
    return f"{r.agents_running}/{r.agents_online} online agents" + (
        f", {len(r.refusals)} refused" if r.refusals else ""
    )


def _import_models(client: CollectorClient, paths: Sequence[Path], out: TextIO) -> int:
    from auris.agent.manifest import ManifestError, find_manifests, onnx_path_of, read_manifest

    manifests = [m for p in paths for m in (find_manifests(p) if p.is_dir() else [p])]
    if not manifests:
        raise ConfigError("no *.manifest.json found")
    failed = 0
    for path in manifests:
        try:
            manifest = read_manifest(path)
            model = client.register_model(manifest, onnx_path_of(path, manifest).read_bytes())
        except (ManifestError, OSError) as exc:
            print(f"aurisctl: {str(exc).splitlines()[0]}", file=sys.stderr)
            failed += 1
            continue
        except grpc.RpcError as exc:
            if not isinstance(exc, grpc.Call) or exc.code() not in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise
            print(f"aurisctl: {path}: {exc.details()}", file=sys.stderr)
            failed += 1
            continue
        stage = _enum_name(admin_service_pb2.ModelStage, model.stage, "MODEL_STAGE_")
        print(f"registered {model.manifest.model_id}@{model.manifest.version} ({stage}, signed by "
              f"{model.manifest.signing_key_id})", file=out)  # fmt: skip
    return EXIT_RPC if failed else EXIT_OK


def _diff(a: admin_service_pb2.RegisteredModel, b: admin_service_pb2.RegisteredModel, out: TextIO) -> None:
    ma, mb = a.manifest, b.manifest

    def metrics(m: model_pb2.ModelManifest) -> dict[str, str]:
        e = m.evaluation
        rows = {
            "stage": "",
            "kind": _enum_name(model_pb2.ModelKind, m.kind, "MODEL_KIND_"),
            "feature set": f"{m.feature_set.name} v{m.feature_set.version}",
            "columns": str(len(m.feature_set.columns)),
            "threshold": f"{m.threshold.value:g}",
            "macro F1": f"{e.macro_f1:.3f}",
            "weighted F1": f"{e.weighted_f1:.3f}",
            "PR-AUC": f"{e.pr_auc:.3f}",
            "false-positive rate": f"{e.false_positive_rate:.4f}",
            "baseline macro F1": f"{e.baseline_macro_f1:.3f}",
            **{f"F1 {c.label}": f"{c.f1:.3f}" for c in e.per_class},
            **{k: f"{v:.4g}" for k, v in sorted(e.extra.items())},
            "training rows": str(sum(d.rows for d in m.training_data)),
            "onnx sha256": m.onnx_sha256[:16],
            "signed by": m.signing_key_id or "-",
        }
        return rows

    left, right = metrics(ma), metrics(mb)
    left["stage"] = _enum_name(admin_service_pb2.ModelStage, a.stage, "MODEL_STAGE_")
    right["stage"] = _enum_name(admin_service_pb2.ModelStage, b.stage, "MODEL_STAGE_")
    keys = list(dict.fromkeys([*left, *right]))
    rows = [
        (k, left.get(k, "-"), right.get(k, "-"), "" if left.get(k) == right.get(k) else "*") for k in keys
    ]
    _print_rows(("", f"{ma.model_id}@{ma.version}", f"{mb.model_id}@{mb.version}", "DIFFERS"), rows, out)
    gone = [c for c in ma.feature_set.columns if c not in set(mb.feature_set.columns)]
    added = [c for c in mb.feature_set.columns if c not in set(ma.feature_set.columns)]
    if gone or added:
        print(f"columns only in the first: {', '.join(gone) or '-'}", file=out)
        print(f"columns only in the second: {', '.join(added) or '-'}", file=out)
    elif list(ma.feature_set.columns) != list(mb.feature_set.columns):
        print("same columns in another order", file=out)


def _sign(args: argparse.Namespace, out: TextIO) -> int:
    from auris.agent.manifest import ManifestError, dump_manifest, read_manifest
    from auris.agent.signing import load_private_key, sign_manifest

    try:
        key = load_private_key(args.key)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for path in args.manifests:
        try:
            manifest = read_manifest(path)  # the ONNX file must match before it is vouched for
        except ManifestError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
        sign_manifest(manifest, key)
        path.write_text(dump_manifest(manifest), encoding="utf-8")
        print(f"signed {manifest.model_id}@{manifest.version} ({path}) with key {manifest.signing_key_id}",
              file=out)  # fmt: skip
    return EXIT_OK


def _base_rows(args: argparse.Namespace, columns: Sequence[str]) -> list[tuple[int, str, list[float]]]:
    """--base-data: (time, label, values in ``columns`` order); ConfigError when unusable."""
    import pandas as pd

    from auris.training.zoo import read_table

    path: Path = args.base_data
    try:
        table = read_table(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in [*columns, args.base_label_column] if c not in table.columns]
    if missing:
        raise ConfigError(f"{path}: no column {missing[0]!r} (needs the model's feature columns and a label)")
    values = table[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    times = (
        table[args.base_time_column].astype("int64").tolist() if args.base_time_column else [0] * len(table)
    )
    labels = table[args.base_label_column].astype(str).tolist()
    return [(t, label, row.tolist()) for t, label, row in zip(times, labels, values, strict=True)]


def _better(comparison: dict[str, tuple[float, float]]) -> bool:
    """Every figure at least as good: lower for the false-positive rate, higher for the rest."""
    return all(
        new <= old if name == "false-positive rate" else new >= old for name, (old, new) in comparison.items()
    )


def _retrain(args: argparse.Namespace, out: TextIO, client: CollectorClient | None = None) -> int:
    """models retrain: on the collector's host, against its database (and its API to promote)."""
    import datetime as dt

    from auris.agent.features import feature_set
    from auris.agent.manifest import ManifestError
    from auris.agent.signing import ModelTrust, load_private_key
    from auris.collector.registry import ModelRegistry
    from auris.collector.store import VerdictStore

    try:
        from auris.training.retrain import LabelledFlow, retrain_classifier
    except ImportError as exc:
        raise ConfigError(
            f"retraining needs the training extra (pip install 'auris[training]'): {exc}"
        ) from None
    if not Path(args.db_path).is_file():
        raise ConfigError(f"no database at {args.db_path}")
    try:
        key = load_private_key(args.signing_key) if args.signing_key else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    store = VerdictStore(args.db_path)
    try:
        registry = ModelRegistry(store, ModelTrust.load([]), key)
        try:
            active = registry.get(model_pb2.ModelRef(model_id=args.model))
        except LookupError as exc:
            raise ConfigError(str(exc)) from None
        manifest = active.manifest
        fs = manifest.feature_set
        columns = feature_set(fs.name, fs.version).columns
        ref = model_pb2.ModelRef(model_id=manifest.model_id, version=manifest.version)
        _, active_onnx = registry.onnx(ref)
        rows = store.labelled_features(fs.name, fs.version)
        if args.base_data:
            feature_columns = list(fs.columns)
            position = {c: i for i, c in enumerate(columns)}
            for t, label, values in _base_rows(args, feature_columns):
                full = [0.0] * len(columns)  # vectors are in the feature set's order; the model reads its own
                for column, value in zip(feature_columns, values, strict=True):
                    full[position[column]] = value
                rows.append((t, label, full))
        flows = [LabelledFlow(t, label, values) for t, label, values in rows]
        version = args.new_version or dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
        try:
            result = retrain_classifier(manifest, active_onnx, flows, columns, version, trees=args.trees)
            registry.register(result.manifest, result.onnx)
        except (ValueError, ManifestError) as exc:
            raise ConfigError(f"retrain {args.model}: {str(exc).splitlines()[0]}") from None
    finally:
        store.close()
    new = f"{manifest.model_id}@{version}"
    promoted = False
    if client is not None and _better(result.comparison):
        client.promote_model(manifest.model_id, version)
        promoted = True
    if args.json:
        comparison = {k: {"active": a, "new": b} for k, (a, b) in result.comparison.items()}
        print(json.dumps({"registered": new, "active": f"{manifest.model_id}@{manifest.version}",
                          "rows": len(flows) - sum(result.dropped.values()), "dropped": result.dropped,
                          "comparison": comparison, "promoted": promoted}),
              file=out)  # fmt: skip
        return EXIT_OK
    dropped = sum(result.dropped.values())
    print(f"{len(flows)} labelled flows with {fs.name} features"
          + (f" ({dropped} dropped: unsure or unmapped labels)" if dropped else ""), file=out)  # fmt: skip
    rows_out = [(name, f"{a:.3f}", f"{b:.3f}") for name, (a, b) in result.comparison.items()]
    _print_rows(("SAME HELD-BACK SLICE", f"{manifest.model_id}@{manifest.version}", new), rows_out, out)
    if promoted:
        print(f"registered {new} and promoted it: every figure is at least as good as production's", file=out)
    else:
        reason = "; not promoted: some figure is worse" if client is not None else ""
        hint = f"`aurisctl models promote {new}` puts it in production"
        print(f"registered {new} as a candidate{reason}; {hint}", file=out)
    return EXIT_OK


def _train(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    """models train: the zoo, on a table the user brings, registered with the collector."""
    try:
        from auris.training.zoo import read_table, train_model
    except ImportError as exc:
        raise ConfigError(f"training needs the training extra (auris[training]): {exc}") from None
    try:
        table = read_table(args.data)
        model = train_model(
            table,
            args.kind,
            args.label,
            model_id=args.model_id,
            version=args.new_version,
            time_column=args.time_column,
            source=str(args.data),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"{args.data}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    registered = client.register_model(model.manifest, model.onnx_bytes)
    m = registered.manifest
    stage = _enum_name(admin_service_pb2.ModelStage, registered.stage, "MODEL_STAGE_")
    e = m.evaluation
    print(f"registered {m.model_id}@{m.version} ({stage}, signed by {m.signing_key_id}): {e.split}; "
          f"macro F1 {e.macro_f1:.3f} (baseline {e.baseline_name}: {e.baseline_macro_f1:.3f}), "
          f"PR-AUC {e.pr_auc:.3f}", file=out)  # fmt: skip
    return EXIT_OK


def _summed(histograms: Sequence[model_pb2.Histogram]) -> list[int]:
    return [sum(c) for c in zip(*(h.counts for h in histograms), strict=True)]


def _drift(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    """models drift: per agent and model, then the fleet (every agent's counts summed)."""
    from auris.agent.drift import ks_distance, psi

    reports = [
        (a.agent_id, d)
        for a in client.list_agents()
        for d in a.health.drift
        if not args.model_id or d.model.model_id == args.model_id
    ]
    if args.json:
        for agent_id, d in reports:
            fields = json_format.MessageToDict(d, preserving_proto_field_name=True)
            print(json.dumps({"agent_id": agent_id, **fields}), file=out)
        return EXIT_OK
    if not reports:
        print(
            "no drift reported (models need a reference distribution; agents report it in heartbeats)",
            file=out,
        )
        return EXIT_OK

    def row(
        who: str, ref: str, flows: int, score: tuple[float, float], worst: tuple[float, str]
    ) -> tuple[str, ...]:
        return who, ref, str(flows), f"{score[0]:.3f}", f"{score[1]:.3f}", f"{worst[1] or '-'} {worst[0]:.3f}"

    rows = [
        row(agent_id, f"{d.model.model_id}@{d.model.version}", d.flows, (d.score_psi, d.score_ks),
            (d.max_feature_psi, d.max_psi_feature))
        for agent_id, d in reports
    ]  # fmt: skip
    fleet: dict[tuple[str, str], list[model_pb2.ModelDrift]] = {}
    for _, d in reports:
        fleet.setdefault((d.model.model_id, d.model.version), []).append(d)
    for (model_id, version), group in sorted(fleet.items()):
        try:
            reference = client.model(model_id, version).manifest.reference
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            # An agent's own model (shipped with it, never registered): its reference is not here.
            rows.append(("(fleet)", f"{model_id}@{version}", str(sum(d.flows for d in group)), "-", "-",
                         "not in the registry"))  # fmt: skip
            continue
        score = _summed([d.score for d in group])
        worst = max(
            (
                (psi(ref.histogram.counts, _summed([d.features[j].histogram for d in group])), ref.feature)
                for j, ref in enumerate(reference.features)
            ),
            default=(0.0, ""),
        )
        scores = (psi(reference.score.counts, score), ks_distance(reference.score.counts, score))
        rows.append(row("(fleet)", f"{model_id}@{version}", sum(d.flows for d in group), scores, worst))
    _print_rows(("AGENT", "MODEL", "FLOWS", "SCORE PSI", "SCORE KS", "WORST FEATURE PSI"), rows, out)
    print("PSI < 0.1 stable, 0.1-0.25 moving, > 0.25 shifted (rule of thumb)", file=out)
    return EXIT_OK


def _models(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.verb is None:
        raise ConfigError(
            "models needs a verb: list, show, import, train, retrain, promote, rollback, retire, diff or sign"
        )
    if args.verb == "import":
        return _import_models(client, args.paths, out)
    if args.verb == "retrain":  # with --promote-if-better: the API promotes
        return _retrain(args, out, client)
    if args.verb == "train":
        return _train(client, args, out)
    if args.verb in ("promote", "retire", "rollback"):
        if args.verb == "rollback":
            model = client.rollback_model(args.model_id)
        else:
            model_id, version = _ref(args.model, version=True)
            change = client.promote_model if args.verb == "promote" else client.retire_model
            model = change(model_id, version)
        stage = _enum_name(admin_service_pb2.ModelStage, model.stage, "MODEL_STAGE_")
        print(f"{model.manifest.model_id}@{model.manifest.version} is now {stage}", file=out)
        return EXIT_OK
    if args.verb == "shadow":
        model = client.shadow_model(*_ref(args.model, version=True), enabled=not args.off)
        stage = _enum_name(admin_service_pb2.ModelStage, model.stage, "MODEL_STAGE_")
        print(f"{model.manifest.model_id}@{model.manifest.version} is now {stage}", file=out)
        return EXIT_OK
    if args.verb == "compare":
        c = client.compare_models(*_ref(args.model, version=True), since=args.since)
        if args.json:
            print(_json(c), file=out)
            return EXIT_OK
        prod, shadow = (
            f"{c.production.model_id}@{c.production.version}",
            f"{c.shadow.model_id}@{c.shadow.version}",
        )
        if not c.flows:
            print(f"no flow carries scores of both {prod} and {shadow} in that time", file=out)
            return EXIT_OK
        table = [
            ("flows scored by both", str(c.flows), str(c.flows)),
            ("anomalous", str(c.production_anomalous), str(c.shadow_anomalous)),
            ("flagged by this one only", str(c.only_production), str(c.only_shadow)),
            ("sources an alert rule would key on", str(c.production_alert_keys), str(c.shadow_alert_keys)),
        ]
        _print_rows(("", prod, shadow + " (shadow)"), table, out)
        agreement = f"agreement {c.agree / c.flows:.1%} ({c.agree} of {c.flows})"
        print(f"{agreement}; class changed on {c.label_changes}", file=out)
        return EXIT_OK
    if args.verb == "drift":
        return _drift(client, args, out)
    if args.verb == "diff":
        _diff(client.model(*_ref(args.a, version=False)), client.model(*_ref(args.b, version=False)), out)
        return EXIT_OK
    if args.verb == "show":
        model_id, version = _ref(args.model, version=False)
        model = client.model(model_id, version)
        if args.json:
            print(_json(model), file=out)
            return EXIT_OK
        m = model.manifest
        e = m.evaluation
        facts = [
            ("model", f"{m.model_id}@{m.version}"),
            ("stage", _enum_name(admin_service_pb2.ModelStage, model.stage, "MODEL_STAGE_")),
            ("kind", _enum_name(model_pb2.ModelKind, m.kind, "MODEL_KIND_")),
            ("domain", _enum_name(model_pb2.ModelDomain, m.domain, "MODEL_DOMAIN_")),
            ("description", m.description),
            (
                "feature set",
                f"{m.feature_set.name} v{m.feature_set.version}, {len(m.feature_set.columns)} columns",
            ),
            ("labels", ", ".join(m.labels) + (f" (normal: {m.normal_label})" if m.normal_label else "")),
            ("threshold", f"{m.threshold.value:g} ({m.threshold.method})"),
            ("evaluation", f"{e.split}: macro F1 {e.macro_f1:.3f}, weighted F1 {e.weighted_f1:.3f}"),
            ("baseline", f"{e.baseline_name}: macro F1 {e.baseline_macro_f1:.3f}"),
            *(
                (
                    f"  {c.label}",
                    f"precision {c.precision:.3f} recall {c.recall:.3f} F1 {c.f1:.3f} n={c.support}",
                )
                for c in e.per_class
            ),
            ("onnx", f"{m.onnx_file} sha256 {m.onnx_sha256}"),
            ("signed", f"by {m.signing_key_id}" if m.signature else "no"),
            ("registered", _fmt_time(model.registered_time) + " UTC"),
            *((("rollout", _rollout(model)),) if _rollout(model) else ()),
            *((f"  refused by {r.agent_id}", r.reason) for r in model.rollout.refusals),
        ]
        _print_rows(("FIELD", "VALUE"), facts, out)
        return EXIT_OK
    models = client.models(_DOMAINS[args.domain] if args.domain else model_pb2.MODEL_DOMAIN_UNSPECIFIED)
    if args.json:
        for model in models:
            print(_json(model), file=out)
        return EXIT_OK
    rows = [
        (
            f"{r.manifest.model_id}@{r.manifest.version}",
            _enum_name(admin_service_pb2.ModelStage, r.stage, "MODEL_STAGE_"),
            _enum_name(model_pb2.ModelKind, r.manifest.kind, "MODEL_KIND_"),
            r.manifest.feature_set.name,
            f"{r.manifest.evaluation.macro_f1:.3f}",
            f"{r.manifest.evaluation.baseline_macro_f1:.3f}",
            _fmt_time(r.registered_time),
            _rollout(r) or "-",
        )
        for r in models
    ]
    if not rows:
        print("no models registered", file=out)
        return EXIT_OK
    header = ("MODEL", "STAGE", "KIND", "FEATURES", "MACRO F1", "BASELINE", "REGISTERED (UTC)", "ROLLOUT")
    _print_rows(header, rows, out)
    return EXIT_OK


def _identity(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    """agents revoke, enroll create, tokens create|revoke, audit."""
    if getattr(args, "verb", None) is None and args.command != "audit":
        raise ConfigError(f"{args.command} needs a verb")
    if args.command == "agents":  # revoke
        client.revoke_agent(args.agent_id, args.reason)
        print(f"agent {args.agent_id} revoked", file=out)
    elif args.command == "enroll":
        enrollment = client.create_enrollment_token(args.ttl, args.note)
        expires = _fmt_time(enrollment.expire_time)
        print(f"enrollment token (one use, expires {expires} UTC):\n{enrollment.token}", file=out)
        print("on the agent's host:\n  auris-agent enroll --collector HOST:PORT "
              f"--ca-sha256 {enrollment.ca_sha256} --token TOKEN", file=out)  # fmt: skip
    elif args.command == "tokens" and args.verb == "create":
        token, token_id = client.create_api_token(args.name, _ROLES[args.role], args.ttl)
        print(f"token {token_id} ({args.role}) for {args.name}; shown once:\n{token}", file=out)
    elif args.command == "tokens":
        client.revoke_api_token(args.token_id)
        print(f"token {args.token_id} revoked", file=out)
    else:
        if args.limit < 0:
            raise ConfigError("--limit must not be negative")
        events = list(client.audit_events(args.since, limit=args.limit or None))
        if args.json:
            for event in events:
                print(_json(event), file=out)
            return EXIT_OK
        rows = [(_fmt_time(e.time), e.actor, e.action, e.target, e.result) for e in events]
        _print_rows(("TIME (UTC)", "ACTOR", "ACTION", "TARGET", "RESULT"), rows, out)
    return EXIT_OK


def _local(args: argparse.Namespace, out: TextIO) -> int:
    """Commands that work on the collector's host without a collector: ca init, a bootstrap token."""
    if args.command == "ca":
        from auris.collector.pki import PkiError, fingerprint, init_pki

        if args.verb != "init":
            raise ConfigError("ca needs a verb: init")
        try:
            paths = init_pki(args.dir, args.name, args.days, force=args.force)
        except (PkiError, OSError) as exc:
            raise ConfigError(str(exc)) from None
        print(f"CA {paths.ca_cert} (key {paths.ca_key}, keep it private); collector certificate "
              f"{paths.cert} (key {paths.key}) for {', '.join(args.name)}", file=out)  # fmt: skip
        print(f"model-signing key {paths.model_key} (keep it private; public half beside it)", file=out)
        print(f"CA sha256 (enrolling agents pin it): {fingerprint(paths.ca_cert.read_bytes())}", file=out)
        return EXIT_OK
    from auris.collector.auth import Authority
    from auris.collector.store import VerdictStore

    if not Path(args.db_path).is_file():
        raise ConfigError(f"no database at {args.db_path}")
    store = VerdictStore(args.db_path)
    try:
        ttl_s = args.ttl.total_seconds() if args.ttl else 0.0
        token, token_id = Authority(store, insecure=False).create_token(args.name, _ROLES[args.role], ttl_s)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    finally:
        store.close()
    print(f"token {token_id} ({args.role}) for {args.name}; shown once:\n{token}", file=out)
    return EXIT_OK


def _db(args: argparse.Namespace, out: TextIO) -> int:
    """Local database maintenance: the same store code the collector runs."""
    import sqlite3

    from auris.collector.config import load_collector_config
    from auris.collector.store import SCHEMA_VERSION, VerdictStore

    path = args.db_path
    if path is None:
        if args.collector_config is None:
            raise ConfigError("db needs --db FILE or --collector-config FILE")
        path = load_collector_config(args.collector_config).db
    if not Path(path).is_file():
        raise ConfigError(f"no database at {path}")
    try:
        store = VerdictStore(path, migrate=False)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: not a usable SQLite database ({exc})") from None
    try:
        before = store.schema_version()
        if before > SCHEMA_VERSION:
            raise ConfigError(f"{path}: schema v{before} is newer than this aurisctl (v{SCHEMA_VERSION})")
        report: dict[str, object] = {
            "db": str(path),
            "schema_version": before,
            "latest_schema": SCHEMA_VERSION,
        }
        if args.verb == "migrate":
            report["migrations_applied"] = store.migrate()
            report["schema_version"] = store.schema_version()
        elif args.verb == "vacuum":
            report["bytes_before"], report["bytes_after"] = store.vacuum()
        report["file_bytes"] = Path(path).stat().st_size
        report["used_bytes"] = store.size_bytes()
        tables = set(store.db.table_names())
        for table in ("verdicts", "rollups", "agents", "alerts"):
            report[f"{table}_rows"] = store.db.table(table).count if table in tables else 0
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: {exc}") from None
    finally:
        store.close()
    if args.json:
        print(json.dumps(report), file=out)
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key.ljust(width)}  {value}", file=out)
    return EXIT_OK


def _file_format(args: argparse.Namespace) -> FileFormat:
    """The column mapping that ``feed import|replay|score`` take."""
    from auris.collector.feed_files import FileFormat

    mapping = {}
    for item in args.map:
        column, sep, field = item.partition("=")
        if not sep:
            raise ConfigError(f"--map expects COLUMN=FIELD, got {item!r}")
        mapping[column] = field
    return FileFormat(
        args.kind, args.feed, mapping, args.ignore, args.rest_as_features, args.symbol, args.time_unit
    )


def _score_feed_file(args: argparse.Namespace, out: TextIO) -> int:
    """feed score: the file through the feed models on this host (``feed_offline.py``)."""
    from auris.agent.manifest import ManifestError
    from auris.agent.signing import ModelTrust
    from auris.collector.feed_files import FeedFileError
    from auris.collector.feed_offline import load_scorer, score_file, summary_lines

    models = args.models or SHIPPED_FEED_MODELS
    if not models.is_dir():
        raise ConfigError(f"{models}: no such folder of feed models (pass --models DIR)")
    fmt = _file_format(args)
    try:
        trust = ModelTrust.load(args.model_key)
        scorer = load_scorer(args.kind, models, trust, detector=args.detector)
    except (ManifestError, ValueError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    target = None if args.out == "-" else Path(args.out)

    def progress(rows: int) -> None:
        print(f"\r{rows:,} rows", end="", file=sys.stderr)

    try:
        summary = score_file(
            args.file, fmt, scorer, target, batch=max(1, args.batch), stdout=out, progress=progress
        )
    except FeedFileError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{args.out}: {exc.strerror or exc}") from None
    print("\r" + " " * 24 + "\r", end="", file=sys.stderr)
    for line in summary_lines(summary, args.file, args.out if target else "stdout"):
        print(line, file=sys.stderr if target is None else out)
    return EXIT_OK


# Batches of a feed import sent and not yet answered, at most.
_FEED_WINDOW = 8


def _send_feed(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    """feed import|replay: batches in file order on one stream (the next batches are read and sent
    while the collector stores the ones before); every rejected row reported with its row number.

    The file is read up to its first valid row before the stream opens: a file that cannot be read
    as asked fails with its own error, and one without a valid row sends nothing. If the stream
    breaks, what was answered is summed up (and where to resume) before the error."""
    from auris.collector.feed_files import FeedFileError, open_records

    fmt = _file_format(args)
    rate = getattr(args, "rate", None)
    batch_size = max(1, min(args.batch, int(rate) if rate else args.batch))
    transactions = args.kind == "transactions"
    accepted = rows = 0
    last_answered = 0  # the file row number of the last row of the last answered batch
    rejected: list[tuple[int, str]] = []
    # The file's row numbers of each batch sent and not answered yet (appended on gRPC's thread).
    in_flight: collections.deque[list[int]] = collections.deque()
    failed: list[BaseException] = []  # what stopped the file's reading (raised here afterwards)
    # At most this many batches unanswered: what a broken stream leaves in doubt stays small.
    window = threading.Semaphore(_FEED_WINDOW)
    done = threading.Event()
    started = time.monotonic()

    try:
        # Transactions' features as feature_values, named once per request.
        names, records = open_records(args.file, fmt, packed=transactions)
        first: tuple[int, Any] | None = None
        for number, record in records:
            rows += 1
            if isinstance(record, str):
                rejected.append((number, record))
                continue
            first = (number, record)
            break
    except FeedFileError as exc:
        raise ConfigError(str(exc)) from None

    def request(batch: list[Any]) -> Any:
        if transactions:
            return feed_service_pb2.StreamTransactionsRequest(transactions=batch, feature_names=names)
        return feed_service_pb2.StreamTicksRequest(ticks=batch)

    def pace() -> bool:
        """Wait until the batch may go (its records are due at rows / rate seconds, and fewer than
        the window are unanswered); False once the answers stopped coming."""
        if rate:
            time.sleep(max(0.0, rows / rate - (time.monotonic() - started)))
        while not window.acquire(timeout=0.5):
            if done.is_set():
                return False
        return not done.is_set()

    def batches(first: tuple[int, Any]) -> Iterator[tuple[list[int], list[Any]]]:
        """The file's valid rows in batches, with their row numbers (the rest is rejected)."""
        nonlocal rows
        numbers, batch = [first[0]], [first[1]]
        for number, record in records:
            rows += 1
            if isinstance(record, str):
                rejected.append((number, record))
                continue
            numbers.append(number)
            batch.append(record)
            if len(batch) >= batch_size:
                yield numbers, batch
                numbers, batch = [], []
        if batch:
            yield numbers, batch

    def requests(first: tuple[int, Any]) -> Iterator[Any]:
        """The file's batches as requests; runs on gRPC's request thread."""
        try:
            for numbers, batch in batches(first):
                if not pace():
                    return
                in_flight.append(numbers)
                yield request(batch)
        except Exception as exc:  # ends the stream; raised once the answers so far are in
            failed.append(exc)

    stream = client.stream_transactions if transactions else client.stream_ticks
    try:
        for answer in stream(requests(first)) if first is not None else ():
            numbers = in_flight.popleft()
            window.release()
            accepted += answer.accepted
            last_answered = numbers[-1]
            rejected.extend((numbers[r.index], r.reason) for r in answer.rejected)
            print(
                f"\r{rows:,} rows: {accepted:,} accepted, {len(rejected):,} rejected", end="", file=sys.stderr
            )
    except grpc.RpcError:
        print(file=sys.stderr)
        unanswered = sum(len(numbers) for numbers in in_flight)
        answered = (
            f"every row up to row {last_answered} was answered" if last_answered else "no batch was answered"
        )
        print(f"{args.file}: the stream broke after {rows:,} rows read: {accepted:,} accepted, "
              f"{len(rejected):,} rejected; {unanswered:,} rows sent without an answer (stored or not); "
              f"{answered}", file=out)  # fmt: skip
        raise
    finally:
        done.set()
    if failed:
        if isinstance(failed[0], FeedFileError):
            raise ConfigError(str(failed[0])) from None
        raise failed[0]
    if first is not None:
        print(file=sys.stderr)
    elapsed = time.monotonic() - started
    print(f"{args.file}: {rows:,} rows, {accepted:,} accepted, {len(rejected):,} rejected in {elapsed:.1f}s "
          f"({rows / elapsed if elapsed else 0:,.0f} rows/s) into feed {args.feed}", file=out)  # fmt: skip
    for number, reason in sorted(rejected)[:20]:
        print(f"  row {number}: {reason}", file=out)
    if len(rejected) > 20:
        print(f"  ... {len(rejected) - 20} more (aurisctl feed rejects --feed {args.feed})", file=out)
    return EXIT_OK


def _feed(client: CollectorClient, args: argparse.Namespace, out: TextIO) -> int:
    if args.verb is None:
        raise ConfigError("feed needs a verb: import, replay, score, scores, rejects, tail or list")
    if args.verb in ("import", "replay"):
        return _send_feed(client, args, out)
    if args.verb == "list":
        rows = [
            (f.feed_id, _enum_name(admin_service_pb2.FeedKind, f.kind, "FEED_KIND_"), str(f.records_accepted),
             str(f.records_rejected), _fmt_time(f.last_record_time))
            for f in client.list_feeds()
        ]  # fmt: skip
        _print_rows(("FEED", "KIND", "ACCEPTED", "REJECTED", "LAST RECORD (UTC)"), rows, out)
        return EXIT_OK
    if args.verb == "rejects":
        found = list(client.feed_rejects(args.feed, limit=args.limit))
        if args.json:
            for r in found:
                print(_json(r), file=out)
            return EXIT_OK
        rows = [
            (str(r.id), r.feed_id, _fmt_time(r.received_time), r.record.record_id, r.record.reason)
            for r in found
        ]
        _print_rows(("ID", "FEED", "RECEIVED (UTC)", "RECORD", "REASON"), rows, out)
        return EXIT_OK
    stream = (
        client.subscribe_feed_scores(args.feed, args.anomalous)
        if args.verb == "tail"
        else client.feed_scores(args.feed, args.since, args.anomalous, limit=args.limit)
    )
    if args.json:
        for score in stream:
            print(_json(score), file=out, flush=True)
        return EXIT_OK
    table: list[tuple[str, ...]] = []
    for s in stream:
        shown = f"{s.score:.4g}" if s.model.model_id else "-"
        row = (str(s.id), s.feed_id, _fmt_time(s.time), s.entity, s.record_id, shown,
               "yes" if s.anomalous else "", s.explanation[:60])  # fmt: skip
        if args.verb == "tail":
            print("  ".join(row), file=out, flush=True)
        else:
            table.append(row)
    _print_rows(("ID", "FEED", "TIME (UTC)", "ENTITY", "RECORD", "SCORE", "ANOMALOUS", "WHY"), table, out)
    return EXIT_OK


def _print_rows(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _services(client: CollectorClient, out: TextIO) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    names = sorted(ProtoReflectionDescriptorDatabase(client.channel).get_services())
    health = health_pb2_grpc.HealthStub(client.channel)
    width = max((len(n) for n in names), default=0)
    for name in names:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            shown = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
        except grpc.RpcError as exc:
            if not isinstance(exc, grpc.Call) or exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            shown = "-"  # infrastructure services (health, reflection) report no status of their own
        print(f"{name.ljust(width)}  {shown}", file=out)
    return EXIT_OK


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(
            "aurisctl: a command is required "
            "(verdicts, stats, talkers, agents, alerts, models, feed, enroll, tokens, audit, services, db,"
            " ca)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.command == "models" and (
        args.verb == "sign" or (args.verb == "retrain" and not args.promote_if_better)
    ):
        try:
            return _sign(args, out) if args.verb == "sign" else _retrain(args, out)
        except ConfigError as exc:
            print(f"aurisctl: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.command == "feed" and args.verb == "score":
        try:
            return _score_feed_file(args, out)
        except ConfigError as exc:
            print(f"aurisctl: {exc}", file=sys.stderr)
            return EXIT_USAGE
    local = args.command in ("db", "ca") or (args.command == "tokens" and getattr(args, "db_path", None))
    if local:
        try:
            return _db(args, out) if args.command == "db" else _local(args, out)
        except ConfigError as exc:
            print(f"aurisctl: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        config = build_config(
            CtlConfig,
            path=args.config,
            env_prefix="AURIS_CTL_",
            overrides={"collector": args.collector, "insecure": args.insecure},
        )
        if not config.insecure and not config.ca_file:
            raise ConfigError("TLS needs ca_file (the collector's CA); pass --insecure for a local collector")
        if not config.insecure and not config.token:
            raise ConfigError("set an API token: AURIS_CTL_TOKEN, or token in the config file")
        client = CollectorClient(
            config.collector,
            insecure=config.insecure,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
            token=config.token,
            timeout_s=config.timeout_s,
        )
    except (ConfigError, ValueError, OSError) as exc:
        print(f"aurisctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with client:
            if args.command == "verdicts":
                return _verdicts(client, args, out)
            if args.command in ("enroll", "tokens", "audit") or (
                args.command == "agents" and args.verb == "revoke"
            ):
                return _identity(client, args, out)
            if args.command == "agents":
                return _agents(client, args, out)
            if args.command == "stats":
                return _stats(client, args, out)
            if args.command == "talkers":
                return _talkers(client, args, out)
            if args.command == "alerts":
                return _alerts(client, args, out)
            if args.command == "models":
                return _models(client, args, out)
            if args.command == "feed":
                return _feed(client, args, out)
            return _services(client, out)
    except ConfigError as exc:
        print(f"aurisctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        trailing: Sequence[tuple[str, Any]] = (
            (exc.trailing_metadata() or ()) if isinstance(exc, grpc.Call) else ()
        )
        rid = next((str(value) for key, value in trailing if key == "x-request-id"), "")
        # The collector's log lines for this call carry the same request id.
        print(f"aurisctl: {code.name}: {details}" + (f" (request {rid})" if rid else ""), file=sys.stderr)
        return EXIT_UNREACHABLE if code == grpc.StatusCode.UNAVAILABLE else EXIT_RPC


if __name__ == "__main__":
    sys.exit(main())
