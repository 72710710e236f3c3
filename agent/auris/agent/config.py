"""Process configuration: frozen dataclasses loaded from TOML.

Precedence is defaults < TOML file < environment (``PREFIX_KEY``) < command-line
flags. Unknown keys and values of the wrong type are errors, reported in one line
that names the key and the file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["AgentConfig", "ConfigError", "build_config", "load_agent_config"]

T = TypeVar("T")

DEFAULT_COLLECTOR = "127.0.0.1:50051"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or malformed; the message is one line."""


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """Everything ``auris-agent`` needs to run; see packaging/agent.toml for each key."""

    # Collector address, host:port.
    collector: str = DEFAULT_COLLECTOR
    # Plaintext gRPC, for local development only; refuses non-loopback collectors.
    insecure: bool = False
    # mTLS material (PEM files); required unless insecure.
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Renew the enrolled certificate (state_dir/pki) this many days before it expires; 0: never.
    cert_renew_before_days: float = 30.0
    # Identity; empty means "read or create state_dir/agent-id".
    agent_id: str = ""
    # Where the agent keeps its id and sequence counter.
    state_dir: str = "/var/lib/auris-agent"
    # Folder holding *.manifest.json + ONNX files.
    models_dir: str = ""
    # Ed25519 public keys (PEM files) whose model signatures the agent accepts, besides the Auris
    # release keys and the collector's key learnt at enrollment (state_dir/pki/models.pub).
    model_keys: tuple[str, ...] = ()
    # Development only: run models that carry no signature (a bad signature is still refused).
    allow_unsigned_models: bool = False
    # Capture sources: pcap/pcapng files (replay), or one interface (live).
    pcaps: tuple[str, ...] = ()
    interface: str = ""
    bpf_filter: str = ""
    snapshot_length: int = 1536
    promiscuous: bool = True
    idle_timeout_s: int = 120
    active_timeout_s: int = 1800
    # Flows a meter may hold at once (0: no cap); past it the least recently seen are
    # expired early, reported with end reason EVICTED and counted in heartbeats.
    max_live_flows: int = 1_000_000
    # Send flows' feature vectors with their verdicts, for retraining: "anomalous" (flagged flows,
    # the ones analysts label most), "all" (also what the models missed; with the nfstream set a
    # verdict grows from 264 to 520 bytes) or "none".
    send_features: str = "anomalous"
    # Flows scored per onnxruntime call, and its thread count.
    score_batch: int = 64
    score_threads: int = 1
    # Verdicts per uplink message, and unacknowledged messages in flight.
    uplink_batch: int = 256
    uplink_window: int = 8
    # Seconds without an acknowledgement (verdicts in flight) before the stream is dropped and
    # opened again: how long a silent network partition goes unnoticed.
    uplink_ack_timeout_s: float = 60.0
    # The longest wait between reconnection attempts (the waits double up to it, with jitter).
    uplink_backoff_max_s: float = 10.0
    # Replay mode: seconds without an acknowledgement before the agent stops waiting for the
    # collector and exits (what is unsent stays spooled for the next start).
    uplink_deadline_s: float = 300.0
    # Seconds between heartbeats (one is also sent at start and at exit).
    heartbeat_interval_s: float = 30.0
    # On SIGTERM: seconds to keep sending before exiting; the rest stays spooled.
    drain_timeout_s: float = 10.0
    # Spooled verdicts kept while the collector is away; past it the oldest are dropped (counted).
    spool_max_verdicts: int = 1_000_000
    log_level: str = "info"
    # "auto" (JSON unless stderr is a terminal), "text" (human lines) or "json" (one object a line).
    log_format: str = "auto"
    # Prometheus metrics on http://HOST:PORT/metrics (the heartbeat's counters); empty: off.
    metrics_listen: str = ""


