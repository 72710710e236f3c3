"""gRPC servicers: the agent-facing verdict stream and the query service.

Domain errors become gRPC statuses here and only here: ValueError ->
INVALID_ARGUMENT, LookupError -> NOT_FOUND; details are one line, never a traceback.
RPCs of the contract that no servicer overrides yet answer UNIMPLEMENTED (the
generated base classes do that); docs/ROADMAP.md says when they come.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from auris.agent.wire import field_tag, varint
from auris.collector.alerts import Alerts, AlertStateError, alert_wanted
from auris.collector.auth import Authority, Refused, current_principal, valid_agent_id
from auris.collector.broker import Broker, NewVerdict, check_filter, compile_filter, follow
from auris.collector.explain import Explainers
from auris.collector.feeds import FeedStore
from auris.collector.ingest import GroupCommitter
from auris.collector.pki import AgentSigner, csr_common_name
from auris.collector.registry import ModelRegistry, StageError
from auris.collector.store import (
    _INSERT_COLUMNS,
    IngestBatch,
    IngestResult,
    Row,
    SequenceConflict,
    VerdictStore,
)
from auris.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agent_service_pb2,
    agent_service_pb2_grpc,
    model_pb2,
    query_service_pb2,
    query_service_pb2_grpc,
    verdict_pb2,
)

__all__ = [
    "REJECTED_SEQUENCE_KEY",
    "STORED_SEQUENCE_KEY",
    "AdminServicer",
    "AgentServicer",
    "InvalidVerdict",
    "QueryServicer",
    "validate_batch",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M")

# Called with the ids of alerts that changed, once their change is committed.
AlertsChanged = Callable[[list[int]], Awaitable[None]]


def _status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, AlertStateError | StageError):
        return grpc.StatusCode.FAILED_PRECONDITION
    # OverflowError: a request's number beyond SQLite's signed 64-bit integers (an id of 2**64-1).
    if isinstance(exc, ValueError | OverflowError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, LookupError):
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.INTERNAL


async def _run(
    context: grpc.aio.ServicerContext[Any, Any],
    executor: ThreadPoolExecutor,
    fn: Callable[..., T],
    *args: Any,
) -> T:
    """Run store work ``fn(*args)`` on ``executor``; a domain error becomes a one-line gRPC status."""
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    except (ValueError, LookupError, AlertStateError, StageError) as exc:
        await context.abort(_status_for(exc), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except OverflowError as exc:
        await context.abort(_status_for(exc), f"a number in the request is out of range ({exc})")
    raise AssertionError("unreachable")  # context.abort always raises


# SQLite integers are signed 64-bit; packet and byte totals add two counters.
_MAX_SEQUENCE = 2**63 - 1
_MAX_COUNTER = 2**62
# Times are stored in ns in SQLite's signed 64-bit integers: up to 2262-04-11 (the protobuf
# Timestamp goes to 9999, whose ns would overflow the column and fail the whole group commit).
# (auris.agent.verdicts.MAX_TIME_SECONDS, where agents clamp to it; not imported: that module
# pulls in the meter and nfstream, which the collector does not install.)
_MAX_SECONDS = (2**63 - 1) // 1_000_000_000 - 1
# Trailing metadata naming the highest sequence of a refused batch, so the agent can drop
# exactly that batch; a refusal without it concerns the whole stream.
REJECTED_SEQUENCE_KEY = "auris-rejected-sequence"
# Trailing metadata of a sequence conflict: the highest sequence stored for the agent, above
# which it renumbers what it still has to send.
STORED_SEQUENCE_KEY = "auris-stored-sequence"


# Models travel in slices of this many bytes (well under the message size limit).
_CHUNK = 1 << 20
# The largest model accepted for registration.
_MAX_MODEL_BYTES = 256 << 20


class InvalidVerdict(ValueError):
    """One verdict of a batch is malformed; the batch is refused and nothing else."""


_TIME_FIELDS = ("first_seen_time", "last_seen_time", "scored_time")
# Addresses as agents send them -> their canonical form. Agents see the same few thousand
# addresses over and over; ipaddress costs ~3.5 µs an address. Bounded: cleared when full.
_CANONICAL: dict[str, str] = {}
_CANONICAL_MAX = 1 << 16


def _canonical_ip(value: str, what: str, index: int) -> str:
    canonical = _CANONICAL.get(value)
    if canonical is None:
        try:
            canonical = ipaddress.ip_address(value).compressed
        except ValueError:
            raise InvalidVerdict(f"verdict {index}: {what} {value[:64]!r} is not an IP address") from None
        if len(_CANONICAL) >= _CANONICAL_MAX:
            _CANONICAL.clear()
        _CANONICAL[value] = canonical
    return canonical


def validate_batch(
    request: agent_service_pb2.StreamVerdictsRequest, last_sequence: int, received_ns: int = 0
) -> tuple[int, list[Row]]:
    """Check one batch; fill in missing agent ids, canonicalise addresses; return its highest
    sequence and the rows to store (store.verdict_row's, built in the same pass: on the ingest
    path each protobuf field read counts, so each is read once).

    Raises InvalidVerdict naming the first bad verdict (the whole batch is refused and
    nothing stored before it is touched), or ValueError for a bad stream.
    """
    agent_id = request.agent_id
    if not agent_id or len(agent_id) > 128:
        raise ValueError("agent_id must be 1 to 128 characters")
    previous = last_sequence
    rows: list[Row] = []
    append = rows.append
    for i, v in enumerate(request.verdicts):
        own = v.agent_id
        if own != agent_id:
            if own:
                raise InvalidVerdict(f"verdict {i}: agent_id {own!r} differs from the stream's {agent_id!r}")
            v.agent_id = agent_id
        sequence = v.sequence
        if not previous < sequence <= _MAX_SEQUENCE:
            raise InvalidVerdict(f"verdict {i}: sequence {sequence} does not increase (previous {previous})")
        previous = sequence
        flow = v.flow
        sent_src, sent_dst = flow.src_ip, flow.dst_ip
        src_ip = _canonical_ip(sent_src, "src_ip", i)
        dst_ip = _canonical_ip(sent_dst, "dst_ip", i)
        if src_ip != sent_src:
            flow.src_ip = src_ip
        if dst_ip != sent_dst:
            flow.dst_ip = dst_ip
        src_port, dst_port, protocol = flow.src_port, flow.dst_port, flow.ip_protocol
        if src_port > 65535 or dst_port > 65535:
            raise InvalidVerdict(f"verdict {i}: port out of range")
        if protocol > 255:
            raise InvalidVerdict(f"verdict {i}: ip_protocol {protocol} out of range")
        if not v.HasField("scored_time"):
            raise InvalidVerdict(f"verdict {i}: scored_time is not set")
        first, last, scored = v.first_seen_time, v.last_seen_time, v.scored_time
        first_s, first_n, last_s, last_n = first.seconds, first.nanos, last.seconds, last.nanos
        scored_s, scored_n = scored.seconds, scored.nanos
        if min(first_s, last_s, scored_s, first_n, last_n, scored_n) < 0 or not (
            max(first_s, last_s, scored_s) <= _MAX_SECONDS and max(first_n, last_n, scored_n) < 1_000_000_000
        ):
            times = ((first_s, first_n), (last_s, last_n), (scored_s, scored_n))
            for name, (seconds, nanos) in zip(_TIME_FIELDS, times, strict=True):
                if not (0 <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
                    raise InvalidVerdict(f"verdict {i}: {name} is out of range")
        c = v.counters
        out_packets, in_packets = c.src_to_dst_packets, c.dst_to_src_packets
        out_bytes, in_bytes = c.src_to_dst_bytes, c.dst_to_src_bytes
        if max(out_packets, in_packets, out_bytes, in_bytes) > _MAX_COUNTER:
            raise InvalidVerdict(f"verdict {i}: a counter is out of range")
        model = v.model
        model_id, version = model.model_id, model.version
        decider = None
        for s in v.scores:
            ref = s.model
            if ref.model_id == model_id and ref.version == version:
                decider = s.score
                break
        append(
            (
                agent_id,
                sequence,
                v.hostname,
                src_ip,
                dst_ip,
                src_port,
                dst_port,
                protocol,
                flow.vlan_id,
                first_s * 1_000_000_000 + first_n,
                last_s * 1_000_000_000 + last_n,
                scored_s * 1_000_000_000 + scored_n,
                received_ns,
                out_packets + in_packets,
                out_bytes + in_bytes,
                model_id,
                version,
                v.label,
                int(v.anomalous),
                decider,
                v.application_name,
                v.SerializeToString(deterministic=True),
            )
        )
    return previous, rows


class AgentServicer(agent_service_pb2_grpc.AgentServiceServicer):
    """Receives verdict streams; acknowledges each batch once it is durable."""

    def __init__(
        self,
        store: VerdictStore,
        writer: ThreadPoolExecutor,
        readers: ThreadPoolExecutor,
        broker: Broker[NewVerdict],
        alerts_changed: AlertsChanged,
        authority: Authority,
        signer: AgentSigner | None,
        registry: ModelRegistry,
        model_key_pem: str = "",
        model_poll_s: float = 0.5,
        on_heartbeat: Callable[[agent_service_pb2.HeartbeatRequest, int], list[int]] | None = None,
    ) -> None:
        self._store = store
        self._writer = writer
        self._readers = readers
        self._broker = broker
        self._committer = GroupCommitter(store, writer, self._publish)
        self._alerts_changed = alerts_changed
        self._authority = authority
        self._signer = signer
        self._registry = registry
        self._model_key_pem = model_key_pem
        self._model_poll_s = model_poll_s
        # Drift alert rules judge heartbeats; returns the ids of alerts that changed.
        self._on_heartbeat = on_heartbeat

    async def _check_identity(self, agent_id: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """An agent speaks only for itself (its certificate names it), and not once revoked."""
        certified = current_principal().agent_id
        if certified and agent_id and agent_id != certified:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this certificate is for agent {certified}, not {agent_id[:128]}",
            )
        if self._authority.is_revoked(certified or agent_id):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"agent {certified or agent_id} is revoked"
            )

    async def Enroll(
        self,
        request: agent_service_pb2.EnrollRequest,
        context: grpc.aio.ServicerContext[agent_service_pb2.EnrollRequest, agent_service_pb2.EnrollResponse],
    ) -> agent_service_pb2.EnrollResponse:
        if self._signer is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this collector does not enroll agents (no ca_key_file configured)",
            )
        agent_id = request.agent_id or f"agent-{secrets.token_hex(4)}"
        if not valid_agent_id(agent_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "agent_id must be 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        if self._authority.is_revoked(agent_id):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"agent {agent_id} is revoked; enroll under a new id"
            )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(
                self._writer, self._authority.redeem_enrollment_token, request.token, agent_id
            )
        except Refused as exc:
            await context.abort(exc.code, str(exc))
        try:
            certificate, serial = self._signer.sign(request.csr_pem.encode(), agent_id)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await loop.run_in_executor(
            self._writer, self._store.record_enrollment, agent_id, request.hostname, serial, time.time_ns()
        )
        self._authority.certificate_issued(agent_id, serial)
        logger.info("enrolled agent %s (%s), certificate serial %s", agent_id, request.hostname[:128], serial)
        return agent_service_pb2.EnrollResponse(
            agent_id=agent_id,
            certificate_pem=certificate.decode(),
            ca_certificate_pem=self._signer.ca_pem.decode(),
            model_signing_key_pem=self._model_key_pem,
        )

    async def StreamVerdicts(
        self,
        request_iterator: AsyncIterator[agent_service_pb2.StreamVerdictsRequest],
        context: grpc.aio.ServicerContext[
            agent_service_pb2.StreamVerdictsRequest, agent_service_pb2.StreamVerdictsResponse
        ],
    ) -> AsyncIterator[agent_service_pb2.StreamVerdictsResponse]:
        last_sequence = 0
        async for request in request_iterator:
            await self._check_identity(request.agent_id, context)
            received_ns = time.time_ns()
            try:
                top, rows = validate_batch(request, last_sequence, received_ns)
            except ValueError as exc:
                logger.warning("refused batch from %s: %s", request.agent_id[:128] or "?", exc)
                if isinstance(exc, InvalidVerdict) and request.verdicts:
                    context.set_trailing_metadata(
                        ((REJECTED_SEQUENCE_KEY, str(max(v.sequence for v in request.verdicts))),)
                    )
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if not request.verdicts:
                yield agent_service_pb2.StreamVerdictsResponse(acknowledged_sequence=last_sequence)
                continue
            try:
                # Returns once the group commit holding the batch is durable; live subscribers
                # get its verdicts from memory after that (_publish).
                result = await self._committer.ingest(
                    IngestBatch(request.agent_id, request.verdicts, rows, received_ns)
                )
            except SequenceConflict as exc:
                logger.error("refused batch from %s: %s", request.agent_id, exc)
                context.set_trailing_metadata(((STORED_SEQUENCE_KEY, str(exc.stored_sequence)),))
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            last_sequence = top
            if result.alert_ids:
                await self._alerts_changed(result.alert_ids)
            yield agent_service_pb2.StreamVerdictsResponse(
                acknowledged_sequence=top, accepted=result.accepted, duplicates=result.duplicates
            )

    def _publish(self, committed: list[tuple[IngestBatch, IngestResult]]) -> None:
        """Hand a committed group's new verdicts to live subscribers, in id order (called on the
        event loop once the streams of the group have acknowledged)."""
        if not self._broker.active:
            return
        self._broker.publish(
            [
                (row_id, row)
                for _, result in committed
                for row_id, row in zip(result.stored_ids, result.rows, strict=True)
            ]
        )

    async def Heartbeat(
        self,
        request: agent_service_pb2.HeartbeatRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.HeartbeatRequest, agent_service_pb2.HeartbeatResponse
        ],
    ) -> agent_service_pb2.HeartbeatResponse:
        if not request.agent_id or len(request.agent_id) > 128:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent_id must be 1 to 128 characters")
        await self._check_identity(request.agent_id, context)
        now = time.time_ns()
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self._store.record_heartbeat, request, now
        )
        if self._on_heartbeat is not None:
            changed = await asyncio.get_running_loop().run_in_executor(
                self._writer, self._on_heartbeat, request, now
            )
            if changed:
                await self._alerts_changed(changed)
        response = agent_service_pb2.HeartbeatResponse(desired_models=self._registry.desired())
        response.server_time.FromNanoseconds(now)
        return response

    async def WatchModelUpdates(
        self,
        request: agent_service_pb2.WatchModelUpdatesRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.WatchModelUpdatesRequest, agent_service_pb2.WatchModelUpdatesResponse
        ],
    ) -> AsyncIterator[agent_service_pb2.WatchModelUpdatesResponse]:
        """The wanted model set now, then again whenever promotion, rollback or retirement changes it."""
        await self._check_identity(request.agent_id, context)
        loop = asyncio.get_running_loop()
        generation = -1
        while True:
            if self._registry.generation != generation:
                generation = self._registry.generation
                desired, shadow = await loop.run_in_executor(self._readers, self._registry.wanted)
                yield agent_service_pb2.WatchModelUpdatesResponse(
                    desired_models=desired, shadow_models=shadow
                )
            await asyncio.sleep(self._model_poll_s)
            # A revoked agent loses its model feed too.
            await self._check_identity(request.agent_id, context)

    async def DownloadModel(
        self,
        request: agent_service_pb2.DownloadModelRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.DownloadModelRequest, agent_service_pb2.DownloadModelResponse
        ],
    ) -> AsyncIterator[agent_service_pb2.DownloadModelResponse]:
        await self._check_identity("", context)
        manifest, onnx = await _run(context, self._readers, self._registry.onnx, request.model)
        yield agent_service_pb2.DownloadModelResponse(manifest=manifest, chunk=onnx[:_CHUNK])
        for offset in range(_CHUNK, len(onnx), _CHUNK):
            yield agent_service_pb2.DownloadModelResponse(chunk=onnx[offset : offset + _CHUNK])

    async def RenewCertificate(
        self,
        request: agent_service_pb2.RenewCertificateRequest,
        context: grpc.aio.ServicerContext[
            agent_service_pb2.RenewCertificateRequest, agent_service_pb2.RenewCertificateResponse
        ],
    ) -> agent_service_pb2.RenewCertificateResponse:
        """A new certificate for the calling agent, signed as at enrollment; only for the id its
        current certificate carries (the interceptor has checked that certificate)."""
        agent_id = current_principal().agent_id
        if not agent_id:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "RenewCertificate needs the agent's current certificate (mTLS on the agent port)",
            )
        if self._signer is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this collector does not renew certificates (no ca_key_file configured)",
            )
        await self._check_identity("", context)
        csr_pem = request.csr_pem.encode()
        try:
            requested = csr_common_name(csr_pem)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if requested != agent_id:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this certificate is for agent {agent_id}, not {requested[:128]}",
            )
        try:
            certificate, serial = self._signer.sign(csr_pem, agent_id)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self._store.record_certificate, agent_id, serial
        )
        self._authority.certificate_issued(agent_id, serial, renewal=True)
        logger.info("renewed the certificate of agent %s, new serial %s", agent_id, serial)
        return agent_service_pb2.RenewCertificateResponse(certificate_pem=certificate.decode())


class AdminServicer(admin_service_pb2_grpc.AdminServiceServicer):
    """The agent registry, alerts and the model registry (more admin RPCs come with later issues;
    see docs/ROADMAP.md)."""

    def __init__(
        self,
        store: VerdictStore,
        readers: ThreadPoolExecutor,
        writer: ThreadPoolExecutor,
        offline_after_s: float,
        alerts: Alerts,
        alert_broker: Broker[admin_service_pb2.Alert],
        registry: ModelRegistry,
        alerts_changed: AlertsChanged,
        default_page: int,
        max_page: int,
        authority: Authority,
        ca_sha256: str,
        explainers: Explainers | None = None,
        feeds: FeedStore | None = None,
    ) -> None:
        self._feeds = feeds
        self._authority = authority
        self._ca_sha256 = ca_sha256
        self._explainers = explainers or Explainers(store, registry)
        self._store = store
        self._readers = readers
        self._writer = writer
        self._offline_after_ns = int(offline_after_s * 1e9)
        self._alerts = alerts
        self._alert_broker = alert_broker
        self._registry = registry
        self._alerts_changed = alerts_changed
        self._default_page = default_page
        self._max_page = max_page

    async def ListAgents(
        self,
        request: admin_service_pb2.ListAgentsRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.ListAgentsRequest, admin_service_pb2.ListAgentsResponse
        ],
    ) -> admin_service_pb2.ListAgentsResponse:
        agents = await _run(context, self._readers, self._store.agents, self._offline_after_ns)
        return admin_service_pb2.ListAgentsResponse(agents=agents)

    async def GetAgent(
        self,
        request: admin_service_pb2.GetAgentRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.GetAgentRequest, admin_service_pb2.GetAgentResponse
        ],
    ) -> admin_service_pb2.GetAgentResponse:
        (agent,) = await _run(
            context, self._readers, self._store.agents, self._offline_after_ns, request.agent_id or "?"
        )
        return admin_service_pb2.GetAgentResponse(agent=agent)

    async def RevokeAgent(
        self,
        request: admin_service_pb2.RevokeAgentRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.RevokeAgentRequest, admin_service_pb2.RevokeAgentResponse
        ],
    ) -> admin_service_pb2.RevokeAgentResponse:
        await _run(context, self._writer, self._authority.revoke_agent, request.agent_id, request.reason)
        logger.warning(
            "agent %s revoked by %s: %s", request.agent_id, current_principal().name, request.reason
        )
        return admin_service_pb2.RevokeAgentResponse()

    async def CreateEnrollmentToken(
        self,
        request: admin_service_pb2.CreateEnrollmentTokenRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.CreateEnrollmentTokenRequest, admin_service_pb2.CreateEnrollmentTokenResponse
        ],
    ) -> admin_service_pb2.CreateEnrollmentTokenResponse:
        ttl_s = request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else 3600.0
        token, expire_ns = await _run(
            context, self._writer, self._authority.create_enrollment_token, ttl_s, request.note
        )
        response = admin_service_pb2.CreateEnrollmentTokenResponse(token=token, ca_sha256=self._ca_sha256)
        response.expire_time.FromNanoseconds(expire_ns)
        return response

    async def CreateApiToken(
        self,
        request: admin_service_pb2.CreateApiTokenRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.CreateApiTokenRequest, admin_service_pb2.CreateApiTokenResponse
        ],
    ) -> admin_service_pb2.CreateApiTokenResponse:
        ttl_s = request.ttl.ToNanoseconds() / 1e9 if request.HasField("ttl") else 0.0
        token, token_id = await _run(
            context, self._writer, self._authority.create_token, request.name, request.role, ttl_s
        )
        return admin_service_pb2.CreateApiTokenResponse(token=token, token_id=token_id)

    async def RevokeApiToken(
        self,
        request: admin_service_pb2.RevokeApiTokenRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.RevokeApiTokenRequest, admin_service_pb2.RevokeApiTokenResponse
        ],
    ) -> admin_service_pb2.RevokeApiTokenResponse:
        await _run(context, self._writer, self._authority.revoke_token, request.token_id)
        return admin_service_pb2.RevokeApiTokenResponse()

    async def ListAuditEvents(
        self,
        request: admin_service_pb2.ListAuditEventsRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.ListAuditEventsRequest, admin_service_pb2.ListAuditEventsResponse
        ],
    ) -> admin_service_pb2.ListAuditEventsResponse:
        since_ns = request.since_time.ToNanoseconds() if request.HasField("since_time") else 0
        size = min(request.page_size or self._default_page, self._max_page)
        events, token = await _run(
            context, self._readers, self._authority.audit_page, since_ns, size, request.page_token
        )
        return admin_service_pb2.ListAuditEventsResponse(events=events, next_page_token=token)

    async def ListModels(
        self,
        request: admin_service_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.ListModelsRequest, admin_service_pb2.ListModelsResponse
        ],
    ) -> admin_service_pb2.ListModelsResponse:
        models = await _run(
            context, self._readers, self._registry.models, request.domain, self._offline_after_ns
        )
        return admin_service_pb2.ListModelsResponse(models=models)

    async def GetModel(
        self,
        request: admin_service_pb2.GetModelRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.GetModelRequest, admin_service_pb2.GetModelResponse
        ],
    ) -> admin_service_pb2.GetModelResponse:
        model = await _run(context, self._readers, self._registry.get, request.model, self._offline_after_ns)
        return admin_service_pb2.GetModelResponse(model=model)

    async def RegisterModel(
        self,
        request_iterator: AsyncIterator[admin_service_pb2.RegisterModelRequest],
        context: grpc.aio.ServicerContext[
            admin_service_pb2.RegisterModelRequest, admin_service_pb2.RegisterModelResponse
        ],
    ) -> admin_service_pb2.RegisterModelResponse:
        manifest: model_pb2.ModelManifest | None = None
        chunks: list[bytes] = []
        size = 0
        async for part in request_iterator:
            if manifest is None:
                if not part.HasField("manifest"):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "the first message must carry the manifest"
                    )
                manifest = part.manifest
            size += len(part.chunk)
            if size > _MAX_MODEL_BYTES:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"model larger than {_MAX_MODEL_BYTES >> 20} MiB"
                )
            chunks.append(part.chunk)
        if manifest is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no manifest sent")
        await _run(context, self._writer, self._registry.register, manifest, b"".join(chunks))
        ref = model_pb2.ModelRef(model_id=manifest.model_id, version=manifest.version)
        model = await _run(context, self._readers, self._registry.get, ref, self._offline_after_ns)
        return admin_service_pb2.RegisterModelResponse(model=model)

    async def PromoteModel(
        self,
        request: admin_service_pb2.PromoteModelRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.PromoteModelRequest, admin_service_pb2.PromoteModelResponse
        ],
    ) -> admin_service_pb2.PromoteModelResponse:
        model = await _run(context, self._writer, self._registry.promote, request.model)
        logger.info("promoted %s@%s", model.manifest.model_id, model.manifest.version)
        return admin_service_pb2.PromoteModelResponse(model=model)

    async def RollbackModel(
        self,
        request: admin_service_pb2.RollbackModelRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.RollbackModelRequest, admin_service_pb2.RollbackModelResponse
        ],
    ) -> admin_service_pb2.RollbackModelResponse:
        model = await _run(context, self._writer, self._registry.rollback, request.model_id)
        logger.info("rolled %s back to %s", model.manifest.model_id, model.manifest.version)
        return admin_service_pb2.RollbackModelResponse(model=model)

    async def ShadowModel(
        self,
        request: admin_service_pb2.ShadowModelRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.ShadowModelRequest, admin_service_pb2.ShadowModelResponse
        ],
    ) -> admin_service_pb2.ShadowModelResponse:
        model = await _run(context, self._writer, self._registry.shadow, request.model, request.enabled)
        logger.info("%s@%s %s shadow", model.manifest.model_id, model.manifest.version,
                    "in" if request.enabled else "out of")  # fmt: skip
        return admin_service_pb2.ShadowModelResponse(model=model)

    async def ListFeeds(
        self,
        request: admin_service_pb2.ListFeedsRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.ListFeedsRequest, admin_service_pb2.ListFeedsResponse
        ],
    ) -> admin_service_pb2.ListFeedsResponse:
        if self._feeds is None:
            return admin_service_pb2.ListFeedsResponse()
        return admin_service_pb2.ListFeedsResponse(
            feeds=await _run(context, self._readers, self._feeds.feeds)
        )

    async def ExplainVerdict(
        self,
        request: admin_service_pb2.ExplainVerdictRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.ExplainVerdictRequest, admin_service_pb2.ExplainVerdictResponse
        ],
    ) -> admin_service_pb2.ExplainVerdictResponse:
        return await _run(
            context, self._readers, self._explainers.explain, request.id, request.model_id, request.top
        )

    async def CompareModels(
        self,
        request: admin_service_pb2.CompareModelsRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.CompareModelsRequest, admin_service_pb2.CompareModelsResponse
        ],
    ) -> admin_service_pb2.CompareModelsResponse:
        production = await _run(
            context, self._readers, self._registry.get, model_pb2.ModelRef(model_id=request.model.model_id)
        )
        now = time.time_ns()
        tr = request.time_range
        since = tr.start_time.ToNanoseconds() if tr.HasField("start_time") else now - 3600 * 10**9
        until = tr.end_time.ToNanoseconds() if tr.HasField("end_time") else now
        limit = min(request.max_verdicts or 100_000, 1_000_000)
        prod_ref = model_pb2.ModelRef(
            model_id=production.manifest.model_id, version=production.manifest.version
        )
        return await _run(
            context, self._readers, self._store.compare_scores, prod_ref, request.model, since, until, limit
        )

    async def RetireModel(
        self,
        request: admin_service_pb2.RetireModelRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.RetireModelRequest, admin_service_pb2.RetireModelResponse
        ],
    ) -> admin_service_pb2.RetireModelResponse:
        model = await _run(context, self._writer, self._registry.retire, request.model)
        logger.info("retired %s@%s", model.manifest.model_id, model.manifest.version)
        return admin_service_pb2.RetireModelResponse(model=model)

    async def ListAlerts(
        self,
        request: admin_service_pb2.ListAlertsRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.ListAlertsRequest, admin_service_pb2.ListAlertsResponse
        ],
    ) -> admin_service_pb2.ListAlertsResponse:
        size = min(request.page_size or self._default_page, self._max_page)
        alerts, token = await _run(
            context,
            self._readers,
            self._alerts.page,
            list(request.states),
            list(request.rules),
            size,
            request.page_token,
        )
        return admin_service_pb2.ListAlertsResponse(alerts=alerts, next_page_token=token)

    async def SubscribeAlerts(
        self,
        request: admin_service_pb2.SubscribeAlertsRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.SubscribeAlertsRequest, admin_service_pb2.SubscribeAlertsResponse
        ],
    ) -> AsyncIterator[admin_service_pb2.SubscribeAlertsResponse]:
        wants = alert_wanted(list(request.states), list(request.rules))
        async for response in follow(
            context,
            self._alert_broker,
            wants,
            lambda alerts: admin_service_pb2.SubscribeAlertsResponse(alert=alerts[0]),
        ):
            yield response

    async def AcknowledgeAlert(
        self,
        request: admin_service_pb2.AcknowledgeAlertRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.AcknowledgeAlertRequest, admin_service_pb2.AcknowledgeAlertResponse
        ],
    ) -> admin_service_pb2.AcknowledgeAlertResponse:
        alert = await _run(
            context,
            self._writer,
            self._alerts.acknowledge,
            request.id,
            current_principal().name,
            request.note,
        )
        await self._alerts_changed([alert.id])
        return admin_service_pb2.AcknowledgeAlertResponse(alert=alert)

    async def ResolveAlert(
        self,
        request: admin_service_pb2.ResolveAlertRequest,
        context: grpc.aio.ServicerContext[
            admin_service_pb2.ResolveAlertRequest, admin_service_pb2.ResolveAlertResponse
        ],
    ) -> admin_service_pb2.ResolveAlertResponse:
        alert = await _run(
            context, self._writer, self._alerts.resolve, request.id, current_principal().name, request.note
        )
        await self._alerts_changed([alert.id])
        return admin_service_pb2.ResolveAlertResponse(alert=alert)


_ID = field_tag(verdict_pb2.StoredVerdict, "id")
_VERDICT = field_tag(verdict_pb2.StoredVerdict, "verdict")
_RECEIVED = field_tag(verdict_pb2.StoredVerdict, "received_time")
_SECONDS = field_tag(timestamp_pb2.Timestamp, "seconds")
_NANOS = field_tag(timestamp_pb2.Timestamp, "nanos")
_ONE = field_tag(query_service_pb2.SubscribeVerdictsResponse, "verdict")
_MANY = field_tag(query_service_pb2.SubscribeVerdictsResponse, "verdicts")
_ROW_BLOB = _INSERT_COLUMNS.index("verdict_pb")
_ROW_RECEIVED = _INSERT_COLUMNS.index("received_ns")


def _encode_stored(row_id: int, row: Row) -> bytes:
    """A new verdict as QueryVerdicts would return it (a StoredVerdict, no analyst label yet),
    serialised from the stored row: its verdict is the row's bytes, not parsed or copied again."""
    blob = row[_ROW_BLOB]
    seconds, nanos = divmod(row[_ROW_RECEIVED], 1_000_000_000)
    received = _SECONDS + varint(seconds) + (_NANOS + varint(nanos) if nanos else b"")
    return b"".join(
        (
            _ID,
            varint(row_id),
            _VERDICT,
            varint(len(blob)),
            blob,
            _RECEIVED,
            varint(len(received)),
            received,
        )
    )


