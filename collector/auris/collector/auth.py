"""Who may call what.

Agents prove who they are with their client certificate (the agent port is mTLS-only, and a
certificate's common name is the agent id). People and programs present an API token with a
role on the API port (TLS): reader (query, subscribe), analyst (+ label, alerts), admin (+
agents, models, feeds, tokens, audit), or feed (submit transactions and ticks, nothing else: a
producer's token). ``POLICY`` names what every RPC needs and
``AuthInterceptor`` enforces it in one place, writing each action, and each refusal, to the
append-only audit log. The same interceptor applies the rate limits (limits.py: calls per API
token, verdicts per agent, calls without credentials per address; RESOURCE_EXHAUSTED past them),
and makes every answer a declared status with a short one-line reason: an undecodable request is
INVALID_ARGUMENT, and so is a ValueError a handler lets escape; anything else is INTERNAL (the
traceback goes to the log, never on the wire).

Tokens are shown once; the collector keeps the sha256 of their secret part only.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import dataclasses
import hashlib
import hmac
import inspect
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError

from auris.agent.logs import REQUEST_ID
from auris.collector.limits import RETRY_AFTER_KEY, KeyedBuckets, RateLimits
from auris.collector.store import VerdictStore, decode_page_token, encode_page_token
from auris.v1 import admin_service_pb2

logger = logging.getLogger(__name__)

__all__ = [
    "AGENT",
    "OPEN",
    "POLICY",
    "AuthInterceptor",
    "Authority",
    "Principal",
    "Refused",
    "current_principal",
]

READER = admin_service_pb2.ROLE_READER
ANALYST = admin_service_pb2.ROLE_ANALYST
ADMIN = admin_service_pb2.ROLE_ADMIN
FEED = admin_service_pb2.ROLE_FEED
# Pseudo-roles: an agent certificate; nothing (enrollment carries its own token).
AGENT = -1
OPEN = 0

_ROLE_NAMES = {
    READER: "reader",
    ANALYST: "analyst",
    ADMIN: "admin",
    FEED: "feed",
    AGENT: "an agent certificate",
}
# Role -> the needs it satisfies: reader < analyst < admin; a feed producer only submits records.
_GRANTS: dict[int, frozenset[int]] = {
    READER: frozenset({READER}),
    ANALYST: frozenset({READER, ANALYST}),
    ADMIN: frozenset({READER, ANALYST, ADMIN, FEED}),
    FEED: frozenset({FEED}),
}
_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Method -> (who may call it, whether a call is an action for the audit log). A method that is
# not here is refused: new RPCs are closed until someone decides who may call them.
POLICY: dict[str, tuple[int, bool]] = {
    "/auris.v1.AgentService/Enroll": (OPEN, True),
    "/auris.v1.AgentService/StreamVerdicts": (AGENT, False),
    "/auris.v1.AgentService/Heartbeat": (AGENT, False),
    "/auris.v1.AgentService/WatchModelUpdates": (AGENT, False),
    "/auris.v1.AgentService/DownloadModel": (AGENT, False),
    "/auris.v1.AgentService/RenewCertificate": (AGENT, True),
    "/auris.v1.QueryService/QueryVerdicts": (READER, False),
    "/auris.v1.QueryService/SubscribeVerdicts": (READER, False),
    "/auris.v1.QueryService/AggregateVerdicts": (READER, False),
    "/auris.v1.QueryService/ListTopTalkers": (READER, False),
    "/auris.v1.QueryService/ListTopAnomalies": (READER, False),
    "/auris.v1.QueryService/LabelVerdicts": (ANALYST, True),
    "/auris.v1.AdminService/ListAgents": (READER, False),
    "/auris.v1.AdminService/GetAgent": (READER, False),
    "/auris.v1.AdminService/RevokeAgent": (ADMIN, True),
    "/auris.v1.AdminService/CreateEnrollmentToken": (ADMIN, True),
    "/auris.v1.AdminService/ListModels": (READER, False),
    "/auris.v1.AdminService/GetModel": (READER, False),
    "/auris.v1.AdminService/RegisterModel": (ADMIN, True),
    "/auris.v1.AdminService/PromoteModel": (ADMIN, True),
    "/auris.v1.AdminService/RollbackModel": (ADMIN, True),
    "/auris.v1.AdminService/RetireModel": (ADMIN, True),
    "/auris.v1.AdminService/ShadowModel": (ADMIN, True),
    "/auris.v1.AdminService/CompareModels": (READER, False),
    "/auris.v1.AdminService/ExplainVerdict": (READER, False),
    "/auris.v1.AdminService/ListFeeds": (READER, False),
    "/auris.v1.AdminService/ListAlerts": (READER, False),
    "/auris.v1.AdminService/SubscribeAlerts": (READER, False),
    "/auris.v1.AdminService/AcknowledgeAlert": (ANALYST, True),
    "/auris.v1.AdminService/ResolveAlert": (ANALYST, True),
    "/auris.v1.AdminService/CreateApiToken": (ADMIN, True),
    "/auris.v1.AdminService/RevokeApiToken": (ADMIN, True),
    "/auris.v1.AdminService/ListAuditEvents": (ADMIN, False),
    "/auris.v1.FeedService/StreamTransactions": (FEED, False),
    "/auris.v1.FeedService/SubmitTransactions": (FEED, False),
    "/auris.v1.FeedService/StreamTicks": (FEED, False),
    "/auris.v1.FeedService/SubmitTicks": (FEED, False),
    "/auris.v1.FeedService/QueryFeedScores": (READER, False),
    "/auris.v1.FeedService/SubscribeFeedScores": (READER, False),
    "/auris.v1.FeedService/ListFeedRejects": (READER, False),
}
# Streams whose messages are rate-limited one by one (per agent), and what each message costs.
_METERED: dict[str, Callable[[Any], int]] = {
    "/auris.v1.AgentService/StreamVerdicts": lambda request: len(request.verdicts),
}
# Infrastructure anyone may call: health checking and server reflection.
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                    "/grpc.reflection.v1.ServerReflection/")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Principal:
    """The caller: an agent (by certificate), a token holder, or anyone in insecure mode."""

    name: str
    role: int
    agent_id: str = ""
    # The API token's id, for a token holder (its rate limit is kept by it).
    token_id: str = ""


_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("auris_principal")


def current_principal() -> Principal:
    """The caller of the RPC being served (set by AuthInterceptor before the handler runs)."""
    return _CURRENT.get(Principal("unknown", OPEN))


class Refused(Exception):
    """An authentication or authorisation failure: a status and a one-line reason."""

    def __init__(self, code: grpc.StatusCode, message: str, actor: str = "") -> None:
        super().__init__(message)
        self.code = code
        # Who was refused, when known (a valid token with too small a role).
        self.actor = actor


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _new_token(prefix: str) -> tuple[str, str, str]:
    """(token, token_id, sha256 of the secret)."""
    token_id = secrets.token_hex(4)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return f"{prefix}_{token_id}_{secret}", token_id, _sha256(secret)


def _split_token(token: str, prefix: str) -> tuple[str, str]:
    parts = token.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != prefix or not parts[1] or not parts[2]:
        raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the token is malformed")
    return parts[1], parts[2]


class Authority:
    """Tokens, revocations and the audit log, over the collector's database."""

    def __init__(self, store: VerdictStore, *, insecure: bool) -> None:
        self._store = store
        self.insecure = insecure
        self._revoked = {
            row[0]
            for row in store.reader().execute("SELECT agent_id FROM agents WHERE revoked_ns IS NOT NULL")
        }
        # agent id -> serial (hex) of the newest certificate this collector issued it: an older one
        # (replaced by a renewal) is refused. Agents with certificates issued elsewhere have none.
        self._serials: dict[str, str] = {
            agent_id: serial
            for agent_id, serial in store.reader().execute(
                "SELECT agent_id, cert_serial FROM agents WHERE cert_serial IS NOT NULL AND cert_serial != ''"
            )
        }
        # agent id -> the serial a renewal replaced, still accepted until the new one is first
        # presented (a lost reply must not lock the agent out). In memory: after a restart only
        # the newest is accepted.
        self._previous: dict[str, str] = {}
        self._pem_serials: dict[bytes, str] = {}  # certificate PEM -> serial, parsed once
        # token_id -> (principal, secret sha256, valid until monotonic); dropped on revocation.
        self._cache: dict[str, tuple[Principal, str, float]] = {}

    # -- API tokens ---------------------------------------------------------------------------

    def create_token(self, name: str, role: int, ttl_s: float = 0) -> tuple[str, str]:
        """A new API token; (token, token_id). The token is returned once and never stored."""
        if not name or len(name) > 64:
            raise ValueError("a token needs a name of 1 to 64 characters")
        if role not in _GRANTS:
            raise ValueError("role must be reader, analyst, admin or feed")
        if ttl_s < 0:
            raise ValueError("ttl must not be negative")
        token, token_id, digest = _new_token("auris")
        now = time.time_ns()
        with self._store.writing() as conn:
            conn.execute(
                "INSERT INTO api_tokens (token_id, name, role, secret_sha256, created_ns, expire_ns)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, name, role, digest, now, now + int(ttl_s * 1e9) if ttl_s else None),
            )
        return token, token_id

    def revoke_token(self, token_id: str) -> None:
        with self._store.writing() as conn:
            changed = conn.execute(
                "UPDATE api_tokens SET revoked_ns = ? WHERE token_id = ? AND revoked_ns IS NULL",
                (time.time_ns(), token_id),
            ).rowcount
        self._cache.pop(token_id, None)
        if not changed:
            raise LookupError(f"no active token {token_id!r}")

    def verify_token(self, token: str) -> Principal:
        """The principal a bearer token stands for; Refused(UNAUTHENTICATED) when it is not valid."""
        token_id, secret = _split_token(token, "auris")
        digest = _sha256(secret)
        cached = self._cache.get(token_id)
        if cached is not None and cached[2] > time.monotonic() and hmac.compare_digest(cached[1], digest):
            return cached[0]
        row = (
            self._store.reader()
            .execute(
                "SELECT name, role, secret_sha256, expire_ns, revoked_ns FROM api_tokens WHERE token_id = ?",
                (token_id,),
            )
            .fetchone()
        )
        if row is None or not hmac.compare_digest(row[2], digest):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the API token is not valid")
        name, role, stored, expire_ns, revoked_ns = row
        if revoked_ns is not None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"API token {token_id} was revoked")
        now = time.time_ns()
        if expire_ns is not None and expire_ns <= now:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"API token {token_id} has expired")
        principal = Principal(f"token:{name}", role, token_id=token_id)
        # Cache for a few seconds, never past the token's expiry.
        horizon = 5.0 if expire_ns is None else min(5.0, (expire_ns - now) / 1e9)
        self._cache[token_id] = (principal, stored, time.monotonic() + horizon)
        return principal

    # -- enrollment tokens ----------------------------------------------------------------------

    def create_enrollment_token(self, ttl_s: float, note: str) -> tuple[str, int]:
        """A one-time enrollment token; (token, expiry in ns)."""
        if not 0 < ttl_s <= 30 * 86400:
            raise ValueError("ttl must be between 1 second and 30 days")
        token, token_id, digest = _new_token("aurisenroll")
        now = time.time_ns()
        expire_ns = now + int(ttl_s * 1e9)
        with self._store.writing() as conn:
            conn.execute(
                "INSERT INTO enrollment_tokens (token_id, secret_sha256, note, created_ns, expire_ns)"
                " VALUES (?, ?, ?, ?, ?)",
                (token_id, digest, note[:200], now, expire_ns),
            )
        return token, expire_ns

    def redeem_enrollment_token(self, token: str, agent_id: str) -> None:
        """Use up a one-time token for ``agent_id``; Refused(UNAUTHENTICATED) when it cannot be."""
        token_id, secret = _split_token(token, "aurisenroll")
        now = time.time_ns()
        with self._store.writing() as conn:
            row = conn.execute(
                "SELECT secret_sha256, expire_ns, used_ns FROM enrollment_tokens WHERE token_id = ?",
                (token_id,),
            ).fetchone()
            if row is None or not hmac.compare_digest(row[0], _sha256(secret)):
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the enrollment token is not valid")
            if row[2] is not None:
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED, f"enrollment token {token_id} was already used"
                )
            if row[1] <= now:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, f"enrollment token {token_id} has expired")
            conn.execute(
                "UPDATE enrollment_tokens SET used_ns = ?, used_by = ? WHERE token_id = ?",
                (now, agent_id, token_id),
            )

    # -- agents ---------------------------------------------------------------------------------

    def is_revoked(self, agent_id: str) -> bool:
        return agent_id in self._revoked

    def certificate_issued(self, agent_id: str, serial: str, *, renewal: bool = False) -> None:
        """From now on only this certificate of the agent is accepted (enrollment); after a renewal
        the replaced one too, until the new one is first presented."""
        replaced = self._serials.get(agent_id)
        self._serials[agent_id] = serial
        if renewal and replaced and replaced != serial:
            self._previous[agent_id] = replaced
        else:
            self._previous.pop(agent_id, None)

    def _presented_serial(self, context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
        pem = next(iter(context.auth_context().get("x509_pem_cert") or []), None)
        if pem is None:
            return None
        serial = self._pem_serials.get(pem)
        if serial is None:
            try:
                serial = format(x509.load_pem_x509_certificate(pem).serial_number, "x")
            except ValueError:
                return None
            if len(self._pem_serials) > 10_000:
                self._pem_serials.clear()
            self._pem_serials[pem] = serial
        return serial

    def revoke_agent(self, agent_id: str, reason: str) -> None:
        """Refuse the agent from now on: its streams end at their next batch, its calls fail."""
        with self._store.writing() as conn:
            changed = conn.execute(
                "UPDATE agents SET revoked_ns = ?, revoked_reason = ? WHERE agent_id = ?",
                (time.time_ns(), reason[:200], agent_id),
            ).rowcount
        if not changed:
            raise LookupError(f"no agent {agent_id!r}")
        self._revoked.add(agent_id)

    # -- audit ------------------------------------------------------------------------------------

    def audit(self, actor: str, action: str, target: str, result: str) -> None:
        with self._store.writing() as conn:
            conn.execute(
                "INSERT INTO audit (time_ns, actor, action, target, result) VALUES (?, ?, ?, ?, ?)",
                (time.time_ns(), actor[:200], action, target[:200], result),
            )

    def audit_page(
        self, since_ns: int, page_size: int, page_token: str
    ) -> tuple[list[admin_service_pb2.AuditEvent], str]:
        """Audit events since ``since_ns``, newest first, and the cursor to the next page."""
        sql = "SELECT id, time_ns, actor, action, target, result FROM audit WHERE time_ns >= ?"
        params: list[Any] = [since_ns]
        if page_token:
            sql += " AND id < ?"
            params.append(decode_page_token(page_token))
        rows = (
            self._store.reader()
            .execute(sql + " ORDER BY id DESC LIMIT ?", [*params, page_size + 1])
            .fetchall()
        )
        events = []
        for row_id, time_ns, actor, action, target, result in rows[:page_size]:
            event = admin_service_pb2.AuditEvent(
                id=row_id, actor=actor, action=action, target=target, result=result
            )
            event.time.FromNanoseconds(time_ns)
            events.append(event)
        token = encode_page_token(events[-1].id) if len(rows) > page_size and events else ""
        return events, token

    # -- who is calling ---------------------------------------------------------------------------

    def principal(self, context: grpc.aio.ServicerContext[Any, Any], need: int) -> Principal:
        """Who the caller is, checked against what the method needs; Refused when not allowed."""
        if self.insecure:
            return Principal(f"insecure {context.peer()}", ADMIN)
        if need == OPEN:
            return Principal(f"unauthenticated {context.peer()}", OPEN)
        names = list(context.auth_context().get("x509_common_name") or [])
        if need == AGENT:
            if not names:
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "agent RPCs need an agent certificate on the agent port (enroll first)",
                )
            agent_id = bytes(names[0]).decode("utf-8", "replace")
            if self.is_revoked(agent_id):
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"agent {agent_id} is revoked")
            newest = self._serials.get(agent_id)
            presented = self._presented_serial(context) if newest else None
            if newest and presented == newest:
                self._previous.pop(agent_id, None)  # the renewed certificate is in use
            elif newest and (presented is None or presented != self._previous.get(agent_id)):
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"agent {agent_id}: certificate {presented} was replaced by {newest} (renewed or"
                    " enrolled again); only the newest is accepted",
                    f"agent:{agent_id}",
                )
            return Principal(f"agent:{agent_id}", OPEN, agent_id)
        bearer = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
                bearer = value[7:]
        if not bearer:
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED, "this RPC needs an API token (authorization: Bearer ...)"
            )
        principal = self.verify_token(bearer)
        if need not in _GRANTS.get(principal.role, frozenset()):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.name} ({_ROLE_NAMES[principal.role]}) may not call this: "
                f"it needs {_ROLE_NAMES[need]}",
                principal.name,
            )
        return principal