def _check_type(name: str, annotation: Any, value: Any) -> Any:
    """Return ``value`` coerced to the field's type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is types.UnionType and type(None) in typing.get_args(annotation):
        (inner,) = (a for a in typing.get_args(annotation) if a is not type(None))
        return _check_type(name, inner, value)
    if origin is tuple and dataclasses.is_dataclass(element := typing.get_args(annotation)[0]):
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{name}: expected a list of tables ([[{name.rsplit(' ', 1)[-1]}]])")
        return tuple(_from_table(f"{name}[{i}]", element, table) for i, table in enumerate(value))
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return tuple(value)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{name}: must not be negative, got {value}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {annotation!r}")  # programming error


def _from_table(name: str, cls: Any, table: Mapping[str, Any]) -> Any:
    """A dataclass instance from one TOML table, with the same checks as top-level keys."""
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        field = key.replace("-", "_")
        if field not in hints:
            raise ConfigError(f"{name}: unknown key {key!r}")
        values[field] = _check_type(f"{name}.{key}", hints[field], value)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        raise ConfigError(f"{name}: missing {', '.join(missing)}")
    try:
        return cls(**values)
    except ValueError as exc:  # the dataclass's own checks (__post_init__)
        raise ConfigError(f"{name}: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None


def build_config(
    cls: type[T],
    *,
    path: str | Path | None = None,
    env_prefix: str = "",
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build a frozen config dataclass from its defaults, a TOML file, the environment and flags.

    ``overrides`` holds values from the command line; ``None`` values are ignored so
    that unset flags do not mask the file.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}

    if path is not None:
        data = _read_toml(Path(path))
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ConfigError(f"config file {path}: unknown key {key!r}")
            values[name] = _check_type(f"{path}: {key}", hints[name], value)

    if env_prefix:
        env = os.environ if environ is None else environ
        for name in fields:
            var = f"{env_prefix}{name.upper()}"
            if var in env:
                raw: Any = env[var]
                if typing.get_origin(hints[name]) is tuple:
                    raw = [part for part in raw.split(",") if part]
                values[name] = _check_type(var, hints[name], raw)

    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in fields:
            raise TypeError(f"unknown override {name!r}")  # programming error
        values[name] = _check_type(f"--{name.replace('_', '-')}", hints[name], value)

    return cls(**values)


def load_agent_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Build and validate the agent's configuration."""
    config = build_config(
        AgentConfig, path=path, env_prefix="AURIS_AGENT_", environ=environ, overrides=overrides
    )
    if config.pcaps and config.interface:
        raise ConfigError("give either pcaps or interface, not both")
    enrolled = [Path(config.state_dir) / "pki" / name for name in ("ca.pem", "agent.pem", "agent.key")]
    unset = not (config.ca_file or config.cert_file or config.key_file)
    if not config.insecure and unset and all(path.is_file() for path in enrolled):  # `auris-agent enroll`
        config = dataclasses.replace(
            config, ca_file=str(enrolled[0]), cert_file=str(enrolled[1]), key_file=str(enrolled[2])
        )
    if not config.insecure and not (config.ca_file and config.cert_file and config.key_file):
        raise ConfigError(
            "TLS needs ca_file, cert_file and key_file (or `auris-agent enroll` first); "
            "pass --insecure for local plaintext development"
        )
    if min(config.score_batch, config.uplink_batch, config.uplink_window, config.spool_max_verdicts) < 1:
        raise ConfigError(
            "score_batch, uplink_batch, uplink_window and spool_max_verdicts must be at least 1"
        )
    if min(config.uplink_ack_timeout_s, config.uplink_backoff_max_s) <= 0:
        raise ConfigError("uplink_ack_timeout_s and uplink_backoff_max_s must be positive")
    if config.cert_renew_before_days < 0:
        raise ConfigError(f"cert_renew_before_days must not be negative, got {config.cert_renew_before_days}")
    if config.send_features not in ("all", "anomalous", "none"):
        raise ConfigError(f"send_features: expected all, anomalous or none, got {config.send_features!r}")
    if config.log_format not in ("auto", "text", "json"):
        raise ConfigError(f"log_format: expected auto, text or json, got {config.log_format!r}")
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log_level: expected debug, info, warning or error, got {config.log_level!r}")
    return config
