"""A small typed client for the collector's query and admin RPCs, used by ``aurisctl`` and the tests."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2

from auris.agent.uplink import open_channel
from auris.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    feed_service_pb2,
    feed_service_pb2_grpc,
    model_pb2,
    query_service_pb2,
    query_service_pb2_grpc,
    verdict_pb2,
)

__all__ = ["EXPORT_COLUMNS", "CollectorClient", "flat_verdict", "verdict_filter"]


def verdict_filter(
    *,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    time_field: query_service_pb2.TimeField.ValueType = query_service_pb2.TIME_FIELD_SCORED,
    anomalous: bool | None = None,
    agent_ids: list[str] | None = None,
    labels: list[str] | None = None,
    ip: str = "",
    model_id: str = "",
    min_score: float | None = None,
) -> query_service_pb2.VerdictFilter:
    """Build a VerdictFilter from Python values; None leaves a field unset."""
    flt = query_service_pb2.VerdictFilter(time_field=time_field, ip=ip, model_id=model_id)
    if since is not None:
        flt.time_range.start_time.FromDatetime(since.astimezone(dt.UTC))
    if until is not None:
        flt.time_range.end_time.FromDatetime(until.astimezone(dt.UTC))
    if anomalous is not None:
        flt.anomalous = anomalous
    if min_score is not None:
        flt.min_score = min_score
    flt.agent_ids.extend(agent_ids or [])
    flt.labels.extend(labels or [])
    return flt


EXPORT_COLUMNS = (
    "id", "agent_id", "sequence", "hostname", "src_ip", "src_port", "dst_ip", "dst_port", "ip_protocol",
    "vlan_id", "first_seen", "last_seen", "scored", "received", "src_to_dst_packets", "dst_to_src_packets",
    "src_to_dst_bytes", "dst_to_src_bytes", "application_name", "model", "label", "anomalous", "score",
    "explanation", "analyst_label", "analyst_note",
)  # fmt: skip


def flat_verdict(stored: verdict_pb2.StoredVerdict) -> dict[str, object]:
    """One stored verdict as a flat row (EXPORT_COLUMNS) for CSV and Parquet; times are ISO-8601 UTC."""
    v = stored.verdict
    decider = next(
        (
            s.score
            for s in v.scores
            if s.model.model_id == v.model.model_id and s.model.version == v.model.version
        ),
        None,
    )

    def iso(ts: timestamp_pb2.Timestamp) -> str:
        return ts.ToDatetime(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z")

    return {
        "id": stored.id,
        "agent_id": v.agent_id,
        "sequence": v.sequence,
        "hostname": v.hostname,
        "src_ip": v.flow.src_ip,
        "src_port": v.flow.src_port,
        "dst_ip": v.flow.dst_ip,
        "dst_port": v.flow.dst_port,
        "ip_protocol": v.flow.ip_protocol,
        "vlan_id": v.flow.vlan_id,
        "first_seen": iso(v.first_seen_time),
        "last_seen": iso(v.last_seen_time),
        "scored": iso(v.scored_time),
        "received": iso(stored.received_time),
        "src_to_dst_packets": v.counters.src_to_dst_packets,
        "dst_to_src_packets": v.counters.dst_to_src_packets,
        "src_to_dst_bytes": v.counters.src_to_dst_bytes,
        "dst_to_src_bytes": v.counters.dst_to_src_bytes,
        "application_name": v.application_name,
        "model": f"{v.model.model_id}@{v.model.version}" if v.model.model_id else "",
        "label": v.label,
        "anomalous": v.anomalous,
        "score": decider,
        "explanation": v.explanation,
        "analyst_label": stored.analyst_label.label,
        "analyst_note": stored.analyst_label.note,
    }


T = TypeVar("T")


def _follow_pages(page: Callable[[str], tuple[Sequence[T], str]], limit: int | None) -> Iterator[T]:
    """Items from successive pages (``page(token)`` -> items, next token) until the end or ``limit``."""
    token = ""
    seen = 0
    while True:
        items, token = page(token)
        for item in items:
            if limit is not None and seen >= limit:
                return
            seen += 1
            yield item
        if not token:
            return


class CollectorClient:
    """Query verdicts from a collector. Use as a context manager, or call close()."""

    def __init__(
        self,
        target: str,
        *,
        insecure: bool = False,
        ca_file: str = "",
        cert_file: str = "",
        key_file: str = "",
        token: str = "",
        timeout_s: float = 30.0,
    ) -> None:
        self._channel = open_channel(
            target, insecure=insecure, ca_file=ca_file, cert_file=cert_file, key_file=key_file, token=token
        )
        self._query = query_service_pb2_grpc.QueryServiceStub(self._channel)
        self._admin = admin_service_pb2_grpc.AdminServiceStub(self._channel)
        self._feeds = feed_service_pb2_grpc.FeedServiceStub(self._channel)
        self._timeout = timeout_s

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def query_page(
        self, flt: query_service_pb2.VerdictFilter, page_size: int = 0, page_token: str = ""
    ) -> query_service_pb2.QueryVerdictsResponse:
        request = query_service_pb2.QueryVerdictsRequest(
            filter=flt, page_size=page_size, page_token=page_token
        )
        response: query_service_pb2.QueryVerdictsResponse = self._query.QueryVerdicts(
            request, timeout=self._timeout
        )
        return response

    def query(
        self, flt: query_service_pb2.VerdictFilter, limit: int | None = None, page_size: int = 0
    ) -> Iterator[verdict_pb2.StoredVerdict]:
        """Every matching verdict, newest first, following the cursor until ``limit``."""

        def page(token: str) -> tuple[Sequence[verdict_pb2.StoredVerdict], str]:
            response = self.query_page(flt, page_size, token)
            return response.verdicts, response.next_page_token

        return _follow_pages(page, limit)

    def subscribe(
        self, flt: query_service_pb2.VerdictFilter, max_batch: int = 1000
    ) -> Iterator[verdict_pb2.StoredVerdict]:
        """New verdicts matching ``flt`` as the collector stores them, until cancelled or cut off.

        The collector sends up to ``max_batch`` verdicts a message (0: one each, as collectors
        before batching did; a batch from those arrives in ``verdict`` too)."""
        request = query_service_pb2.SubscribeVerdictsRequest(filter=flt, max_batch=max_batch)
        for response in self._query.SubscribeVerdicts(request):
            if response.HasField("verdict"):
                yield response.verdict
            yield from response.verdicts

    def aggregate(
        self,
        flt: query_service_pb2.VerdictFilter,
        group_by: list[query_service_pb2.GroupBy.ValueType],
        bucket: dt.timedelta | None = None,
        *,
        rollups: bool = False,
    ) -> list[query_service_pb2.AggregateRow]:
        """Verdict counts per group (and time bucket, when given), from raw rows or rollups."""
        request = query_service_pb2.AggregateVerdictsRequest(filter=flt, group_by=group_by, rollups=rollups)
        if bucket is not None:
            request.bucket.FromTimedelta(bucket)
        response: query_service_pb2.AggregateVerdictsResponse = self._query.AggregateVerdicts(
            request, timeout=self._timeout
        )
        return list(response.rows)

    def top_talkers(
        self,
        flt: query_service_pb2.VerdictFilter,
        metric: query_service_pb2.TalkerMetric.ValueType,
        limit: int = 10,
    ) -> list[query_service_pb2.Talker]:
        return list(self.list_top_talkers(flt, metric, limit).talkers)

    def list_top_talkers(
        self,
        flt: query_service_pb2.VerdictFilter,
        metric: query_service_pb2.TalkerMetric.ValueType,
        limit: int = 10,
        *,
        exact: bool = False,
    ) -> query_service_pb2.ListTopTalkersResponse:
        """Top talkers with whether the answer is exact (``approximate``, each count's error)."""
        request = query_service_pb2.ListTopTalkersRequest(filter=flt, metric=metric, limit=limit, exact=exact)
        response: query_service_pb2.ListTopTalkersResponse = self._query.ListTopTalkers(
            request, timeout=self._timeout
        )
        return response

    def label(self, ids: list[int], label: str, note: str = "", author: str = "") -> int:
        """Label stored verdicts (benign, unsure, or an attack class); returns how many were found."""
        request = query_service_pb2.LabelVerdictsRequest(
            ids=ids, label=verdict_pb2.AnalystLabel(label=label, note=note, author=author)
        )
        response: query_service_pb2.LabelVerdictsResponse = self._query.LabelVerdicts(
            request, timeout=self._timeout
        )
        return response.labeled

    def top_anomalies(
        self, flt: query_service_pb2.VerdictFilter, limit: int = 10
    ) -> list[verdict_pb2.StoredVerdict]:
        """Verdicts flagged anomalous with the highest deciding scores."""
        request = query_service_pb2.ListTopAnomaliesRequest(filter=flt, limit=limit)
        response: query_service_pb2.ListTopAnomaliesResponse = self._query.ListTopAnomalies(
            request, timeout=self._timeout
        )
        return list(response.verdicts)

    def alerts(
        self,
        states: list[admin_service_pb2.AlertState.ValueType] | None = None,
        rules: list[str] | None = None,
        limit: int | None = None,
        page_size: int = 0,
    ) -> Iterator[admin_service_pb2.Alert]:
        """Alerts in these states and of these rules (all when None), newest first."""

        def page(token: str) -> tuple[Sequence[admin_service_pb2.Alert], str]:
            request = admin_service_pb2.ListAlertsRequest(
                states=states or [], rules=rules or [], page_size=page_size, page_token=token
            )
            response: admin_service_pb2.ListAlertsResponse = self._admin.ListAlerts(
                request, timeout=self._timeout
            )
            return response.alerts, response.next_page_token

        return _follow_pages(page, limit)

    def submit_transactions(
        self, transactions: Sequence[feed_service_pb2.Transaction], feature_names: Sequence[str] = ()
    ) -> feed_service_pb2.SubmitTransactionsResponse:
        """Send one batch; the answer counts what was accepted and says why the rest was rejected.
        ``feature_names`` name the feature_values of the records that do not name their own."""
        request = feed_service_pb2.SubmitTransactionsRequest(
            transactions=transactions, feature_names=feature_names
        )
        response: feed_service_pb2.SubmitTransactionsResponse = self._feeds.SubmitTransactions(
            request, timeout=self._timeout
        )
        return response

    def stream_transactions(
        self, requests: Iterator[feed_service_pb2.StreamTransactionsRequest]
    ) -> Iterator[feed_service_pb2.StreamTransactionsResponse]:
        """One answer per request, in order, while the next requests are already on their way
        (``requests`` is read on gRPC's own thread). No deadline: a stream lasts as long as its
        requests come."""
        yield from self._feeds.StreamTransactions(requests)

    def stream_ticks(
        self, requests: Iterator[feed_service_pb2.StreamTicksRequest]
    ) -> Iterator[feed_service_pb2.StreamTicksResponse]:
        """``stream_transactions`` for ticks."""
        yield from self._feeds.StreamTicks(requests)

    def submit_ticks(self, ticks: Sequence[feed_service_pb2.Tick]) -> feed_service_pb2.SubmitTicksResponse:
        response: feed_service_pb2.SubmitTicksResponse = self._feeds.SubmitTicks(
            feed_service_pb2.SubmitTicksRequest(ticks=ticks), timeout=self._timeout
        )
        return response

    def feed_scores(
        self,
        feed_id: str = "",
        since: dt.datetime | None = None,
        anomalous: bool | None = None,
        limit: int | None = None,
        page_size: int = 0,
    ) -> Iterator[feed_service_pb2.FeedScore]:
        """Stored feed records with their scores, newest first, across pages."""

        def page(token: str) -> tuple[Sequence[feed_service_pb2.FeedScore], str]:
            request = feed_service_pb2.QueryFeedScoresRequest(
                feed_id=feed_id, page_size=page_size, page_token=token
            )
            if since is not None:
                request.since_time.FromDatetime(since)
            if anomalous is not None:
                request.anomalous = anomalous
            response: feed_service_pb2.QueryFeedScoresResponse = self._feeds.QueryFeedScores(
                request, timeout=self._timeout
            )
            return response.scores, response.next_page_token

        return _follow_pages(page, limit)

    def feed_rejects(
        self, feed_id: str = "", limit: int | None = None
    ) -> Iterator[feed_service_pb2.StoredReject]:
        """Rejected feed records with their reasons, newest first."""

        def page(token: str) -> tuple[Sequence[feed_service_pb2.StoredReject], str]:
            response: feed_service_pb2.ListFeedRejectsResponse = self._feeds.ListFeedRejects(
                feed_service_pb2.ListFeedRejectsRequest(feed_id=feed_id, page_token=token),
                timeout=self._timeout,
            )
            return response.rejects, response.next_page_token

        return _follow_pages(page, limit)

    def subscribe_feed_scores(
        self, feed_id: str = "", anomalous: bool | None = None
    ) -> Iterator[feed_service_pb2.FeedScore]:
        request = feed_service_pb2.SubscribeFeedScoresRequest(feed_id=feed_id)
        if anomalous is not None:
            request.anomalous = anomalous
        for response in self._feeds.SubscribeFeedScores(request):
            yield response.score

    def list_feeds(self) -> list[admin_service_pb2.FeedInfo]:
        response: admin_service_pb2.ListFeedsResponse = self._admin.ListFeeds(
            admin_service_pb2.ListFeedsRequest(), timeout=self._timeout
        )
        return list(response.feeds)

    def subscribe_alerts(
        self,
        states: list[admin_service_pb2.AlertState.ValueType] | None = None,
        rules: list[str] | None = None,
    ) -> Iterator[admin_service_pb2.Alert]:
        """Every change (opened, new events, acknowledged, resolved) of matching alerts, as it happens."""
        request = admin_service_pb2.SubscribeAlertsRequest(states=states or [], rules=rules or [])
        for response in self._admin.SubscribeAlerts(request):
            yield response.alert

    def acknowledge_alert(self, alert_id: int, note: str = "") -> admin_service_pb2.Alert:
        response: admin_service_pb2.AcknowledgeAlertResponse = self._admin.AcknowledgeAlert(
            admin_service_pb2.AcknowledgeAlertRequest(id=alert_id, note=note), timeout=self._timeout
        )
        return response.alert

    def resolve_alert(self, alert_id: int, note: str = "") -> admin_service_pb2.Alert:
        response: admin_service_pb2.ResolveAlertResponse = self._admin.ResolveAlert(
            admin_service_pb2.ResolveAlertRequest(id=alert_id, note=note), timeout=self._timeout
        )
        return response.alert

    def models(
        self, domain: model_pb2.ModelDomain.ValueType = model_pb2.MODEL_DOMAIN_UNSPECIFIED
    ) -> list[admin_service_pb2.RegisteredModel]:
        """Every registered model version (of one domain, when given)."""
        response: admin_service_pb2.ListModelsResponse = self._admin.ListModels(
            admin_service_pb2.ListModelsRequest(domain=domain), timeout=self._timeout
        )
        return list(response.models)

    def model(self, model_id: str, version: str = "") -> admin_service_pb2.RegisteredModel:
        """One registered version; the production version when ``version`` is empty."""
        request = admin_service_pb2.GetModelRequest(
            model=model_pb2.ModelRef(model_id=model_id, version=version)
        )
        response: admin_service_pb2.GetModelResponse = self._admin.GetModel(request, timeout=self._timeout)
        return response.model

    def register_model(
        self, manifest: model_pb2.ModelManifest, onnx: bytes, chunk: int = 1 << 20
    ) -> admin_service_pb2.RegisteredModel:
        """Upload one model version (the collector signs it when it carries no signature)."""
        parts = [admin_service_pb2.RegisterModelRequest(manifest=manifest, chunk=onnx[:chunk])]
        parts += [
            admin_service_pb2.RegisterModelRequest(chunk=onnx[i : i + chunk])
            for i in range(chunk, len(onnx), chunk)
        ]
        response: admin_service_pb2.RegisterModelResponse = self._admin.RegisterModel(
            iter(parts), timeout=self._timeout
        )
        return response.model

    def promote_model(self, model_id: str, version: str) -> admin_service_pb2.RegisteredModel:
        request = admin_service_pb2.PromoteModelRequest(
            model=model_pb2.ModelRef(model_id=model_id, version=version)
        )
        response: admin_service_pb2.PromoteModelResponse = self._admin.PromoteModel(
            request, timeout=self._timeout
        )
        return response.model

    def rollback_model(self, model_id: str) -> admin_service_pb2.RegisteredModel:
        """Put back the version in production before the current one; returns it."""
        response: admin_service_pb2.RollbackModelResponse = self._admin.RollbackModel(
            admin_service_pb2.RollbackModelRequest(model_id=model_id), timeout=self._timeout
        )
        return response.model

    def retire_model(self, model_id: str, version: str) -> admin_service_pb2.RegisteredModel:
        request = admin_service_pb2.RetireModelRequest(
            model=model_pb2.ModelRef(model_id=model_id, version=version)
        )
        response: admin_service_pb2.RetireModelResponse = self._admin.RetireModel(
            request, timeout=self._timeout
        )
        return response.model

    def shadow_model(
        self, model_id: str, version: str, enabled: bool = True
    ) -> admin_service_pb2.RegisteredModel:
        request = admin_service_pb2.ShadowModelRequest(
            model=model_pb2.ModelRef(model_id=model_id, version=version), enabled=enabled
        )
        response: admin_service_pb2.ShadowModelResponse = self._admin.ShadowModel(
            request, timeout=self._timeout
        )
        return response.model

    def compare_models(
        self, model_id: str, version: str, since: dt.datetime | None = None, max_verdicts: int = 0
    ) -> admin_service_pb2.CompareModelsResponse:
        """A shadow version's recorded scores beside production's on the same flows."""
        request = admin_service_pb2.CompareModelsRequest(
            model=model_pb2.ModelRef(model_id=model_id, version=version), max_verdicts=max_verdicts
        )
        if since is not None:
            request.time_range.start_time.FromDatetime(since)
        response: admin_service_pb2.CompareModelsResponse = self._admin.CompareModels(
            request, timeout=self._timeout
        )
        return response

    def explain_verdict(
        self, verdict_id: int, model_id: str = "", top: int = 10
    ) -> admin_service_pb2.ExplainVerdictResponse:
        """Per-feature contributions of a tree classifier to one stored verdict's score."""
        request = admin_service_pb2.ExplainVerdictRequest(id=verdict_id, model_id=model_id, top=top)
        response: admin_service_pb2.ExplainVerdictResponse = self._admin.ExplainVerdict(
            request, timeout=self._timeout
        )
        return response

    def revoke_agent(self, agent_id: str, reason: str = "") -> None:
        self._admin.RevokeAgent(
            admin_service_pb2.RevokeAgentRequest(agent_id=agent_id, reason=reason), timeout=self._timeout
        )

    def create_enrollment_token(
        self, ttl: dt.timedelta, note: str = ""
    ) -> admin_service_pb2.CreateEnrollmentTokenResponse:
        request = admin_service_pb2.CreateEnrollmentTokenRequest(note=note)
        request.ttl.FromTimedelta(ttl)
        response: admin_service_pb2.CreateEnrollmentTokenResponse = self._admin.CreateEnrollmentToken(
            request, timeout=self._timeout
        )
        return response

    def create_api_token(
        self, name: str, role: admin_service_pb2.Role.ValueType, ttl: dt.timedelta | None = None
    ) -> tuple[str, str]:
        """A new API token; (token, token_id). The token is shown once."""
        request = admin_service_pb2.CreateApiTokenRequest(name=name, role=role)
        if ttl is not None:
            request.ttl.FromTimedelta(ttl)
        response: admin_service_pb2.CreateApiTokenResponse = self._admin.CreateApiToken(
            request, timeout=self._timeout
        )
        return response.token, response.token_id

    def revoke_api_token(self, token_id: str) -> None:
        self._admin.RevokeApiToken(
            admin_service_pb2.RevokeApiTokenRequest(token_id=token_id), timeout=self._timeout
        )

    def audit_events(
        self, since: dt.datetime | None = None, limit: int | None = None
    ) -> Iterator[admin_service_pb2.AuditEvent]:
        """Audit events, newest first."""

        def page(token: str) -> tuple[Sequence[admin_service_pb2.AuditEvent], str]:
            request = admin_service_pb2.ListAuditEventsRequest(page_token=token)
            if since is not None:
                request.since_time.FromDatetime(since.astimezone(dt.UTC))
            response: admin_service_pb2.ListAuditEventsResponse = self._admin.ListAuditEvents(
                request, timeout=self._timeout
            )
            return response.events, response.next_page_token

        return _follow_pages(page, limit)

    def list_agents(self) -> list[admin_service_pb2.AgentInfo]:
        response = self._admin.ListAgents(admin_service_pb2.ListAgentsRequest(), timeout=self._timeout)
        return list(response.agents)

    def get_agent(self, agent_id: str) -> admin_service_pb2.AgentInfo:
        response = self._admin.GetAgent(
            admin_service_pb2.GetAgentRequest(agent_id=agent_id), timeout=self._timeout
        )
        return response.agent

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CollectorClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
