"""The model registry: every model version the collector knows, its stage, signature and rollout.

Versions are immutable: a version comes in once, and the same (model id, version) with
other bytes is refused. Each is signed: a signature a trusted key verifies is kept, an
unsigned model is signed with the collector's key (and refused when it has none, unless
unsigned models are allowed for development). The first version of a model id goes into
production; later ones arrive as candidates until promoted. The production versions of
network models are the set agents run (``desired``); promotion, rollback and retirement
change it, and agents follow within seconds. Rollback restores the version that was in
production before the current one, again and again down the history.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auris.agent.manifest import ManifestError, check_manifest, find_manifests, onnx_path_of, read_manifest
from auris.agent.signing import ModelTrust, sign_manifest
from auris.collector.store import VerdictStore
from auris.v1 import admin_service_pb2, model_pb2

__all__ = ["ImportResult", "ModelRegistry", "StageError"]

logger = logging.getLogger(__name__)

_COLUMNS = "manifest_pb, stage, registered_ns, promoted_ns"
CANDIDATE = admin_service_pb2.MODEL_STAGE_CANDIDATE
PRODUCTION = admin_service_pb2.MODEL_STAGE_PRODUCTION
RETIRED = admin_service_pb2.MODEL_STAGE_RETIRED
SHADOW = admin_service_pb2.MODEL_STAGE_SHADOW


# (production, shadow) versions agents should run.
_Wanted = tuple[list[model_pb2.ModelRef], list[model_pb2.ModelRef]]


class StageError(Exception):
    """A lifecycle step that the model's current stage does not allow (FAILED_PRECONDITION)."""


@dataclasses.dataclass
class ImportResult:
    registered: list[str] = dataclasses.field(default_factory=list)
    # Already registered with the same bytes.
    unchanged: list[str] = dataclasses.field(default_factory=list)
    # One line each: the manifest's path and why it was refused.
    refused: list[str] = dataclasses.field(default_factory=list)


def _registered(row: Sequence[Any]) -> admin_service_pb2.RegisteredModel:
    manifest_pb, stage, registered_ns, promoted_ns = row
    model = admin_service_pb2.RegisteredModel(stage=stage)
    model.manifest.ParseFromString(manifest_pb)
    model.registered_time.FromNanoseconds(registered_ns)
    if promoted_ns:
        model.promoted_time.FromNanoseconds(promoted_ns)
    return model


def _stage_of(conn: sqlite3.Connection, ref: model_pb2.ModelRef) -> tuple[int]:
    row = conn.execute(
        "SELECT stage FROM models WHERE model_id = ? AND version = ?", (ref.model_id, ref.version)
    ).fetchone()
    if row is None:
        raise LookupError(f"no model {ref.model_id}@{ref.version}")
    return (int(row[0]),)