def _target(request: object) -> str:
    """What an action was about, for the audit log."""
    for field in ("agent_id", "token_id", "name", "id", "model_id"):
        value = getattr(request, field, None)
        if value:
            return f"{field}={value}"
    ids = getattr(request, "ids", None)
    if ids:
        shown = ",".join(str(i) for i in list(ids)[:20])
        return f"ids={shown}" + ("..." if len(ids) > 20 else "")
    model = getattr(request, "model", None)
    if model is not None and getattr(model, "model_id", None):
        return f"model={model.model_id}@{model.version}"
    return ""


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # the runtime class is not generic
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Checks POLICY and the rate limits before every handler and audits actions and refusals.

    A rate-limit refusal is audited once per run of refusals (the first after an admitted
    request), so that a client hammering the collector cannot flood the audit log."""

    def __init__(
        self, authority: Authority, writer: ThreadPoolExecutor, limits: RateLimits | None = None
    ) -> None:
        self._authority = authority
        self._writer = writer
        self._limits = limits or RateLimits(0, 0, 0, 0)

    async def _audit(self, principal: str, method: str, target: str, result: str) -> None:
        action = method.rsplit("/", 1)[-1]
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self._authority.audit, principal, action, target, result
        )

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        need = POLICY.get(method, (None, False))[0]
        if need is None:
            await self._audit(f"? {context.peer()}", method, "", "PERMISSION_DENIED")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} has no access policy")
        try:
            principal = self._authority.principal(context, need)
        except Refused as exc:
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                # No valid credentials: limited per source address, so that a flood of them
                # is refused before each one costs an audit entry.
                await self._charge_peer(method, context)
            await self._audit(exc.actor or f"? {context.peer()}", method, "", exc.code.name)
            await context.abort(exc.code, str(exc))
        if need == OPEN:  # enrollment: anyone may try, at the per-address rate
            await self._charge_peer(method, context)
        if principal.token_id:
            await self._charge(
                self._limits.tokens, principal.token_id, 1, principal.name, method, context, "calls"
            )
        _CURRENT.set(principal)
        return principal

    async def _charge_peer(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        peer = context.peer() or "?"
        # "ipv4:10.1.2.3:5555", "ipv6:[::1]:5555": the address without the port.
        address = peer.rsplit(":", 1)[0] if peer.count(":") > 1 else peer
        await self._charge(
            self._limits.peers, address, 1, f"? {address}", method, context, "calls without credentials"
        )

    async def _charge(
        self,
        buckets: KeyedBuckets,
        key: str,
        cost: int,
        actor: str,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        unit: str,
    ) -> None:
        """Take ``cost`` from ``key``'s bucket, or end the call with RESOURCE_EXHAUSTED."""
        decision = buckets.take(key, cost)
        if decision.admitted:
            return
        if decision.first_refusal:
            await self._audit(actor, method, "", "RESOURCE_EXHAUSTED")
        wait_ms = max(1, math.ceil(decision.retry_after_s * 1000))
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(wait_ms)),))
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{actor} is over its rate limit of {buckets.rate:g} {unit}/s (burst {buckets.burst:g});"
            f" retry in {wait_ms / 1000:.2f}s",
        )

    def _incoming(
        self, method: str, requests: AsyncIterator[Any], context: Any, principal: Principal
    ) -> AsyncIterator[Any]:
        """The stream's messages, each refused when malformed and, for a metered stream, charged to
        the agent's bucket before the handler sees it."""
        cost = _METERED.get(method)
        charge = self._charge
        agents = self._limits.agents
        metered = cost is not None and agents.rate > 0

        async def incoming() -> AsyncIterator[Any]:
            async for request in requests:
                await _refuse_malformed(request, context)
                if metered:
                    assert cost is not None
                    # Insecure mode has no certificates: the stream names its agent.
                    agent_id = principal.agent_id or str(getattr(request, "agent_id", ""))[:128]
                    actor = f"agent:{agent_id}"
                    await charge(agents, agent_id, cost(request), actor, method, context, "verdicts")
                yield request

        return incoming()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # The aio handlers are coroutine functions and async generators; the stubs describe the
        # sync server's, hence Any.
        handler: Any = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:  # not a method of ours: gRPC answers UNIMPLEMENTED
            return None  # type: ignore[return-value]  # the stubs leave out the None gRPC allows
        audited = POLICY.get(method, (0, False))[1]
        # Health checking and reflection: no credentials to check, the same answers as the rest.
        admit = _admit_anyone if method.startswith(_PUBLIC_PREFIXES) else self._admit
        audit = self._audit
        incoming = self._incoming
        # Malformed messages reach the handlers as _Malformed, to be refused with a status.
        deserialize = _tolerant(handler.request_deserializer)

        async def finish(principal: Principal, request: object, context: Any, call: Awaitable[Any]) -> Any:
            if not audited:
                return await call
            try:
                response = await call
            except BaseException:
                code = context.code() if hasattr(context, "code") else None
                name = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
                await audit(principal.name, method, _target(request), name)
                raise
            await audit(principal.name, method, _target(request), "OK")
            return response

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                context = _OneLineContext(context)
                principal = await admit(method, context)
                await _refuse_malformed(request, context)
                return await finish(
                    principal, request, context, _guard(method, context, inner_uu(request, context))
                )

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, handler.response_serializer)
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                context = _OneLineContext(context)
                await admit(method, context)
                await _refuse_malformed(request, context)
                async for response in _guard_stream(method, context, inner_us(request, context)):
                    yield response

            async def unary_stream_writes(request: Any, context: Any) -> None:
                context = _OneLineContext(context)
                await admit(method, context)
                await _refuse_malformed(request, context)
                await _guard(method, context, inner_us(request, context))

            # A streaming handler is an async generator, or a coroutine that calls context.write
            # (grpc's own health servicer's Watch); the wrapper must be the same kind.
            return grpc.unary_stream_rpc_method_handler(
                unary_stream if inspect.isasyncgenfunction(inner_us) else unary_stream_writes,
                deserialize,
                handler.response_serializer,
            )
        if handler.stream_unary is not None:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: Any) -> Any:
                context = _OneLineContext(context)
                principal = await admit(method, context)
                call = inner_su(incoming(method, requests, context, principal), context)
                return await _guard(method, context, call)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, deserialize, handler.response_serializer
            )
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            context = _OneLineContext(context)
            principal = await admit(method, context)
            responses = inner_ss(incoming(method, requests, context, principal), context)
            async for response in _guard_stream(method, context, responses):
                yield response

        async def stream_stream_writes(requests: Any, context: Any) -> None:
            context = _OneLineContext(context)
            principal = await admit(method, context)
            await _guard(method, context, inner_ss(incoming(method, requests, context, principal), context))

        return grpc.stream_stream_rpc_method_handler(
            stream_stream if inspect.isasyncgenfunction(inner_ss) else stream_stream_writes,
            deserialize,
            handler.response_serializer,
        )


