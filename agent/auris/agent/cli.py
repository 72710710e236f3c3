"""``auris-agent``: meter flows from captures, score them locally, stream verdicts to the collector.

Every verdict is spooled on disk (state_dir/spool.db) before it is sent and kept until
the collector acknowledges it; a restarted agent sends what is left first, and a
restarted replay resumes after the last spooled flow.

Exit codes: 0 done (or stopped by SIGTERM/SIGINT), 2 bad configuration or usage, 3 no
usable model, or a capture could not be read (verdicts from the readable ones are still
delivered), 4 the collector did not acknowledge everything (the rest stays spooled).

Under systemd (``Type=notify``) it reports READY=1 once metering, RELOADING=1 / READY=1 around
a SIGHUP reload, STOPPING=1 on SIGTERM, and WATCHDOG=1 from its scoring loop (sd_notify.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Only what reading the configuration and starting the first capture need, at import: gRPC,
# onnxruntime, numpy and cryptography (a quarter of a second) are imported once a capture is
# under way (early.py).
# lean first: nfstream imports pandas, which the agent never uses and its venv may not hold (lean.py).
from auris.agent import __version__, lean, live, meterserver, sd_notify  # noqa: F401
from auris.agent.config import AgentConfig, ConfigError, build_config, load_agent_config
from auris.agent.early import EarlyMeter
from auris.agent.logs import configure_logging
from auris.agent.meter import preload_in_meter_processes
from auris.agent.state import agent_identity, lock_state_dir

if TYPE_CHECKING:
    import grpc

    from auris.agent.model_updates import ModelCatalog
    from auris.agent.scoring import ModelSet

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG, EXIT_INPUT, EXIT_DELIVERY = 0, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="auris-agent",
        description="Meter flows, score them with local ONNX models, stream verdicts to the collector.",
        epilog="Exit codes: 0 ok, 2 configuration, 3 models or captures unusable, 4 delivery incomplete "
        "(the rest stays spooled). SIGTERM drains and exits; SIGHUP reloads configuration and models.",
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
    p.add_argument(
        "--reprocess", action="store_true", help="replay captures again even if an earlier run completed them"
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def _catalog(config: AgentConfig) -> ModelCatalog:
    """Where models come from, and the keys they must be signed with; ValueError for a bad key file."""
    from auris.agent.enroll import model_key_file
    from auris.agent.model_updates import ModelCatalog
    from auris.agent.signing import ModelTrust

    state_dir = Path(config.state_dir)
    keys = [Path(k) for k in config.model_keys]
    if model_key_file(state_dir).is_file():
        keys.append(model_key_file(state_dir))
    trust = ModelTrust.load(keys, allow_unsigned=config.allow_unsigned_models)
    return ModelCatalog(Path(config.models_dir), state_dir, trust, config.score_threads)


def _open_models(config: AgentConfig) -> tuple[ModelSet | None, str]:
    """The models to run (those the collector last asked for, else models_dir's), or None and the
    reason none is usable."""
    if not config.models_dir:
        return None, "models_dir is not set; pass --models-dir or set it in the config file"
    models_dir = Path(config.models_dir)
    if not models_dir.is_dir():
        return None, f"models_dir {models_dir} is not a folder"
    try:
        catalog = _catalog(config)
    except ValueError as exc:
        return None, f"models_dir is not usable: {exc}"
    models, refusals, errors = catalog.compose()
    if refusals:
        logger.warning(
            "%d model(s) the collector asked for are refused: %s", len(refusals), refusals[0].reason
        )
    if not models.models:
        return None, errors[0] if errors else f"no *.manifest.json in {models_dir}"
    return models, ""


# Settings the running pipeline cannot change; SIGHUP warns that they need a restart.
_RESTART_ONLY = (
    "collector", "insecure", "ca_file", "cert_file", "key_file", "agent_id", "state_dir", "pcaps",
    "interface", "bpf_filter", "snapshot_length", "promiscuous", "idle_timeout_s", "active_timeout_s",
    "uplink_batch", "uplink_window", "spool_max_verdicts", "max_live_flows", "cert_renew_before_days",
)  # fmt: skip


def _reloader(
    running: AgentConfig, feature_sets: set[str], load: Callable[[], AgentConfig]
) -> Callable[[], tuple[AgentConfig, ModelSet] | None]:
    """SIGHUP: new models and reloadable settings, all or nothing; the capture stays as it runs."""

    def reload() -> tuple[AgentConfig, ModelSet] | None:
        try:
            loaded = load()
        except ConfigError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            return None
        # What the running capture and uplink were built with stays until a restart.
        config = dataclasses.replace(loaded, **{k: getattr(running, k) for k in _RESTART_ONLY})
        models, reason = _open_models(config)
        if models is None:
            logger.error("reload refused, keeping the running models: %s", reason)
            return None
        wanted = {fs.name for fs in models.feature_sets}
        if wanted != feature_sets:
            logger.error(
                "reload refused, keeping the running models: they need feature sets %s, the running "
                "meter computes %s (restart to change them)",
                ", ".join(sorted(wanted)),
                ", ".join(sorted(feature_sets)),
            )
            return None
        changed = [k for k in _RESTART_ONLY if getattr(loaded, k) != getattr(running, k)]
        if changed:
            logger.warning("reload: %s changed; these take effect at the next restart", ", ".join(changed))
        logging.getLogger().setLevel(config.log_level.upper())
        logger.info("reloaded configuration and %d model(s)", len(models.models))
        return config, models

    return reload


def run(
    config: AgentConfig, *, reprocess: bool = False, load: Callable[[], AgentConfig] | None = None
) -> int:
    # The first capture starts now; the agent claims it once its models are loaded (early.py).
    early = EarlyMeter.start(config)
    try:
        return _run(config, reprocess=reprocess, load=load, early=early)
    finally:
        if early is not None:
            early.cancel()  # unless the agent claimed it


def _run(
    config: AgentConfig,
    *,
    reprocess: bool,
    load: Callable[[], AgentConfig] | None,
    early: EarlyMeter | None,
) -> int:
    from auris.agent.daemon import Agent
    from auris.agent.enroll import enrolled_files
    from auris.agent.health import Heartbeat, health_metrics
    from auris.agent.metrics import MetricsServer
    from auris.agent.model_updates import ModelWatcher
    from auris.agent.renewal import CertificateRenewer, ReopenableChannel, finish_interrupted_renewal
    from auris.agent.spool import Spool
    from auris.agent.uplink import Uplink, open_channel

    models, reason = _open_models(config)
    if models is None:
        logger.error("no usable model: %s", reason)
        return EXIT_INPUT if "models_dir is not" not in reason else EXIT_CONFIG
    if not (config.pcaps or config.interface):
        logger.error("nothing to capture: pass --pcap FILE or --interface IFACE")
        return EXIT_CONFIG

    state_dir = Path(config.state_dir)
    try:
        lock_state_dir(state_dir)
        if not config.insecure and (
            done := finish_interrupted_renewal(Path(config.cert_file), Path(config.key_file))
        ):
            logger.warning("%s", done)
        agent_id = agent_identity(state_dir, config.agent_id, "" if config.insecure else config.cert_file)
        spool = Spool(state_dir / "spool.db", config.spool_max_verdicts)
    except (OSError, ValueError) as exc:
        logger.error("state dir %s unusable: %s", state_dir, exc)
        return EXIT_CONFIG

    def connect() -> grpc.Channel:
        return open_channel(
            config.collector,
            insecure=config.insecure,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )

    try:
        # With TLS, a renewed certificate re-opens the channel under the stubs made on it.
        reopenable = None if config.insecure else ReopenableChannel(connect)
        channel = connect() if reopenable is None else reopenable
    except (OSError, ValueError) as exc:
        logger.error("cannot set up the collector channel: %s", exc)
        return EXIT_CONFIG
    if config.insecure:
        logger.warning("INSECURE: plaintext gRPC to %s; for local development only", config.collector)

    backlog = spool.stats.depth
    if backlog:
        logger.info("%d verdicts from an earlier run are still spooled; sending them first", backlog)
    uplink = Uplink(
        channel,
        agent_id,
        spool,
        batch=config.uplink_batch,
        window=config.uplink_window,
        backoff_max_s=config.uplink_backoff_max_s,
        ack_timeout_s=config.uplink_ack_timeout_s,
    )
    agent = Agent(
        config,
        models,
        spool,
        uplink,
        agent_id,
        socket.gethostname(),
        reprocess=reprocess,
        reload=_reloader(config, {fs.name for fs in models.feature_sets}, load) if load else None,
        early=early,
    )

    def stop(signum: int, frame: object) -> None:
        sd_notify.notify("STOPPING=1")
        agent.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, lambda signum, frame: agent.request_reload())
    renewer = None
    if reopenable is not None:
        enrolled = [p.resolve() for p in enrolled_files(state_dir)[1:]]
        renewer = CertificateRenewer(
            channel,
            Path(config.cert_file),
            Path(config.key_file),
            Path(config.ca_file),
            renew_before_days=config.cert_renew_before_days,
            on_renewed=reopenable.reopen,
            renewable=[Path(config.cert_file).resolve(), Path(config.key_file).resolve()] == enrolled,
        )
    snapshot = agent.heartbeat if renewer is None else lambda: renewer.report(agent.heartbeat())
    heartbeat = Heartbeat(channel, snapshot, config.heartbeat_interval_s)
    agent.on_models_swapped = heartbeat.poke
    watcher = ModelWatcher(
        channel,
        agent_id,
        _catalog(config),
        lambda: agent.models,
        agent.offer_models,
        metered={fs.name for fs in models.feature_sets},
    )
    metrics = None
    if config.metrics_listen:
        try:
            metrics = MetricsServer(config.metrics_listen, lambda: health_metrics(snapshot()))
        except (OSError, ValueError) as exc:
            logger.error("cannot serve metrics on %s: %s", config.metrics_listen, exc)
            return EXIT_CONFIG
        metrics.start()
        host = config.metrics_listen.rsplit(":", 1)[0]
        logger.info("metrics on http://%s:%d/metrics", host, metrics.port)
    if renewer is not None:
        renewer.start()
    uplink.start()
    heartbeat.start()
    watcher.start()
    logger.info(
        "agent %s metering %s with %d model(s)", agent_id, ", ".join(agent.sources), len(models.models)
    )
    sd_notify.notify("READY=1", f"STATUS=metering {', '.join(agent.sources)}")
    report = agent.run()
    if metrics is not None:
        metrics.stop()
    watcher.stop()
    if renewer is not None:
        renewer.stop()
    heartbeat.stop(final=True)
    spooled = spool.stats
    stats = uplink.stats
    logger.info(
        "metered %d flows (%d anomalous, %d skipped as already spooled) in %.1fs; %d verdicts acknowledged, "
        "%d resent as duplicates, %d refused, %d reconnects, %d rate-limited, %d failed scoring batches; "
        "spool depth %d, %d dropped by the spool cap, %d for a full disk",
        report.flows,
        report.anomalies,
        report.flows_skipped,
        report.elapsed_s,
        stats.verdicts_acknowledged,
        stats.duplicates,
        stats.rejected,
        stats.reconnects,
        stats.throttled,
        agent.models.errors,
        spooled.depth,
        spooled.dropped - spooled.dropped_disk_full,
        spooled.dropped_disk_full,
    )
    spool.close()
    channel.close()
    if not report.delivered:
        if report.stopped:
            logger.warning("stopped with %d verdicts spooled; they are sent at the next start", spooled.depth)
            return EXIT_OK
        logger.error(
            "collector unreachable (%s); %d verdicts stay spooled in %s for the next start",
            uplink.last_error or "no acknowledgement",
            spooled.depth,
            spool.path,
        )
        return EXIT_DELIVERY
    sources = len(agent.sources)
    if report.sources_failed == sources:
        logger.error("no capture could be read: %s", report.errors[0])
        return EXIT_INPUT
    if report.sources_failed:
        logger.error("%d of %d captures could not be read", report.sources_failed, sources)
        return EXIT_INPUT
    return EXIT_OK


def _enroll_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="auris-agent enroll",
        description="Exchange a one-time enrollment token for this agent's certificate (kept in the state "
        "dir; later runs use it for mTLS).",
        epilog="Exit codes: 0 enrolled, 2 usage or configuration, 4 the collector refused or is unreachable.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (for state_dir and agent_id)")
    p.add_argument("--collector", required=True, metavar="HOST:PORT", help="the collector's API address")
    p.add_argument("--token", required=True, help="from `aurisctl enroll create`")
    p.add_argument(
        "--ca-sha256", required=True, help="the collector CA's sha256, from `aurisctl enroll create`"
    )
    p.add_argument("--state-dir", metavar="DIR")
    p.add_argument(
        "--agent-id", metavar="ID", help="the id to ask for (default: the configured or stored one)"
    )
    return p


def _enroll_main(argv: Sequence[str]) -> int:
    from auris.agent.enroll import EnrollError, enroll

    args = _enroll_parser().parse_args(argv)
    try:
        config = build_config(
            AgentConfig,
            path=args.config,
            env_prefix="AURIS_AGENT_",
            overrides={"state_dir": args.state_dir, "agent_id": args.agent_id},
        )
        state_dir = Path(config.state_dir)
        wanted = agent_identity(state_dir, config.agent_id)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"auris-agent enroll: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        granted = enroll(args.collector, args.token, args.ca_sha256, state_dir, wanted)
    except EnrollError as exc:
        print(f"auris-agent enroll: {exc}", file=sys.stderr)
        return EXIT_DELIVERY
    print(f"auris-agent: enrolled as {granted}; certificate in {state_dir / 'pki'}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["enroll"]:
        return _enroll_main(argv[1:])
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
    configure_logging(config.log_level, config.log_format)
    preload_in_meter_processes(__name__)
    live.install(config.max_live_flows)
    meterserver.start()  # (auris-agent started it already; other entry points: its imports overlap the rest)
    return run(config, reprocess=args.reprocess, load=lambda: load_agent_config(args.config, overrides))


if __name__ == "__main__":
    sys.exit(main())
