"""Agent certificate renewal: a new key and certificate before the current ones expire.

At start and every hour the renewer looks at the certificate the agent connects with. Within
``cert_renew_before_days`` of its expiry it makes a new key and a signing request for the same
agent id, asks the collector for a certificate (``RenewCertificate``, over the current mTLS
channel), installs both in state_dir/pki and re-opens the collector channel, so that every
later call presents the new certificate; no restart. A failure is logged in one line and
retried with backoff; the old pair stays in place and in use until the new one is written.

Two files cannot be replaced at once: the new pair is written beside the old one (``.new``,
synced), then the key and the certificate are renamed over the old ones, in that order.
:func:`finish_interrupted_renewal`, at start, completes a swap a crash cut between the two
renames, or drops the leftovers of one that had not begun.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from auris.agent.enroll import certificate_request
from auris.agent.state import certificate_identity
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc

__all__ = [
    "CertificateRenewer",
    "RenewError",
    "ReopenableChannel",
    "finish_interrupted_renewal",
    "renew_certificate",
]

logger = logging.getLogger(__name__)


class RenewError(Exception):
    """A renewal failed; one line. The current certificate stays in use."""


def _staged(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_synced(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install_pair(cert_file: Path, key_file: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Replace the agent's key and certificate, as safely as two files allow (see the module)."""
    _write_synced(_staged(key_file), key_pem, 0o600)
    _write_synced(_staged(cert_file), cert_pem, 0o644)
    _sync_dir(cert_file.parent)
    os.replace(_staged(key_file), key_file)
    os.replace(_staged(cert_file), cert_file)
    _sync_dir(cert_file.parent)


def finish_interrupted_renewal(cert_file: Path, key_file: Path) -> str:
    """Complete a renewal interrupted between its renames, or drop what an earlier one left
    half-written; returns what was done ('' when there was nothing to do)."""
    cert_new, key_new = _staged(cert_file), _staged(key_file)
    if not (cert_new.exists() or key_new.exists()):
        return ""
    # The staged certificate is written after the staged key is synced: when it matches a key,
    # both are whole. Without a staged key, the key was already renamed into place.
    try:
        cert = x509.load_pem_x509_certificate(cert_new.read_bytes())
        key: PrivateKeyTypes = serialization.load_pem_private_key(
            (key_new if key_new.exists() else key_file).read_bytes(), password=None
        )
        whole = _public_der(cert.public_key()) == _public_der(key.public_key())
    except (OSError, ValueError, TypeError):
        whole = False
    if whole:
        if key_new.exists():
            os.replace(key_new, key_file)
        os.replace(cert_new, cert_file)
        _sync_dir(cert_file.parent)
        return f"completed an interrupted certificate renewal in {cert_file.parent}"
    cert_new.unlink(missing_ok=True)
    key_new.unlink(missing_ok=True)
    return f"dropped a half-written certificate renewal in {cert_file.parent}; the current certificate stays"


def renew_certificate(
    channel: grpc.Channel, cert_file: Path, key_file: Path, ca_file: Path, timeout_s: float = 30.0
) -> x509.Certificate:
    """Ask the collector for a new certificate over a new key and install both; RenewError when
    it refuses, is unreachable or answers with a certificate that is not for this key and id."""
    try:
        agent_id = certificate_identity(str(cert_file))
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise RenewError(str(exc)) from None
    key, csr_pem = certificate_request(agent_id)
    request = agent_service_pb2.RenewCertificateRequest(csr_pem=csr_pem)
    try:
        response = agent_service_pb2_grpc.AgentServiceStub(channel).RenewCertificate(
            request, timeout=timeout_s
        )
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        raise RenewError(f"the collector refused: {code}: {details}") from None
    try:
        cert = x509.load_pem_x509_certificate(response.certificate_pem.encode())
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise RenewError("the collector answered with a certificate its CA did not issue") from None
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    if not names or names[0].value != agent_id:
        raise RenewError(f"the collector answered with a certificate for another id than {agent_id}")
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise RenewError("the collector answered with a certificate for another key")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        _install_pair(cert_file, key_file, cert.public_bytes(serialization.Encoding.PEM), key_pem)
    except OSError as exc:
        raise RenewError(f"cannot write the new certificate into {cert_file.parent}: {exc}") from None
    return cert


class _Deferred:
    """A multi-callable that binds to the channel current at each call."""

    def __init__(self, bind: Callable[[], Any]) -> None:
        self._bind = bind

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._bind()(*args, **kwargs)

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._bind().with_call(*args, **kwargs)

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._bind().future(*args, **kwargs)


