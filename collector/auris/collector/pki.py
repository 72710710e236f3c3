"""The collector's certificate authority: create it, issue the collector's serving certificate, and
sign agents' certificate requests at enrollment and renewal (the agent's key never leaves the agent).

Keys are ECDSA P-256. An agent certificate's common name is its agent id; the collector
takes the caller's agent id from it, never from the request alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from auris.agent.signing import private_key_pem, public_key_pem

__all__ = [
    "AgentSigner",
    "PkiError",
    "PkiPaths",
    "csr_common_name",
    "fingerprint",
    "init_pki",
    "load_ca",
    "sign_agent_csr",
]


class PkiError(ValueError):
    """A certificate, key or request is unusable; one line."""


@dataclasses.dataclass(frozen=True)
class PkiPaths:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    # Ed25519: the collector signs models with it; agents learn the public half at enrollment.
    model_key: Path


def fingerprint(cert_pem: bytes) -> str:
    """sha256 of the certificate's DER encoding, hex: what enrollment tokens pin."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Auris"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: float, serial: int = 0
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def init_pki(folder: Path, names: list[str], days: float = 825, *, force: bool = False) -> PkiPaths:
    """Create a CA and the collector's serving certificate (SANs ``names``) in ``folder``.

    The serving certificate file holds the chain (collector certificate, then the CA), so that
    enrolling agents can check the CA against the fingerprint their token pins.
    """
    if not names:
        raise PkiError("give at least one name (DNS name or IP address) the agents use for the collector")
    paths = PkiPaths(
        folder / "ca.pem", folder / "ca.key", folder / "collector.pem", folder / "collector.key",
        folder / "models.key",
    )  # fmt: skip
    existing = [p for p in dataclasses.astuple(paths) if p.exists()]
    if existing and not force:
        raise PkiError(f"{existing[0]} exists; refusing to replace a CA (--force replaces it, and every "
                       "enrolled agent must enroll again)")  # fmt: skip
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Auris collector CA")
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key(), days * 4)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(names[0]), ca_name, key.public_key(), days)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    _write(paths.ca_cert, ca_pem, private=False)
    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM) + ca_pem, private=False)
    _write(paths.key, _key_pem(key), private=True)
    model_key = Ed25519PrivateKey.generate()
    _write(paths.model_key, private_key_pem(model_key), private=True)
    _write(
        paths.model_key.with_suffix(".pub"), public_key_pem(model_key.public_key()).encode(), private=False
    )
    return paths


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot load the CA ({cert_path}, {key_path}): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key_path}: expected an EC private key")
    return ca, key


def _load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        return x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise PkiError("csr_pem is not a PEM certificate signing request") from None


def csr_common_name(csr_pem: bytes) -> str:
    """The agent id a certificate signing request asks for (its common name)."""
    names = _load_csr(csr_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise PkiError("the certificate signing request has no common name (the agent id)")
    return str(names[0].value)


def sign_agent_csr(
    ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, csr_pem: bytes, agent_id: str, days: float
) -> tuple[bytes, str]:
    """A client certificate for ``agent_id`` over the request's key; (PEM, serial as hex)."""
    csr = _load_csr(csr_pem)
    if not csr.is_signature_valid:
        raise PkiError("the certificate signing request's signature does not verify")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PkiError("the certificate signing request must carry an EC key")
    serial = x509.random_serial_number()
    cert = (
        _builder(_name(agent_id), ca.subject, public_key, days, serial)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(_san([agent_id]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), format(serial, "x")


class AgentSigner:
    """The collector's CA, loaded to sign agent certificates at enrollment and renewal."""

    def __init__(self, cert_path: Path, key_path: Path, days: float) -> None:
        self.ca, self._key = load_ca(cert_path, key_path)
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)
        self.ca_sha256 = fingerprint(self.ca_pem)
        self._days = days

    def sign(self, csr_pem: bytes, agent_id: str) -> tuple[bytes, str]:
        return sign_agent_csr(self.ca, self._key, csr_pem, agent_id, self._days)
