"""Writing feed models: ``NAME.onnx`` + ``NAME.manifest.json`` (domain TRANSACTION or TICK)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auris.agent.manifest import MANIFEST_VERSION
from auris.collector.feed_features import FeedFeatureSet
from auris.training.export import library_versions, store_model
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
        description=description,
    )
    for path, sha, rows in training_data:
        manifest.training_data.add(path=path, sha256=sha, rows=rows)
    return store_model(out_dir, model_id, onnx_bytes, manifest, reference=reference, signing_key=signing_key)
