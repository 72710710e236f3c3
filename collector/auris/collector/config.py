"""The collector's configuration (TOML, environment ``AURIS_COLLECTOR_*``, flags)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from auris.agent.config import ConfigError, build_config
from auris.agent.uplink import is_loopback_target
from auris.collector.alerts import AlertRule, AlertSink
from auris.collector.siem import SiemSink

__all__ = ["CollectorConfig", "load_collector_config"]


@dataclasses.dataclass(frozen=True)
class CollectorConfig:
    """Everything ``auris-collector serve`` needs; see packaging/collector.toml for each key."""

    # host:port to listen on; port 0 picks a free port.
    listen: str = "127.0.0.1:50051"
    # Plaintext gRPC, for local development only; refuses a non-loopback listen address.
    insecure: bool = False
    # API port for query and admin clients (TLS, API tokens); empty: none. Not used when insecure
    # (the one plaintext port serves everything).
    api_listen: str = "127.0.0.1:50052"
    # TLS: the CA that signs agent certificates, and the collector's own certificate (chain) and key.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # The CA's private key, to sign agent certificates at enrollment (empty: this collector does
    # not enroll agents), and how long those certificates are valid.
    ca_key_file: str = ""
    agent_cert_days: float = 365.0
    # Ed25519 key (`aurisctl ca init` writes models.key) that signs every model registered without
    # a signature; agents learn its public half at enrollment. Empty: unsigned models are refused.
    signing_key_file: str = ""
    # More Ed25519 public keys (PEM) whose model signatures are accepted, besides the release keys.
    model_keys: tuple[str, ...] = ()
    # Development only: register models without a signature when there is no signing key.
    allow_unsigned_models: bool = False
    db: str = "/var/lib/auris-collector/auris.db"
    # "normal": an acknowledged batch survives a collector crash; "full": also an OS crash or
    # power loss, at one fsync per batch.
    sqlite_synchronous: str = "normal"
    # Largest gRPC message accepted, in MiB.
    max_message_mib: int = 16
    # Server-side cap on query page size, and the default when a client asks for 0.
    max_page_size: int = 1000
    default_page_size: int = 100
    # Live subscriptions: verdicts buffered per subscriber before a slow one is cut off, and
    # how many may subscribe at once.
    subscriber_buffer: int = 10_000
    max_subscribers: int = 64
    # Rate limits (token buckets; a rate of 0: no limit). Verdicts a second each agent may send,
    # and how many it may send at once after a quiet spell; calls a second each API token may
    # make, and its burst. A caller over its rate gets RESOURCE_EXHAUSTED; an agent keeps the
    # refused verdicts in its spool and sends them again after the wait the refusal names.
    agent_rate_limit: float = 20_000.0
    agent_rate_burst: float = 100_000.0
    token_rate_limit: float = 1_000.0
    token_rate_burst: float = 2_000.0
    # Calls a second from one source address without valid credentials (enrollment, missing or
    # refused tokens, agent RPCs without a certificate), and the burst.
    peer_rate_limit: float = 20.0
    peer_rate_burst: float = 100.0
    # Once serving, write the bound host:port here (useful with port 0); the API port's too.
    address_file: str = ""
    api_address_file: str = ""
    # Raw verdicts older than this many days (by arrival) are deleted, and beyond this many rows
    # the oldest are (0: keep); per-minute rollups and alerts stay. Checked every
    # retention_interval_s.
    retention_days: float = 0.0
    retention_max_rows: int = 0
    # ... and when the database's used pages exceed this many MiB, the oldest raw verdicts go
    # until it fits (0: no limit). The file does not shrink (free pages are reused); see
    # `aurisctl db vacuum`.
    retention_max_mib: float = 0.0
    # The top-talker summary of a minute goes with the raw verdicts (once none of that minute or
    # an earlier one is left), or this many days later (by scored time); a retention_max_mib the
    # raw rows cannot meet alone takes it with them.
    talker_retention_days: float = 0.0
    retention_interval_s: float = 60.0
    # An agent is offline when its last heartbeat is older than this (3 agent heartbeats).
    agent_offline_after_s: float = 90.0
    # Models to register at start (NAME.manifest.json beside its ONNX file): a version already
    # registered with the same bytes is skipped, a bad one is reported and skipped.
    models_dir: str = ""
    # Feeds: a secret (a file of at least 16 bytes) that turns customer and terminal ids into keyed
    # hashes at ingest, so that the database never holds the raw identifiers; empty: stored as sent.
    feed_hash_key_file: str = ""
    # Signed feed models (domain TRANSACTION and TICK) that score records at ingest; empty: stored
    # unscored. The tick detector by model id, when the folder holds several.
    feed_models_dir: str = ""
    feed_tick_detector: str = ""
    # Alert rules and notification sinks, as [[alert_rules]] and [[alert_sinks]] tables (every
    # key is described in packaging/collector.toml).
    alert_rules: tuple[AlertRule, ...] = ()
    alert_sinks: tuple[AlertSink, ...] = ()
    # SIEM export: verdicts and alert changes as ECS JSON lines, as [[siem_sinks]] tables
    # (docs/siem.md).
    siem_sinks: tuple[SiemSink, ...] = ()
    # Seconds between checks that resolve quiet alerts and forget expired match events.
    alert_check_interval_s: float = 10.0
    # Seconds in-flight RPCs get to finish on shutdown.
    shutdown_grace_s: float = 5.0
    log_level: str = "info"
    # "auto" (JSON unless stderr is a terminal), "text" (human lines) or "json" (one object a line).
    log_format: str = "auto"
    # Prometheus metrics on http://HOST:PORT/metrics; empty: off.
    metrics_listen: str = ""


def load_collector_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> CollectorConfig:
    config = build_config(
        CollectorConfig, path=path, env_prefix="AURIS_COLLECTOR_", environ=environ, overrides=overrides
    )
    if ":" not in config.listen:
        raise ConfigError(f"listen: expected host:port, got {config.listen!r}")
    if config.insecure and not is_loopback_target(config.listen):
        raise ConfigError(f"--insecure refuses to listen on non-loopback address {config.listen}")
    if not config.insecure and not (config.ca_file and config.cert_file and config.key_file):
        raise ConfigError(
            "TLS needs ca_file, cert_file and key_file; pass --insecure for local plaintext development"
        )
    if config.sqlite_synchronous not in ("normal", "full"):
        raise ConfigError(f"sqlite_synchronous: expected normal or full, got {config.sqlite_synchronous!r}")
    if not 1 <= config.max_message_mib <= 512:
        raise ConfigError(f"max_message_mib must be between 1 and 512, got {config.max_message_mib}")
    for rate, burst in (
        ("agent_rate_limit", "agent_rate_burst"),
        ("token_rate_limit", "token_rate_burst"),
        ("peer_rate_limit", "peer_rate_burst"),
    ):
        if getattr(config, rate) < 0:
            raise ConfigError(f"{rate} must not be negative (0: no limit), got {getattr(config, rate)}")
        if getattr(config, rate) > 0 and getattr(config, burst) < 1:
            raise ConfigError(f"{burst} must be at least 1 when {rate} is set, got {getattr(config, burst)}")
    for key in ("retention_days", "retention_max_rows", "retention_max_mib", "talker_retention_days"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key} must not be negative (0: keep), got {getattr(config, key)}")
    if not 1 <= config.default_page_size <= config.max_page_size:
        raise ConfigError("default_page_size must be between 1 and max_page_size")
    for what, names in (
        ("alert_rules", [r.name for r in config.alert_rules]),
        ("alert_sinks", [s.name for s in config.alert_sinks]),
        ("siem_sinks", [s.name for s in config.siem_sinks]),
    ):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{what}: names must be unique ({', '.join(duplicates)} repeated)")
    if config.log_format not in ("auto", "text", "json"):
        raise ConfigError(f"log_format: expected auto, text or json, got {config.log_format!r}")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {config.log_level!r}")
    return config
