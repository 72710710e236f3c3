"""Durable agent identity (the sequence counter lives in the spool, see spool.py)."""

from __future__ import annotations

import fcntl
import os
import socket
import uuid
from pathlib import Path

__all__ = ["agent_identity", "certificate_identity", "desired_models_file", "lock_state_dir", "models_folder"]


def models_folder(state_dir: Path) -> Path:
    """Where the models the collector sent are kept (model_updates.py)."""
    return state_dir / "models"


def desired_models_file(state_dir: Path) -> Path:
    """The model set the collector last asked for: while it exists, the agent runs that set."""
    return models_folder(state_dir) / "desired.json"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def certificate_identity(cert_file: str) -> str:
    """The agent id an agent certificate carries (its common name): the collector knows the
    agent by it, so the agent must use it too."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the agent certificate {cert_file}: {exc}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError(f"the agent certificate {cert_file} has no common name")
    return str(names[0].value)


def agent_identity(state_dir: Path, configured: str = "", cert_file: str = "") -> str:
    """The certificate's id (which a configured id must equal), else the configured id, else the
    one stored in ``state_dir``, else a new stored one."""
    if cert_file:
        certified = certificate_identity(cert_file)
        if configured and configured != certified:
            raise ValueError(f"agent_id {configured!r} differs from the certificate's {certified!r}")
        return certified
    if configured:
        return configured
    path = state_dir / "agent-id"
    if path.exists():
        stored = path.read_text(encoding="utf-8").strip()
        if stored:
            return stored
    new = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    state_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, new + "\n")
    return new


def lock_state_dir(state_dir: Path) -> int:
    """Hold an exclusive lock on ``state_dir`` for the life of the process; return its fd.

    Two agents sharing a state directory would hand out the same sequence numbers.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError("another auris-agent is using this state directory") from None
    return fd
