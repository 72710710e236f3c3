"""Writing feed models: ``NAME.onnx`` + ``NAME.manifest.json`` (domain TRANSACTION or TICK)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import timestamp_pb2

from auris.agent.manifest import MANIFEST_SUFFIX, MANIFEST_VERSION, dump_manifest, file_sha256
from auris.agent.signing import sign_manifest
from auris.collector.feed_features import FeedFeatureSet
from auris.training.export import library_versions
from auris.v1 import model_pb2

__all__ = ["write_feed_model"]


def write_feed_model(
    out_dir: Path,
    onnx_bytes: bytes,
    *,
    model_id: str,
    version: str,
    kind: model_pb2.ModelKind.ValueType,
    domain: model_pb2.ModelDomain.ValueType,
    feature_set: FeedFeatureSet,
    input_name: str,
    score_output: str,
    threshold: float,
    threshold_method: str,
    evaluation: model_pb2.Evaluation,
    training_data: list[tuple[str, str, int]],
    description: str,
    preprocessing: str,
    libraries: tuple[str, ...],
    labels: tuple[str, ...] = (),
    normal_label: str = "",
    explanation_output: str = "",
    reference: model_pb2.ReferenceDistribution | None = None,
    signing_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write ``model_id.onnx`` and its manifest into ``out_dir`` (signed when a key is given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{model_id}.onnx"
    onnx_path.write_bytes(onnx_bytes)
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(dt.datetime.now(dt.UTC).replace(microsecond=0))
    manifest = model_pb2.ModelManifest(
        manifest_version=MANIFEST_VERSION,
        model_id=model_id,
        version=version,
        kind=kind,
        domain=domain,
        feature_set=model_pb2.FeatureSet(
            name=feature_set.name, version=feature_set.version, columns=list(feature_set.columns)
        ),
        input_name=input_name,
        score_output=score_output,
        explanation_output=explanation_output,
        labels=list(labels),
        normal_label=normal_label,
        threshold=model_pb2.Threshold(value=threshold, method=threshold_method),
        preprocessing=preprocessing,
        evaluation=evaluation,
        library_versions=library_versions("numpy", "onnx", "onnxruntime", *libraries),
        onnx_file=onnx_path.name,
        onnx_sha256=file_sha256(onnx_path),
        created_time=created,
        description=description,
    )
    for path, sha, rows in training_data:
        manifest.training_data.add(path=path, sha256=sha, rows=rows)
    if reference is not None:
        manifest.reference.CopyFrom(reference)
    if signing_key is not None:
        sign_manifest(manifest, signing_key)
    manifest_path = out_dir / f"{model_id}{MANIFEST_SUFFIX}"
    manifest_path.write_text(dump_manifest(manifest), encoding="utf-8")
    return manifest_path