class ReopenableChannel(grpc.Channel):
    """A collector channel that can be opened again, with a renewed certificate.

    Stubs made on it keep working: each call goes over the channel current when it starts.
    reopen() closes the previous channel, which ends the calls still on it (CANCELLED); the
    uplink and the model watcher reconnect at once, over the new one.
    """

    def __init__(self, open_channel: Callable[[], grpc.Channel]) -> None:
        self._open = open_channel
        self._current = open_channel()

    def reopen(self) -> None:
        old, self._current = self._current, self._open()
        old.close()

    def _method(self, kind: str, method: str, serializer: Any, deserializer: Any, kwargs: Any) -> Any:
        return _Deferred(lambda: getattr(self._current, kind)(method, serializer, deserializer, **kwargs))

    def unary_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kwargs: Any
    ) -> grpc.UnaryUnaryMultiCallable[Any, Any]:
        return cast(
            "grpc.UnaryUnaryMultiCallable[Any, Any]",
            self._method("unary_unary", method, request_serializer, response_deserializer, kwargs),
        )

    def unary_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kwargs: Any
    ) -> grpc.UnaryStreamMultiCallable[Any, Any]:
        return cast(
            "grpc.UnaryStreamMultiCallable[Any, Any]",
            self._method("unary_stream", method, request_serializer, response_deserializer, kwargs),
        )

    def stream_unary(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kwargs: Any
    ) -> grpc.StreamUnaryMultiCallable[Any, Any]:
        return cast(
            "grpc.StreamUnaryMultiCallable[Any, Any]",
            self._method("stream_unary", method, request_serializer, response_deserializer, kwargs),
        )

    def stream_stream(
        self, method: str, request_serializer: Any = None, response_deserializer: Any = None, **kwargs: Any
    ) -> grpc.StreamStreamMultiCallable[Any, Any]:
        return cast(
            "grpc.StreamStreamMultiCallable[Any, Any]",
            self._method("stream_stream", method, request_serializer, response_deserializer, kwargs),
        )

    def subscribe(
        self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False
    ) -> None:
        self._current.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._current.unsubscribe(callback)

    def close(self) -> None:
        self._current.close()


class CertificateRenewer:
    """Renews the agent's certificate from a background thread, ``renew_before_days`` before it
    expires (0: never), checking at start and every ``check_interval_s``.

    ``renewable`` is False when the certificate files are not the enrolled ones (state_dir/pki):
    the agent leaves those to whoever put them there, and only warns. ``on_renewed`` runs once a
    new pair is installed (it re-opens the channel).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        cert_file: Path,
        key_file: Path,
        ca_file: Path,
        *,
        renew_before_days: float,
        on_renewed: Callable[[], None],
        renewable: bool = True,
        check_interval_s: float = 3600.0,
        retry_s: float = 60.0,
        timeout_s: float = 30.0,
    ) -> None:
        self._channel = channel
        self._cert_file = cert_file
        self._key_file = key_file
        self._ca_file = ca_file
        self._window = dt.timedelta(days=renew_before_days)
        self._on_renewed = on_renewed
        self._renewable = renewable
        self._check_interval_s = check_interval_s
        self._retry_s = retry_s
        self._backoff_s = retry_s
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="auris-renewal", daemon=True)
        # When the certificate in use expires (for heartbeats and metrics); None until read.
        self.expires: dt.datetime | None = None
        self.renewed = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._timeout_s + 1)

    def report(self, heartbeat: agent_service_pb2.HeartbeatRequest) -> agent_service_pb2.HeartbeatRequest:
        """The heartbeat, with the certificate's expiry."""
        if self.expires is not None:
            heartbeat.health.certificate_expire_time.FromDatetime(self.expires)
        return heartbeat

    def _backoff(self) -> float:
        delay = min(self._backoff_s, self._check_interval_s) * (0.5 + random.random())
        self._backoff_s = min(self._backoff_s * 2, self._check_interval_s)
        return delay

    def _retry(self, reason: str) -> float:
        delay = self._backoff()
        logger.error("certificate renewal failed (%s); retrying in %.0fs", reason, delay)
        return delay

    def check(self) -> float:
        """Renew if due; the seconds until the next check."""
        try:
            current = x509.load_pem_x509_certificate(self._cert_file.read_bytes())
        except (OSError, ValueError) as exc:
            return self._retry(f"cannot read {self._cert_file}: {exc}")
        self.expires = current.not_valid_after_utc
        left = self.expires - dt.datetime.now(dt.UTC)
        if left <= dt.timedelta(0):
            logger.error(
                "the agent certificate %s expired on %s and the collector refuses it: enroll again "
                "(auris-agent enroll --token ...) and restart the agent",
                self._cert_file,
                f"{self.expires:%Y-%m-%d %H:%M}Z",
            )
            return self._check_interval_s
        if not self._window or left > self._window:
            return self._check_interval_s
        if not self._renewable:
            logger.warning(
                "the agent certificate %s expires on %s; it is not the enrolled one (state_dir/pki), "
                "so the agent does not renew it: replace it, or enroll",
                self._cert_file,
                f"{self.expires:%Y-%m-%d}",
            )
            return self._check_interval_s
        try:
            new = renew_certificate(
                self._channel, self._cert_file, self._key_file, self._ca_file, self._timeout_s
            )
        except RenewError as exc:
            return self._retry(str(exc))
        self._backoff_s = self._retry_s
        self.renewed += 1
        logger.info(
            "renewed the agent certificate: serial %x, valid until %s (the old one until %s); "
            "reconnecting with it",
            new.serial_number,
            f"{new.not_valid_after_utc:%Y-%m-%d %H:%M}Z",
            f"{self.expires:%Y-%m-%d %H:%M}Z",
        )
        self.expires = new.not_valid_after_utc
        try:
            self._on_renewed()
        except (OSError, ValueError) as exc:
            logger.error("cannot re-open the collector channel with the new certificate: %s", exc)
        if self.expires - dt.datetime.now(dt.UTC) <= self._window:
            logger.warning(
                "the collector issues certificates shorter than cert_renew_before_days: the agent "
                "renews at every check; lower cert_renew_before_days"
            )
        return self._check_interval_s

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                delay = self.check()
            except Exception:  # never let renewal take the agent down: the certificate still works
                delay = self._backoff()
                logger.exception("certificate renewal failed unexpectedly; retrying in %.0fs", delay)
