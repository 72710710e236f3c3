"""The model registry: every model version the collector knows, with its manifest, bytes and stage.

Versions are immutable: a version comes in once, and the same (model id, version) with
other bytes is refused. The first version of a model id becomes its production version;
later ones arrive as candidates (promotion, signing and redistribution come with the
training issue; docs/ROADMAP.md).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auris.agent.manifest import ManifestError, find_manifests, onnx_path_of, read_manifest
from auris.collector.store import VerdictStore
from auris.v1 import admin_service_pb2, model_pb2

__all__ = ["ImportResult", "ModelRegistry"]

logger = logging.getLogger(__name__)

_COLUMNS = "manifest_pb, stage, registered_ns, promoted_ns"
PRODUCTION = admin_service_pb2.MODEL_STAGE_PRODUCTION


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


class ModelRegistry:
    """Registry operations over the collector's database."""

    def __init__(self, store: VerdictStore) -> None:
        self._store = store

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
                added = self.register(manifest, onnx_path_of(path, manifest).read_bytes())
            except (ManifestError, OSError) as exc:
                result.refused.append(f"{path}: {str(exc).splitlines()[0]}")
                continue
            (result.registered if added else result.unchanged).append(
                f"{manifest.model_id}@{manifest.version}"
            )
        return result

    def register(self, manifest: model_pb2.ModelManifest, onnx: bytes) -> bool:
        """Store one model version; False when it is already there with the same bytes."""
        now = time.time_ns()
        with self._store.writing() as conn:
            row = conn.execute(
                "SELECT sha256 FROM models WHERE model_id = ? AND version = ?",
                (manifest.model_id, manifest.version),
            ).fetchone()
            if row is not None:
                if row[0] != manifest.onnx_sha256:
                    raise ManifestError(
                        f"{manifest.model_id}@{manifest.version} is already registered with other bytes "
                        "(sha256 differs); give the new model a new version"
                    )
                return False
            (production,) = conn.execute(
                "SELECT COUNT(*) FROM models WHERE model_id = ? AND stage = ?",
                (manifest.model_id, admin_service_pb2.MODEL_STAGE_PRODUCTION),
            ).fetchone()
            stage = (
                admin_service_pb2.MODEL_STAGE_CANDIDATE
                if production
                else admin_service_pb2.MODEL_STAGE_PRODUCTION
            )
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
                    now if stage == admin_service_pb2.MODEL_STAGE_PRODUCTION else None,
                ),
            )
        return True

    def models(self, domain: int = 0) -> list[admin_service_pb2.RegisteredModel]:
        sql = f"SELECT {_COLUMNS} FROM models"
        params: list[Any] = []
        if domain:
            sql += " WHERE domain = ?"
            params.append(domain)
        rows = self._store.reader().execute(sql + " ORDER BY model_id, registered_ns", params)
        return [_registered(row) for row in rows]

    def get(self, ref: model_pb2.ModelRef) -> admin_service_pb2.RegisteredModel:
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
        return _registered(row)
