"""Model signatures: Ed25519 over the manifest, which pins the ONNX file by its sha256.

The signed bytes are the manifest's deterministic protobuf encoding with ``signature``
cleared (``signing_key_id`` stays in, so a signature cannot be moved to another key's
name). A key's id is the first 16 hex digits of the sha256 of its raw public bytes.

Who signs: the shipped models carry the Auris release key's signature (its public key
ships inside this package, ``keys/*.pub``); the collector signs every model it registers
without one with its own key, which agents learn at enrollment. An agent runs a model only
when a key it trusts verifies the manifest and the ONNX file's sha256 matches it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from auris.agent.manifest import ManifestError
from auris.v1 import model_pb2

__all__ = [
    "RELEASE_KEYS_DIR",
    "ModelTrust",
    "generate_signing_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "private_key_pem",
    "public_key_pem",
    "sign_manifest",
    "signed_payload",
]

# Public keys of the Auris release, trusted by every agent and collector.
RELEASE_KEYS_DIR = Path(__file__).parent / "keys"


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes; ValueError naming ``where`` otherwise."""
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{where}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{where}: not an Ed25519 public key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 signing key in ``path`` (PEM, PKCS#8, unencrypted)."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ValueError(f"signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ValueError(f"signing key {path}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {path}: not an Ed25519 key")
    return key


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a new signing key at ``path`` (mode 0600) and its public key beside it (``.pub``)."""
    key = Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_key_pem(key))
    path.with_suffix(".pub").write_text(public_key_pem(key.public_key()))
    return key


def signed_payload(manifest: model_pb2.ModelManifest) -> bytes:
    unsigned = model_pb2.ModelManifest()
    unsigned.CopyFrom(manifest)
    unsigned.ClearField("signature")
    return unsigned.SerializeToString(deterministic=True)


def sign_manifest(manifest: model_pb2.ModelManifest, key: Ed25519PrivateKey) -> None:
    """Sign ``manifest`` in place (its ``onnx_sha256`` must already name the final file)."""
    manifest.signing_key_id = key_id(key.public_key())
    manifest.signature = base64.b64encode(key.sign(signed_payload(manifest))).decode()


@dataclasses.dataclass(frozen=True)
class ModelTrust:
    """The keys whose model signatures this process accepts."""

    keys: Mapping[str, Ed25519PublicKey]
    # Development only: run models without a signature (a bad signature is still refused).
    allow_unsigned: bool = False

    @classmethod
    def load(cls, paths: Iterable[Path], *, allow_unsigned: bool = False, release: bool = True) -> ModelTrust:
        """Trust the given PEM public key files, and the release keys unless ``release`` is False."""
        files = list(paths)
        if release:
            files += sorted(RELEASE_KEYS_DIR.glob("*.pub"))
        keys: dict[str, Ed25519PublicKey] = {}
        for path in files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ValueError(f"model key {path}: {exc.strerror}") from None
            key = load_public_key(data, f"model key {path}")
            keys[key_id(key)] = key
        return cls(keys, allow_unsigned)

    def with_key(self, key: Ed25519PublicKey) -> ModelTrust:
        return dataclasses.replace(self, keys={**self.keys, key_id(key): key})

    def verify(self, manifest: model_pb2.ModelManifest, where: str) -> None:
        """Raise ManifestError (one line) unless a trusted key signed ``manifest``."""
        name = f"{manifest.model_id}@{manifest.version}"
        if not manifest.signature:
            if self.allow_unsigned:
                return
            raise ManifestError(f"{where}: {name} is not signed; refusing an unsigned model")
        key = self.keys.get(manifest.signing_key_id)
        if key is None:
            raise ManifestError(
                f"{where}: {name} is signed by key {manifest.signing_key_id or '(none named)'}, "
                "which is not trusted here"
            )
        try:
            signature = base64.b64decode(manifest.signature, validate=True)
            key.verify(signature, signed_payload(manifest))
        except (InvalidSignature, binascii.Error):
            raise ManifestError(
                f"{where}: the signature of {name} does not verify; refusing a modified model"
            ) from None
