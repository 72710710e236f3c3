"""Model manifests: reading, writing and validating the ``auris.v1.ModelManifest`` contract.

A model on disk is ``NAME.manifest.json`` (the manifest in protobuf's JSON mapping)
beside the ONNX file it names. Readers refuse unknown fields, a newer manifest
layout, and an ONNX file whose sha256 differs from the manifest's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from google.protobuf import json_format

from auris.v1 import model_pb2

__all__ = [
    "MANIFEST_SUFFIX",
    "MANIFEST_VERSION",
    "ManifestError",
    "check_manifest",
    "dump_manifest",
    "file_sha256",
    "find_manifests",
    "read_manifest",
]

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"


class ManifestError(ValueError):
    """A manifest or the model file it describes is unusable; the message is one line."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dump_manifest(manifest: model_pb2.ModelManifest) -> str:
    """Serialise a manifest to stable, human-readable JSON."""
    text = json_format.MessageToJson(
        manifest,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=2,
        sort_keys=True,
    )
    return text + "\n"


def read_manifest(path: Path, *, verify_file: bool = True) -> model_pb2.ModelManifest:
    """Parse and check one manifest; with ``verify_file`` also hash its ONNX file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a valid manifest: not UTF-8 text") from None
    manifest = model_pb2.ModelManifest()
    try:
        json_format.Parse(text, manifest, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "invalid JSON"
        raise ManifestError(f"{path}: not a valid manifest: {first_line}") from None
    check_manifest(manifest, str(path))
    if verify_file:
        onnx_path = onnx_path_of(path, manifest)
        if not onnx_path.is_file():
            raise ManifestError(f"{path}: model file {manifest.onnx_file} is missing")
        actual = file_sha256(onnx_path)
        if actual != manifest.onnx_sha256:
            raise ManifestError(
                f"{path}: sha256 of {manifest.onnx_file} is {actual[:12]}…, manifest says "
                f"{manifest.onnx_sha256[:12]}…; refusing a modified model"
            )
    return manifest


def check_manifest(manifest: model_pb2.ModelManifest, where: str) -> None:
    """Raise ManifestError (one line, starting with ``where``) unless the manifest is usable."""
    if manifest.manifest_version > MANIFEST_VERSION:
        raise ManifestError(
            f"{where}: manifest_version {manifest.manifest_version} is newer than this reader "
            f"({MANIFEST_VERSION}); upgrade Auris"
        )
    for field in ("model_id", "version", "onnx_file", "onnx_sha256", "input_name", "score_output"):
        if not getattr(manifest, field):
            raise ManifestError(f"{where}: {field} is empty")
    if Path(manifest.onnx_file).name != manifest.onnx_file:
        raise ManifestError(f"{where}: onnx_file must be a bare file name, got {manifest.onnx_file!r}")
    if manifest.kind == model_pb2.MODEL_KIND_UNSPECIFIED:
        raise ManifestError(f"{where}: kind is not set")
    if not manifest.feature_set.name or not manifest.feature_set.columns:
        raise ManifestError(f"{where}: feature_set needs a name and columns")
    if manifest.kind == model_pb2.MODEL_KIND_CLASSIFIER:
        if len(manifest.labels) < 2:
            raise ManifestError(f"{where}: a classifier needs at least two labels")
        if manifest.normal_label not in manifest.labels:
            raise ManifestError(f"{where}: normal_label {manifest.normal_label!r} is not among labels")
    if not manifest.HasField("threshold"):
        raise ManifestError(f"{where}: threshold is not set")


def onnx_path_of(manifest_path: Path, manifest: model_pb2.ModelManifest) -> Path:
    """The ONNX file a manifest names, which must sit beside it."""
    name = Path(manifest.onnx_file)
    if name.name != manifest.onnx_file:
        raise ManifestError(
            f"{manifest_path}: onnx_file must be a bare file name, got {manifest.onnx_file!r}"
        )
    return manifest_path.parent / name


def find_manifests(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{MANIFEST_SUFFIX}"))
