"""``auris-agent``: meter flows from captures, score them locally, stream verdicts to the collector.

Exit codes: 0 done, 2 bad configuration or usage, 3 no usable model, or a capture could
not be read (verdicts from the readable ones are still delivered), 4 verdicts could not be
delivered (the collector refused them or stayed unreachable).
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from auris.agent import __version__
from auris.agent.config import AgentConfig, ConfigError, load_agent_config
from auris.agent.meter import MeterOptions, MeterStats, meter_flows
from auris.agent.scoring import load_models
from auris.agent.state import SequenceCounter, agent_identity
from auris.agent.uplink import Uplink, open_channel
from auris.agent.verdicts import build_verdict
from auris.v1 import verdict_pb2
from google.protobuf import timestamp_pb2

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG, EXIT_INPUT, EXIT_DELIVERY = 0, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="auris-agent",
        description="Meter flows, score them with local ONNX models, stream verdicts to the collector.",
        epilog="Exit codes: 0 ok, 2 configuration, 3 models or captures unusable, 4 delivery failed.",
    )
    p.add_argument("--version", action="version", version=f"auris-agent {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--pcap", metavar="FILE", action="append", dest="pcaps", help="replay a pcap/pcapng (repeatable)"
    )
    src.add_argument("--interface", metavar="IFACE", help="capture live on this interface")
    p.add_argument("--collector", metavar="HOST:PORT", help="collector address")
    p.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="plaintext gRPC to a loopback collector (local development only)",
    )
    p.add_argument("--models-dir", metavar="DIR", help="folder of *.manifest.json + ONNX models")
    p.add_argument("--state-dir", metavar="DIR", help="where the agent keeps its id and sequence counter")
    p.add_argument("--agent-id", metavar="ID", help="agent identity (default: stored in the state dir)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


class _Stop:
    """Set by SIGTERM/SIGINT; the metering loop checks it between flows."""

    requested = False

    @classmethod
    def handler(cls, signum: int, frame: FrameType | None) -> None:
        cls.requested = True


def run(config: AgentConfig) -> int:
    if not config.models_dir:
        logger.error("models_dir is not set; pass --models-dir or set it in the config file")
        return EXIT_CONFIG
    models_dir = Path(config.models_dir)
    if not models_dir.is_dir():
        logger.error("models_dir %s is not a folder", models_dir)
        return EXIT_CONFIG
    models, errors = load_models(models_dir, threads=config.score_threads)
    if not models.models:
        reason = errors[0] if errors else f"no *.manifest.json in {models_dir}"
        logger.error("no usable model: %s", reason)
        return EXIT_INPUT
    sources = list(config.pcaps) or ([config.interface] if config.interface else [])
    if not sources:
        logger.error("nothing to capture: pass --pcap FILE or --interface IFACE")
        return EXIT_CONFIG

    state_dir = Path(config.state_dir)
    try:
        agent_id = agent_identity(state_dir, config.agent_id)
        sequences = SequenceCounter(state_dir / "sequence")
    except (OSError, ValueError) as exc:
        logger.error("state dir %s unusable: %s", state_dir, exc)
        return EXIT_CONFIG
    hostname = socket.gethostname()

    try:
        channel = open_channel(
            config.collector,
            insecure=config.insecure,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )
    except (OSError, ValueError) as exc:
        logger.error("cannot set up the collector channel: %s", exc)
        return EXIT_CONFIG
    if config.insecure:
        logger.warning("INSECURE: plaintext gRPC to %s; for local development only", config.collector)

    uplink = Uplink(channel, agent_id, window=config.uplink_window, give_up_after_s=config.uplink_deadline_s)
    uplink.start()
    signal.signal(signal.SIGTERM, _Stop.handler)
    signal.signal(signal.SIGINT, _Stop.handler)

    options = MeterOptions(
        bpf_filter=config.bpf_filter,
        snapshot_length=config.snapshot_length,
        promiscuous=config.promiscuous,
        idle_timeout_s=config.idle_timeout_s,
        active_timeout_s=config.active_timeout_s,
    )
    meter_stats = MeterStats()
    started = time.monotonic()
    flows = anomalies = 0
    pending: list[Any] = []
    outgoing: list[verdict_pb2.Verdict] = []

    def score_pending() -> None:
        nonlocal anomalies
        if not pending:
            return
        scored_time = timestamp_pb2.Timestamp()
        scored_time.GetCurrentTime()
        for flow, scores in zip(pending, models.score([f.features for f in pending]), strict=True):
            verdict = build_verdict(
                agent_id=agent_id,
                sequence=sequences.next(),
                flow=flow,
                scores=scores,
                hostname=hostname,
                scored_time=scored_time,
            )
            anomalies += verdict.anomalous
            outgoing.append(verdict)
        pending.clear()
        while len(outgoing) >= config.uplink_batch:
            uplink.submit(outgoing[: config.uplink_batch])
            del outgoing[: config.uplink_batch]

    logger.info("agent %s metering %s with %d model(s)", agent_id, ", ".join(sources), len(models.models))
    try:
        for flow in meter_flows(sources, models.feature_sets, options, meter_stats):
            pending.append(flow)
            flows += 1
            if len(pending) >= config.score_batch:
                score_pending()
            if _Stop.requested:
                logger.info("stop requested; flushing %d flows", len(pending) + len(outgoing))
                break
        score_pending()
        uplink.submit(outgoing)
        outgoing.clear()
    except RuntimeError as exc:  # the uplink failed for good while we were producing
        logger.error("%s", exc)
        uplink.abort()
        return EXIT_DELIVERY
    delivered = uplink.close()
    elapsed = time.monotonic() - started
    logger.info(
        "metered %d flows (%d anomalous) in %.1fs; %d verdicts acknowledged, %d resent as duplicates, "
        "%d reconnects, %d failed scoring batches",
        flows,
        anomalies,
        elapsed,
        uplink.stats.verdicts_acknowledged,
        uplink.stats.duplicates,
        uplink.stats.reconnects,
        models.errors,
    )
    if not delivered:
        logger.error("%s", uplink.error or f"{uplink.unacknowledged} verdicts not acknowledged")
        return EXIT_DELIVERY
    if meter_stats.sources_failed == len(sources):
        logger.error("no capture could be read: %s", meter_stats.errors[0])
        return EXIT_INPUT
    if meter_stats.sources_failed:
        logger.error("%d of %d captures could not be read", meter_stats.sources_failed, len(sources))
        return EXIT_INPUT
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {
        "pcaps": args.pcaps,
        "interface": args.interface,
        "collector": args.collector,
        "insecure": args.insecure,
        "models_dir": args.models_dir,
        "state_dir": args.state_dir,
        "agent_id": args.agent_id,
        "log_level": args.log_level,
    }
    try:
        config = load_agent_config(args.config, overrides)
    except ConfigError as exc:
        print(f"auris-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print("auris-agent: configuration ok")
        return EXIT_OK
    _configure_logging(config.log_level)
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