def subscription_message(
    items: Sequence[NewVerdict], batched: bool
) -> query_service_pb2.SubscribeVerdictsResponse:
    """One SubscribeVerdictsResponse: the verdicts in ``verdicts`` (batched) or the one in ``verdict``."""
    parts: list[bytes] = []
    for row_id, row in items:
        stored = _encode_stored(row_id, row)
        parts += (_MANY if batched else _ONE, varint(len(stored)), stored)
    return query_service_pb2.SubscribeVerdictsResponse.FromString(b"".join(parts))


class QueryServicer(query_service_pb2_grpc.QueryServiceServicer):
    """Answers verdict queries from the store's reader connections; labels go through the writer."""

    def __init__(
        self,
        store: VerdictStore,
        readers: ThreadPoolExecutor,
        writer: ThreadPoolExecutor,
        default_page: int,
        max_page: int,
        broker: Broker[NewVerdict],
    ) -> None:
        self._store = store
        self._readers = readers
        self._writer = writer
        self._default_page = default_page
        self._max_page = max_page
        self._broker = broker

    async def QueryVerdicts(
        self,
        request: query_service_pb2.QueryVerdictsRequest,
        context: grpc.aio.ServicerContext[
            query_service_pb2.QueryVerdictsRequest, query_service_pb2.QueryVerdictsResponse
        ],
    ) -> query_service_pb2.QueryVerdictsResponse:
        size = min(request.page_size or self._default_page, self._max_page)
        page = await _run(context, self._readers, self._store.query, request.filter, size, request.page_token)
        return query_service_pb2.QueryVerdictsResponse(
            verdicts=page.verdicts, next_page_token=page.next_page_token
        )

    async def SubscribeVerdicts(
        self,
        request: query_service_pb2.SubscribeVerdictsRequest,
        context: grpc.aio.ServicerContext[
            query_service_pb2.SubscribeVerdictsRequest, query_service_pb2.SubscribeVerdictsResponse
        ],
    ) -> AsyncIterator[query_service_pb2.SubscribeVerdictsResponse]:
        try:
            check_filter(request.filter)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        wanted = compile_filter(request.filter)
        max_batch = min(request.max_batch, self._max_page)

        async for response in follow(
            context,
            self._broker,
            lambda item: wanted(item[1]),
            lambda items: subscription_message(items, bool(max_batch)),
            max_batch or 1,
        ):
            yield response

    async def LabelVerdicts(
        self,
        request: query_service_pb2.LabelVerdictsRequest,
        context: grpc.aio.ServicerContext[
            query_service_pb2.LabelVerdictsRequest, query_service_pb2.LabelVerdictsResponse
        ],
    ) -> query_service_pb2.LabelVerdictsResponse:
        labeled = await _run(context, self._writer, self._store.label, list(request.ids), request.label)
        return query_service_pb2.LabelVerdictsResponse(labeled=labeled)

    async def AggregateVerdicts(
        self,
        request: query_service_pb2.AggregateVerdictsRequest,
        context: grpc.aio.ServicerContext[
            query_service_pb2.AggregateVerdictsRequest, query_service_pb2.AggregateVerdictsResponse
        ],
    ) -> query_service_pb2.AggregateVerdictsResponse:
        bucket_ns = request.bucket.ToNanoseconds() if request.HasField("bucket") else 0
        if bucket_ns >= 2**63:  # SQLite would compute with it as a float
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "bucket is out of range (at most 292 years)"
            )
        method = self._store.aggregate_rollups if request.rollups else self._store.aggregate
        rows = await _run(context, self._readers, method, request.filter, list(request.group_by), bucket_ns)
        return query_service_pb2.AggregateVerdictsResponse(rows=rows)

    async def ListTopTalkers(
        self,
        request: query_service_pb2.ListTopTalkersRequest,
        context: grpc.aio.ServicerContext[
            query_service_pb2.ListTopTalkersRequest, query_service_pb2.ListTopTalkersResponse
        ],
    ) -> query_service_pb2.ListTopTalkersResponse:
        limit = min(request.limit or 10, self._max_page)
        top = functools.partial(self._store.top_talkers, exact=request.exact)
        response: query_service_pb2.ListTopTalkersResponse = await _run(
            context, self._readers, top, request.filter, request.metric, limit
        )
        return response

    async def ListTopAnomalies(
        self,
        request: query_service_pb2.ListTopAnomaliesRequest,
        context: grpc.aio.ServicerContext[
            query_service_pb2.ListTopAnomaliesRequest, query_service_pb2.ListTopAnomaliesResponse
        ],
    ) -> query_service_pb2.ListTopAnomaliesResponse:
        limit = min(request.limit or 10, self._max_page)
        verdicts = await _run(context, self._readers, self._store.top_anomalies, request.filter, limit)
        return query_service_pb2.ListTopAnomaliesResponse(verdicts=verdicts)
