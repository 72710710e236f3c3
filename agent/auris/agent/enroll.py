"""``auris-agent enroll``: trade a one-time token for this agent's certificate.

The agent trusts nothing it has not pinned: it opens a TLS connection to the collector's API
port, looks for the CA whose sha256 the enrollment command printed among the certificates the
collector presents, checks that the collector's certificate was issued by it, and only then
talks gRPC over TLS verified against that CA. Its private key is made here and never leaves
the host; the collector signs a request for it.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from auris.agent import __version__
from auris.agent.signing import load_public_key
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc

__all__ = ["EnrollError", "certificate_request", "enroll", "enrolled_files", "model_key_file", "pinned_ca"]


class EnrollError(Exception):
    """Enrollment failed; one line."""


def enrolled_files(state_dir: Path) -> tuple[Path, Path, Path]:
    """Where an enrolled agent keeps (CA certificate, its certificate, its key)."""
    folder = state_dir / "pki"
    return folder / "ca.pem", folder / "agent.pem", folder / "agent.key"


def model_key_file(state_dir: Path) -> Path:
    """Where an enrolled agent keeps the collector's model-signing public key."""
    return state_dir / "pki" / "models.pub"


def _presented_chain(host: str, port: int, timeout_s: float) -> list[bytes]:
    """The certificates (DER) the server presents, unverified: we verify them ourselves."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # Public from Python 3.13; the same method on the C object before.
            getter = getattr(tls, "get_unverified_chain", None) or tls._sslobj.get_unverified_chain  # type: ignore[attr-defined]
            return [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in getter()]  # type: ignore[attr-defined]
    except OSError as exc:
        raise EnrollError(f"cannot reach {host}:{port} over TLS: {exc}") from None


def pinned_ca(host: str, port: int, ca_sha256: str, timeout_s: float = 10.0) -> bytes:
    """The collector's CA certificate (PEM), found by its pinned sha256 and shown to have issued the
    collector's certificate."""
    chain = _presented_chain(host, port, timeout_s)
    if not chain:
        raise EnrollError(f"{host}:{port} presented no certificate")
    wanted = ca_sha256.lower().replace(":", "")
    ca_der = next((der for der in chain if hashlib.sha256(der).hexdigest() == wanted), None)
    if ca_der is None:
        raise EnrollError(
            f"{host}:{port} does not present the CA with sha256 {wanted[:16]}…; refusing to enroll "
            "(wrong collector, or a machine in the middle)"
        )
    ca = x509.load_der_x509_certificate(ca_der)
    leaf = x509.load_der_x509_certificate(chain[0])
    try:
        leaf.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise EnrollError(f"the collector's certificate was not issued by the pinned CA ({exc!r})") from None
    return ca.public_bytes(serialization.Encoding.PEM)


def certificate_request(agent_id: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A new key (ECDSA P-256) and a PEM signing request for it naming ``agent_id``."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, agent_id)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def enroll(
    target: str, token: str, ca_sha256: str, state_dir: Path, agent_id: str = "", timeout_s: float = 30.0
) -> str:
    """Enroll with the collector at ``target`` (its API port); write the CA, certificate and key
    into ``state_dir``; return the agent id granted."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise EnrollError(f"expected HOST:PORT, got {target!r}")
    ca_pem = pinned_ca(host.strip("[]"), int(port), ca_sha256)
    key, csr_pem = certificate_request(agent_id or "auris-agent")
    request = agent_service_pb2.EnrollRequest(
        token=token,
        agent_id=agent_id,
        hostname=socket.gethostname(),
        csr_pem=csr_pem,
        agent_version=__version__,
    )
    with grpc.secure_channel(target, grpc.ssl_channel_credentials(ca_pem)) as channel:
        try:
            response = agent_service_pb2_grpc.AgentServiceStub(channel).Enroll(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise EnrollError(f"the collector refused: {code}: {details}") from None
    if response.ca_certificate_pem.encode() != ca_pem:
        raise EnrollError("the collector answered with another CA than the pinned one")
    ca_path, cert_path, key_path = enrolled_files(state_dir)
    ca_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    cert_path.write_text(response.certificate_pem, encoding="utf-8")
    ca_path.write_bytes(ca_pem)
    if response.model_signing_key_pem:
        # Arrived over the channel authenticated by the pinned CA: the key this collector signs with.
        try:
            load_public_key(response.model_signing_key_pem.encode(), "the collector's model key")
        except ValueError as exc:
            raise EnrollError(str(exc)) from None
        model_key_file(state_dir).write_text(response.model_signing_key_pem, encoding="utf-8")
    return response.agent_id
