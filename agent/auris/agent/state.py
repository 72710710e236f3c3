"""Durable agent state: its id and a sequence counter that never repeats across restarts."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

__all__ = ["SequenceCounter", "agent_identity"]


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


def agent_identity(state_dir: Path, configured: str = "") -> str:
    """The configured id, else the one stored in ``state_dir``, else a new stored one."""
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


class SequenceCounter:
    """Hands out strictly increasing sequence numbers that survive restarts.

    Numbers are reserved on disk in blocks, so a restart skips the rest of the
    block instead of reusing a number the collector may already hold (it stores
    each (agent id, sequence) once and would drop a reused one as a duplicate).
    """

    def __init__(self, path: Path, block: int = 4096) -> None:
        self._path = path
        self._block = block
        reserved = 0
        if path.exists():
            text = path.read_text(encoding="utf-8").strip()
            try:
                reserved = int(text)
            except ValueError:
                raise ValueError(
                    f"{path}: corrupt sequence file ({text[:20]!r}); remove it to restart at 1"
                ) from None
        self._next = reserved + 1
        self._reserved = reserved

    def next(self) -> int:
        if self._next > self._reserved:
            self._reserved = self._next + self._block - 1
            self._path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(self._path, f"{self._reserved}\n")
        value = self._next
        self._next += 1
        return value