async def _admit_anyone(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
    return Principal(f"anyone {context.peer()}", OPEN)


async def _refuse_unexpected(method: str, context: Any, exc: Exception) -> NoReturn:
    """What a handler let escape, as a status: bad input (ValueError, OverflowError: a timestamp out
    of range, a number beyond SQLite's integers) is INVALID_ARGUMENT, anything else INTERNAL with
    the details in the log, never an exception's class and message on the wire."""
    if isinstance(exc, ValueError | OverflowError):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, (str(exc).splitlines() or [type(exc).__name__])[0]
        )
    logger.error("%s failed", method, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error in {method.rsplit('/', 1)[-1]}; the collector's log has it"
    )
    raise AssertionError("unreachable")  # abort always raises


async def _guard(method: str, context: Any, call: Awaitable[Any]) -> Any:
    try:
        return await call
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await _refuse_unexpected(method, context, exc)


async def _guard_stream(method: str, context: Any, responses: AsyncIterator[Any]) -> AsyncIterator[Any]:
    try:
        async for response in responses:
            yield response
    except grpc.aio.AbortError:
        raise
    except Exception as exc:
        await _refuse_unexpected(method, context, exc)


class _OneLineContext:
    """The servicer context handlers get: whatever a handler aborts with reaches the client as one
    short line. A reason may quote a client's string: a line break in it is escaped, and a long
    one cut (details travel in HTTP/2 trailers; past the client's limit on their size the client
    sees only "Stream removed", RESOURCE_EXHAUSTED, instead of the status).

    It also gives the call its request id: the caller's ``x-request-id`` metadata when it sends a
    usable one, else a new one. Log lines the call's own task writes carry it (logs.py; not those
    of the executor threads it hands work to), and the caller gets it back in the trailing
    metadata, with an error or without."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        sent = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_KEY), "")
        self.request_id = (
            sent if isinstance(sent, str) and _REQUEST_ID.fullmatch(sent) else secrets.token_hex(6)
        )
        REQUEST_ID.set(self.request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self._context.set_trailing_metadata((*trailing_metadata, (REQUEST_ID_KEY, self.request_id)))

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, Any]] = ()
    ) -> NoReturn:
        details = details.translate(_LINE_BREAKS)
        if len(details) > _MAX_DETAILS:
            details = details[: _MAX_DETAILS - 1] + "…"
        if trailing_metadata:
            trailing_metadata = (*trailing_metadata, (REQUEST_ID_KEY, self.request_id))
        await self._context.abort(code, details, trailing_metadata)
        raise AssertionError("unreachable")  # abort always raises


REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


# Characters of a status's details at most (percent-encoded in the trailers: up to 12 bytes each).
_MAX_DETAILS = 300
# What str.splitlines() splits on -> its escape: a status's details are one line.
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class _Malformed:
    """A request that did not parse as its message type (why, in one line)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, returning _Malformed instead of raising: gRPC would answer a parse error
    with UNKNOWN and the exception's class; the handler wrappers answer INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return _Malformed((str(exc).splitlines() or ["cannot parse"])[0])

    return parse


async def _refuse_malformed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {request.reason}")


def valid_agent_id(agent_id: str) -> bool:
    return bool(_AGENT_ID.match(agent_id))