class ModelRegistry:
    """Registry operations over the collector's database."""

    def __init__(
        self,
        store: VerdictStore,
        trust: ModelTrust | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        self._store = store
        # Unsigned models are signed here when there is a key; without one, trust decides.
        self._trust = trust or ModelTrust.load([])
        self._signing_key = signing_key
        if signing_key is not None:
            self._trust = self._trust.with_key(signing_key.public_key())
        # Bumped by every change of what agents should run; watchers compare it.
        self._generation = 0
        self._desired_cache: tuple[int, _Wanted] | None = None
        self._lock = threading.Lock()

    @property
    def trust(self) -> ModelTrust:
        """The keys this collector accepts model signatures from (its own included)."""
        return self._trust

    @property
    def generation(self) -> int:
        return self._generation

    def _changed(self) -> None:
        with self._lock:
            self._generation += 1

    def import_dir(self, folder: Path) -> ImportResult:
        """Register every model (``*.manifest.json`` + its ONNX file) in ``folder``; a bad one is
        refused with a one-line reason and the rest still come in."""
        result = ImportResult()
        found: list[tuple[model_pb2.ModelManifest, Path]] = []
        for path in find_manifests(folder):
            try:
                found.append((read_manifest(path), path))
            except ManifestError as exc:
                result.refused.append(str(exc).splitlines()[0])
        # Oldest first within a model id, so the first production version is the oldest.
        found.sort(key=lambda item: (item[0].model_id, item[0].created_time.ToNanoseconds(), item[0].version))
        for manifest, path in found:
            try:
                added = self.register(manifest, onnx_path_of(path, manifest).read_bytes(), str(path))
            except ManifestError as exc:  # its message starts with the path
                result.refused.append(str(exc).splitlines()[0])
                continue
            except OSError as exc:
                result.refused.append(f"{path}: {exc.strerror or exc}")
                continue
            (result.registered if added else result.unchanged).append(
                f"{manifest.model_id}@{manifest.version}"
            )
        return result

    def _check_and_sign(self, manifest: model_pb2.ModelManifest, onnx: bytes, where: str) -> None:
        check_manifest(manifest, where)
        actual = hashlib.sha256(onnx).hexdigest()
        if actual != manifest.onnx_sha256:
            raise ManifestError(
                f"{where}: the ONNX bytes hash to {actual[:12]}…, the manifest says "
                f"{manifest.onnx_sha256[:12]}…; refusing a modified model"
            )
        if manifest.signature:
            self._trust.verify(manifest, where)  # a bad or foreign signature is never replaced
        elif self._signing_key is not None:
            sign_manifest(manifest, self._signing_key)
        else:
            self._trust.verify(manifest, where)  # unsigned: allowed only for development

    def register(self, manifest: model_pb2.ModelManifest, onnx: bytes, where: str = "") -> bool:
        """Check, sign when unsigned, and store one model version; False when it is already there
        with the same bytes. ``manifest`` is signed in place."""
        where = where or f"{manifest.model_id}@{manifest.version}"
        self._check_and_sign(manifest, onnx, where)
        now = time.time_ns()
        with self._store.writing() as conn:
            row = conn.execute(
                "SELECT sha256 FROM models WHERE model_id = ? AND version = ?",
                (manifest.model_id, manifest.version),
            ).fetchone()
            if row is not None:
                if row[0] != manifest.onnx_sha256:
                    raise ManifestError(
                        f"{where}: {manifest.model_id}@{manifest.version} is already registered with other "
                        "bytes (sha256 differs); give the new model a new version"
                    )
                return False
            (known,) = conn.execute(
                "SELECT COUNT(*) FROM models WHERE model_id = ?", (manifest.model_id,)
            ).fetchone()
            # The first version of a model id goes straight into production.
            stage = CANDIDATE if known else PRODUCTION
            conn.execute(
                "INSERT INTO models (model_id, version, domain, stage, sha256, manifest_pb, onnx,"
                " registered_ns, promoted_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    manifest.model_id,
                    manifest.version,
                    manifest.domain,
                    stage,
                    manifest.onnx_sha256,
                    manifest.SerializeToString(deterministic=True),
                    onnx,
                    now,
                    now if stage == PRODUCTION else None,
                ),
            )
        if stage == PRODUCTION:
            self._changed()
        return True

    def promote(self, ref: model_pb2.ModelRef) -> admin_service_pb2.RegisteredModel:
        """Put ``ref`` into production; the version there before becomes a candidate again (and is
        what a rollback restores)."""
        if not ref.model_id or not ref.version:
            raise ValueError("promote needs a model id and a version")
        now = time.time_ns()
        with self._store.writing() as conn:
            row = _stage_of(conn, ref)
            if row[0] == PRODUCTION:
                raise StageError(f"{ref.model_id}@{ref.version} is already in production")
            if row[0] == RETIRED:
                raise StageError(f"{ref.model_id}@{ref.version} is retired; register a new version")
            conn.execute(
                "UPDATE models SET stage = ? WHERE model_id = ? AND stage = ?",
                (CANDIDATE, ref.model_id, PRODUCTION),
            )
            conn.execute(
                "UPDATE models SET stage = ?, promoted_ns = ? WHERE model_id = ? AND version = ?",
                (PRODUCTION, now, ref.model_id, ref.version),
            )
        self._changed()
        return self.get(ref)

    def rollback(self, model_id: str) -> admin_service_pb2.RegisteredModel:
        """Restore the version promoted before the current production one."""
        if not model_id:
            raise ValueError("rollback needs a model id")
        with self._store.writing() as conn:
            current = conn.execute(
                "SELECT version FROM models WHERE model_id = ? AND stage = ?", (model_id, PRODUCTION)
            ).fetchone()
            if current is None:
                raise StageError(f"{model_id} has no version in production to roll back")
            previous = conn.execute(
                "SELECT version FROM models WHERE model_id = ? AND stage = ? AND promoted_ns IS NOT NULL"
                " ORDER BY promoted_ns DESC LIMIT 1",
                (model_id, CANDIDATE),
            ).fetchone()
            if previous is None:
                raise StageError(f"{model_id}@{current[0]} has no earlier production version to roll back to")
            # The rolled-back version loses its place in the history, so a second rollback goes
            # further back instead of returning to it.
            conn.execute(
                "UPDATE models SET stage = ?, promoted_ns = NULL WHERE model_id = ? AND version = ?",
                (CANDIDATE, model_id, current[0]),
            )
            conn.execute(
                "UPDATE models SET stage = ? WHERE model_id = ? AND version = ?",
                (PRODUCTION, model_id, previous[0]),
            )
        self._changed()
        return self.get(model_pb2.ModelRef(model_id=model_id, version=previous[0]))

    def retire(self, ref: model_pb2.ModelRef) -> admin_service_pb2.RegisteredModel:
        """Take a version out of service for good; retiring the production version stops the model
        on every agent (none of its versions is wanted any more)."""
        if not ref.model_id or not ref.version:
            raise ValueError("retire needs a model id and a version")
        with self._store.writing() as conn:
            row = _stage_of(conn, ref)
            if row[0] == RETIRED:
                raise StageError(f"{ref.model_id}@{ref.version} is already retired")
            conn.execute(
                "UPDATE models SET stage = ? WHERE model_id = ? AND version = ?",
                (RETIRED, ref.model_id, ref.version),
            )
        if row[0] in (PRODUCTION, SHADOW):
            self._changed()
        return self.get(ref)

    def shadow(self, ref: model_pb2.ModelRef, enabled: bool = True) -> admin_service_pb2.RegisteredModel:
        """Run a candidate beside production on agents (its scores recorded, never deciding), or stop.

        One shadow per model id: a new one sends the previous back to the candidates.
        """
        if not ref.model_id or not ref.version:
            raise ValueError("shadow needs a model id and a version")
        with self._store.writing() as conn:
            row = _stage_of(conn, ref)
            if enabled and row[0] != CANDIDATE:
                raise StageError(
                    f"{ref.model_id}@{ref.version} is not a candidate; only candidates run in shadow"
                )
            if not enabled and row[0] != SHADOW:
                raise StageError(f"{ref.model_id}@{ref.version} is not in shadow")
            if enabled:
                conn.execute(
                    "UPDATE models SET stage = ? WHERE model_id = ? AND stage = ?",
                    (CANDIDATE, ref.model_id, SHADOW),
                )
            conn.execute(
                "UPDATE models SET stage = ? WHERE model_id = ? AND version = ?",
                (SHADOW if enabled else CANDIDATE, ref.model_id, ref.version),
            )
        self._changed()
        return self.get(ref)

    def _wanted(self, stage: int, domain: int) -> list[model_pb2.ModelRef]:
        rows = self._store.reader().execute(
            "SELECT model_id, version FROM models WHERE stage = ? AND domain = ? ORDER BY model_id",
            (stage, domain),
        )
        return [model_pb2.ModelRef(model_id=m, version=v) for m, v in rows]

    def wanted(self, domain: int = model_pb2.MODEL_DOMAIN_NETWORK_FLOW) -> _Wanted:
        """(production, shadow) versions of every model of ``domain``: what its agents should run."""
        generation = self._generation
        cached = self._desired_cache
        if cached is not None and cached[0] == generation:
            return cached[1]
        refs = (self._wanted(PRODUCTION, domain), self._wanted(SHADOW, domain))
        self._desired_cache = (generation, refs)
        return refs

    def desired(self, domain: int = model_pb2.MODEL_DOMAIN_NETWORK_FLOW) -> list[model_pb2.ModelRef]:
        """The production version of every model of ``domain``."""
        return self.wanted(domain)[0]

    def onnx(self, ref: model_pb2.ModelRef) -> tuple[model_pb2.ModelManifest, bytes]:
        """One version's signed manifest and ONNX bytes, for an agent to download."""
        row = (
            self._store.reader()
            .execute(
                "SELECT manifest_pb, onnx FROM models WHERE model_id = ? AND version = ?",
                (ref.model_id, ref.version),
            )
            .fetchone()
        )
        if row is None:
            raise LookupError(f"no model {ref.model_id}@{ref.version}")
        manifest = model_pb2.ModelManifest()
        manifest.ParseFromString(row[0])
        return manifest, bytes(row[1])

    def _with_rollout(
        self, model: admin_service_pb2.RegisteredModel, offline_after_ns: int
    ) -> admin_service_pb2.RegisteredModel:
        if model.stage != PRODUCTION or offline_after_ns <= 0:
            return model
        ref = model_pb2.ModelRef(model_id=model.manifest.model_id, version=model.manifest.version)
        online, running, refusals = self._store.model_rollout(ref, offline_after_ns)
        model.rollout.agents_online = online
        model.rollout.agents_running = running
        for agent_id, reason in refusals:
            model.rollout.refusals.add(agent_id=agent_id, reason=reason)
        return model

    def models(self, domain: int = 0, offline_after_ns: int = 0) -> list[admin_service_pb2.RegisteredModel]:
        sql = f"SELECT {_COLUMNS} FROM models"
        params: list[Any] = []
        if domain:
            sql += " WHERE domain = ?"
            params.append(domain)
        rows = self._store.reader().execute(sql + " ORDER BY model_id, registered_ns", params)
        return [self._with_rollout(_registered(row), offline_after_ns) for row in rows]

    def get(self, ref: model_pb2.ModelRef, offline_after_ns: int = 0) -> admin_service_pb2.RegisteredModel:
        """One version, or the production version when ``ref.version`` is empty."""
        if not ref.model_id:
            raise ValueError("model_id is required")
        where, param = ("version = ?", ref.version) if ref.version else ("stage = ?", PRODUCTION)
        row = (
            self._store.reader()
            .execute(f"SELECT {_COLUMNS} FROM models WHERE model_id = ? AND {where}", (ref.model_id, param))
            .fetchone()
        )
        if row is None:
            raise LookupError(
                f"no model {ref.model_id}" + (f"@{ref.version}" if ref.version else " in production")
            )
        return self._with_rollout(_registered(row), offline_after_ns)
