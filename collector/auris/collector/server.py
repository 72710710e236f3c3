"""The collector's gRPC server: services, health checking, reflection, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from auris.agent.metrics import Metric, MetricsServer
from auris.agent.signing import ModelTrust, load_private_key, public_key_pem
from auris.collector.alerts import Alerts, Notifier
from auris.collector.auth import AuthInterceptor, Authority
from auris.collector.broker import Broker, NewVerdict
from auris.collector.config import CollectorConfig
from auris.collector.feeds import FeedScorers, FeedServicer, FeedStore, add_feed_service
from auris.collector.limits import RateLimits
from auris.collector.pki import AgentSigner
from auris.collector.registry import ModelRegistry
from auris.collector.services import AdminServicer, AgentServicer, QueryServicer
from auris.collector.siem import SiemExport
from auris.collector.store import VerdictStore
from auris.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agent_service_pb2,
    agent_service_pb2_grpc,
    feed_service_pb2,
    query_service_pb2,
    query_service_pb2_grpc,
)

__all__ = ["RELOADABLE", "Collector"]

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    query_service_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
    feed_service_pb2.DESCRIPTOR.services_by_name["FeedService"].full_name,
)

# What SIGHUP takes up while serving (Collector.reload); anything else waits for a restart.
RELOADABLE = ("alert_rules", "alert_sinks", "siem_sinks", "alert_check_interval_s", "log_level")


def _named_changes(what: str, old: tuple[Any, ...], new: tuple[Any, ...]) -> str:
    """What changed in a list of named tables: "alert_rules (+added, -removed, ~changed)"."""
    before, after = {x.name: x for x in old}, {x.name: x for x in new}
    parts = [f"+{n}" for n in after if n not in before] + [f"-{n}" for n in before if n not in after]
    parts += [f"~{n}" for n in after if n in before and before[n] != after[n]]
    return f"{what} ({', '.join(parts)})"


class Collector:
    """A running collector: ``await start()``, then ``await stop()``."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.store = VerdictStore(Path(config.db), config.sqlite_synchronous)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auris-writer")
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="auris-reader")
        # Feed batches are read and validated here while the writer stores earlier ones.
        self._feed_preparer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auris-feed-prepare")
        # ... and scored here (onnxruntime releases the GIL) while the writer stores the one before.
        self._feed_scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auris-feed-score")
        # ... and their answers filled with the stored scores here, off the event loop.
        self._feed_answerer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auris-feed-answer")
        limit = config.max_message_mib * 1024 * 1024
        self.authority = Authority(self.store, insecure=config.insecure)
        self.signer = (
            AgentSigner(Path(config.ca_file), Path(config.ca_key_file), config.agent_cert_days)
            if config.ca_key_file
            else None
        )
        self.limits = RateLimits(
            config.agent_rate_limit,
            config.agent_rate_burst,
            config.token_rate_limit,
            config.token_rate_burst,
            config.peer_rate_limit,
            config.peer_rate_burst,
        )
        self._server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.authority, self._writer, self.limits)],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        self._health = HealthServicer()
        self.broker: Broker[NewVerdict] = Broker(config.subscriber_buffer, config.max_subscribers)
        # SIEM sinks read the database on threads of their own (siem.py); alert changes reach them
        # through the alert outbox.
        self.siem = SiemExport(self.store, config.siem_sinks, Path(config.db).parent)
        self.alerts = Alerts(self.store, config.alert_rules, config.alert_sinks, self.siem.outboxes())
        signing_key = load_private_key(Path(config.signing_key_file)) if config.signing_key_file else None
        self.registry = ModelRegistry(
            self.store,
            ModelTrust.load(
                [Path(k) for k in config.model_keys], allow_unsigned=config.allow_unsigned_models
            ),
            signing_key,
        )
        if config.alert_rules:
            self.store.on_ingest = self.alerts.evaluate
        self.alert_broker: Broker[admin_service_pb2.Alert] = Broker(
            config.subscriber_buffer, config.max_subscribers
        )
        self.notifier = self._notifier() if config.alert_sinks else None
        # The agent and admin servicers leave RPCs of later issues to the generated bases, which
        # answer UNIMPLEMENTED; the type stubs call those methods abstract, hence the ignores.
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(
                self.store,
                self._writer,
                self._readers,
                self.broker,
                self._alerts_changed,
                self.authority,
                self.signer,
                self.registry,
                public_key_pem(signing_key.public_key()) if signing_key else "",
                on_heartbeat=self.alerts.evaluate_heartbeat,
            ),
            self._server,
        )
        query_service_pb2_grpc.add_QueryServiceServicer_to_server(
            QueryServicer(
                self.store,
                self._readers,
                self._writer,
                config.default_page_size,
                config.max_page_size,
                self.broker,
            ),
            self._server,
        )
        self.feeds = FeedStore(self.store, self._evaluate_feed, lambda: self.alerts.has_feed_rules)
        self.feed_broker: Broker[feed_service_pb2.FeedScore] = Broker(
            config.subscriber_buffer, config.max_subscribers
        )
        hash_key = Path(config.feed_hash_key_file).read_bytes().strip() if config.feed_hash_key_file else None
        if hash_key is not None and len(hash_key) < 16:
            raise ValueError(
                f"feed_hash_key_file {config.feed_hash_key_file}: the key needs at least 16 bytes"
            )
        scorers = (
            FeedScorers(
                Path(config.feed_models_dir),
                self.registry.trust,
                config.feed_tick_detector or None,
                history=self.feeds,
            )
            if config.feed_models_dir
            else None
        )
        if scorers is not None:
            for reason in scorers.refused:
                logger.error("feed model refused: %s", reason)
            logger.info("feed models: %s", ", ".join(scorers.models) or "none usable")
        add_feed_service(
            FeedServicer(
                self.feeds,
                self._writer,
                self._readers,
                self.feed_broker,
                hash_key=hash_key,
                score_transactions=scorers.transactions if scorers else None,
                score_ticks=scorers.ticks if scorers else None,
                default_page=config.default_page_size,
                max_page=config.max_page_size,
                alerts_changed=self._alerts_changed,
                preparer=self._feed_preparer,
                scorer=self._feed_scorer,
                answerer=self._feed_answerer,
            ),
            self._server,
        )
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(
                self.store,
                self._readers,
                self._writer,
                config.agent_offline_after_s,
                self.alerts,
                self.alert_broker,
                self.registry,
                self._alerts_changed,
                config.default_page_size,
                config.max_page_size,
                self.authority,
                self.signer.ca_sha256 if self.signer else "",
                feeds=self.feeds,
            ),
            self._server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (
                *SERVICE_NAMES,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._server,
        )
        self.port = 0
        self.api_port = 0
        self.metrics: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._maintaining: asyncio.Task[None] | None = None

    def _notifier(self) -> Notifier:
        return Notifier(
            self.store, self.config.alert_sinks, Path(self.config.db).with_name("alerts-dead-letter.jsonl")
        )

    def _evaluate_feed(
        self, conn: sqlite3.Connection, scores: list[feed_service_pb2.FeedScore], now_ns: int
    ) -> list[int]:
        # Feed rules come and go with SIGHUP; without any, a feed batch costs nothing here.
        return self.alerts.evaluate_feed(conn, scores, now_ns) if self.alerts.has_feed_rules else []

    async def _alerts_changed(self, ids: list[int]) -> None:
        """After a commit that changed alerts: wake the notifier and the SIEM sinks, tell alert
        subscribers."""
        if self.notifier is not None:
            self.notifier.wake()
        self.siem.wake()
        if self.alert_broker.active:
            changed = await asyncio.get_running_loop().run_in_executor(self._readers, self.alerts.get, ids)
            self.alert_broker.publish(changed)

    def _bind(self) -> int:
        """Open the agent port (mTLS: a client certificate from our CA is required at the handshake)
        and the API port (TLS; callers present API tokens). Insecure: one plaintext port."""
        if self.config.insecure:
            return self._server.add_insecure_port(self.config.listen)
        chain = Path(self.config.cert_file).read_bytes()
        key = Path(self.config.key_file).read_bytes()
        agents = grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=Path(self.config.ca_file).read_bytes(), require_client_auth=True
        )
        port = self._server.add_secure_port(self.config.listen, agents)
        if self.config.api_listen:
            self.api_port = self._server.add_secure_port(
                self.config.api_listen, grpc.ssl_server_credentials([(key, chain)])
            )
            if self.api_port == 0:
                raise OSError(f"cannot listen on {self.config.api_listen}")
        return port

    @property
    def api_address(self) -> str:
        """Where query and admin clients connect (the agent port too, in insecure mode)."""
        if self.config.insecure or not self.api_port:
            return self.address
        return f"{self.config.api_listen.rsplit(':', 1)[0]}:{self.api_port}"

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def start(self) -> None:
        if self.config.models_dir:
            self._import_models(Path(self.config.models_dir))
        self.port = self._bind()
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self._server.start()
        self.store.checkpoint_in_background()
        self.store.summarise_in_background()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        loop = asyncio.get_running_loop()
        if (
            self.config.retention_days > 0
            or self.config.retention_max_rows > 0
            or self.config.retention_max_mib > 0
        ):
            self._tasks.append(loop.create_task(self._retain_forever()))
        if self.config.alert_rules:
            self._maintaining = loop.create_task(self._maintain_alerts_forever())
        if self.notifier is not None:
            self.notifier.start()
        self.siem.start()
        if self.config.metrics_listen:
            self.metrics = MetricsServer(self.config.metrics_listen, self._metrics)
            self.metrics.start()
        if self.config.address_file:
            Path(self.config.address_file).write_text(self.address + "\n", encoding="utf-8")
        if self.config.api_address_file:
            Path(self.config.api_address_file).write_text(self.api_address + "\n", encoding="utf-8")
        logger.info(
            "collector listening on %s (%s), database %s",
            self.address,
            "INSECURE plaintext" if self.config.insecure else "mTLS",
            self.store.path,
        )

    def _import_models(self, folder: Path) -> None:
        if not folder.is_dir():
            raise OSError(f"models_dir {folder} is not a directory")
        result = self.registry.import_dir(folder)
        for reason in result.refused:
            logger.error("model refused: %s", reason)
        logger.info(
            "models from %s: %d registered, %d already known, %d refused",
            folder, len(result.registered), len(result.unchanged), len(result.refused),
        )  # fmt: skip

    async def _retain_forever(self) -> None:
        loop = asyncio.get_running_loop()
        max_age_ns = int(self.config.retention_days * 86_400e9)
        talker_keep_ns = int(self.config.talker_retention_days * 86_400e9)
        while True:
            deleted = await loop.run_in_executor(
                self._writer,
                functools.partial(
                    self.store.retain,
                    max_age_ns,
                    self.config.retention_max_rows,
                    talker_keep_ns=talker_keep_ns,
                ),
            )
            if self.config.retention_max_mib > 0:
                deleted += await loop.run_in_executor(
                    self._writer,
                    self.store.retain_size,
                    int(self.config.retention_max_mib * 1024 * 1024),
                    talker_keep_ns,
                )
            if deleted:
                logger.info("retention: deleted %d raw verdicts (rollups kept)", deleted)
            await asyncio.sleep(self.config.retention_interval_s)

    async def _maintain_alerts_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            resolved = await loop.run_in_executor(self._writer, self.alerts.maintain)
            if resolved:
                logger.info("alerts: resolved %d quiet alerts", len(resolved))
                await self._alerts_changed(resolved)
            # Read each round: SIGHUP may change it.
            await asyncio.sleep(self.config.alert_check_interval_s)

    async def reload(self, new: CollectorConfig) -> tuple[list[str], list[str]]:
        """Take up the RELOADABLE settings of ``new`` (SIGHUP): alert rules and sinks, SIEM sinks,
        the alert check interval, the log level. Returns what changed now and what changed but
        waits for a restart. OSError or ValueError: refused, the running configuration stays."""
        old = self.config
        changed = [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]
        now = [name for name in changed if name in RELOADABLE]
        later = [name for name in changed if name not in RELOADABLE]
        loop = asyncio.get_running_loop()
        if "siem_sinks" in now:
            # First: it opens the new files, and an unwritable path refuses the whole reload.
            await loop.run_in_executor(None, self.siem.replace, new.siem_sinks)
        if {"alert_rules", "alert_sinks", "siem_sinks"} & set(now):
            # On the writer thread, so that no ingest transaction sees half of the change.
            def configure() -> None:
                self.alerts.configure(new.alert_rules, new.alert_sinks, self.siem.outboxes())
                self.store.on_ingest = self.alerts.evaluate if new.alert_rules else None

            await loop.run_in_executor(self._writer, configure)
            await loop.run_in_executor(None, self.siem.forget_removed)
        self.config = dataclasses.replace(old, **{name: getattr(new, name) for name in now})
        if "alert_sinks" in now:
            if self.notifier is None and new.alert_sinks:
                self.notifier = self._notifier()
                self.notifier.start()
            elif self.notifier is not None:
                self.notifier.set_sinks(new.alert_sinks)
                self.notifier.wake()
        if new.alert_rules and (self._maintaining is None or self._maintaining.done()):
            self._maintaining = loop.create_task(self._maintain_alerts_forever())
        if "log_level" in now:
            logging.getLogger().setLevel(new.log_level.upper())
        described = {
            "alert_rules": _named_changes("alert_rules", old.alert_rules, new.alert_rules),
            "alert_sinks": _named_changes("alert_sinks", old.alert_sinks, new.alert_sinks),
            "siem_sinks": _named_changes("siem_sinks", old.siem_sinks, new.siem_sinks),
            "log_level": f"log_level ({new.log_level})",
        }
        return [described.get(name, name) for name in now], later

    async def wait(self) -> None:
        await self._server.wait_for_termination()

    def _metrics(self) -> list[Metric]:
        """What a scrape reports: cheap queries and the brokers' counts, read when asked."""
        reader = self.store.reader()
        (stored,) = reader.execute("SELECT COALESCE(MAX(id), 0) FROM verdicts").fetchone()
        out = [
            Metric("auris_collector_verdicts_stored_total", "counter", "Verdicts ever stored.", stored),
            Metric("auris_collector_database_bytes", "gauge", "Bytes the database's pages hold.",
                   self.store.size_bytes()),
            Metric("auris_collector_subscribers", "gauge", "Live subscriptions.",
                   self.broker.subscribers + self.alert_broker.subscribers + self.feed_broker.subscribers),
        ]  # fmt: skip
        for kind, buckets in (
            ("agent", self.limits.agents),
            ("token", self.limits.tokens),
            ("peer", self.limits.peers),
        ):
            out.append(Metric("auris_collector_rate_limited_total", "counter",
                              "Requests refused for being over a rate limit (agent: verdict batches,"
                              " token: calls, peer: calls without credentials from one address).",
                              buckets.refused, {"kind": kind}))  # fmt: skip
        offline_ns = int(self.config.agent_offline_after_s * 1e9)
        states: dict[str, int] = {"online": 0, "offline": 0, "revoked": 0}
        for agent in self.store.agents(offline_ns):
            states[admin_service_pb2.AgentState.Name(agent.state).removeprefix("AGENT_STATE_").lower()] += 1
        out += [
            Metric("auris_collector_agents", "gauge", "Agents by state.", n, {"state": k})
            for k, n in states.items()
        ]
        open_alerts = dict(
            reader.execute("SELECT state, COUNT(*) FROM alerts WHERE state != 3 GROUP BY state")
        )
        for state, name in (
            (admin_service_pb2.ALERT_STATE_OPEN, "open"),
            (admin_service_pb2.ALERT_STATE_ACKNOWLEDGED, "acknowledged"),
        ):
            out.append(Metric("auris_collector_alerts", "gauge", "Alerts not resolved, by state.",
                              open_alerts.get(state, 0), {"state": name}))  # fmt: skip
        (outbox,) = reader.execute("SELECT COUNT(*) FROM alert_outbox").fetchone()
        out.append(
            Metric(
                "auris_collector_alert_notifications_pending",
                "gauge",
                "Notifications not yet delivered.",
                outbox,
            )
        )
        for name, written in self.siem.exported().items():
            text = "Records a SIEM sink wrote since start."
            out.append(Metric("auris_collector_siem_records_total", "counter", text, written, {"sink": name}))
        for name, behind in self.siem.behind().items():
            text = "Verdicts stored after a SIEM sink's cursor."
            out.append(Metric("auris_collector_siem_verdicts_behind", "gauge", text, behind, {"sink": name}))
        for feed in self.feeds.feeds():
            labels = {"feed": feed.feed_id}
            out.append(Metric("auris_collector_feed_records_total", "counter", "Feed records accepted.",
                              feed.records_accepted, labels))  # fmt: skip
            out.append(Metric("auris_collector_feed_rejects_total", "counter", "Feed records rejected.",
                              feed.records_rejected, labels))  # fmt: skip
        for model in self.registry.models(offline_after_ns=offline_ns):
            if model.stage == admin_service_pb2.MODEL_STAGE_PRODUCTION:
                labels = {"model": model.manifest.model_id, "version": model.manifest.version}
                running = model.rollout.agents_running
                text = "Online agents running the production version."
                out.append(Metric("auris_collector_model_agents_running", "gauge", text, running, labels))
        return out

    async def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        for task in [*self._tasks, *([self._maintaining] if self._maintaining else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.config.shutdown_grace_s)
        if self.notifier is not None:
            self.notifier.stop()
        # The sinks finish the batch in hand; their cursors keep the place of the rest.
        await asyncio.get_running_loop().run_in_executor(None, self.siem.stop)
        # In the feed pipeline's order: each stage hands batches to the next (feeds._chain).
        self._feed_preparer.shutdown(wait=True)
        self._feed_scorer.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._feed_answerer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.store.close()
        logger.info("collector stopped")
