"""ONNX export of trained estimators, with a parity check and the model manifest."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

from auris.agent.features import FeatureSet
from auris.agent.manifest import MANIFEST_SUFFIX, MANIFEST_VERSION, dump_manifest, file_sha256
from auris.agent.signing import sign_manifest
from auris.v1 import model_pb2

__all__ = [
    "INPUT_NAME",
    "PROBABILITIES",
    "export_classifier",
    "library_versions",
    "parity",
    "store_model",
    "write_model",
]

INPUT_NAME = "features"
PROBABILITIES = "probabilities"
# Trees compare float32 inputs on both sides; anything above this is an export bug.
PARITY_TOLERANCE = 1e-5


def library_versions(*names: str) -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in names}


def export_classifier(estimator: Any, n_features: int) -> bytes:
    """A fitted scikit-learn classifier as ONNX bytes with outputs ``label`` and ``probabilities``."""
    onnx_model = convert_sklearn(
        estimator,
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options={id(estimator): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    outputs = [o.name for o in onnx_model.graph.output]
    if PROBABILITIES not in outputs:
        raise RuntimeError(f"skl2onnx produced outputs {outputs}, expected {PROBABILITIES!r}")
    data: bytes = onnx_model.SerializeToString()
    return data


def parity(onnx_bytes: bytes, estimator: Any, rows: npt.NDArray[np.float32]) -> float:
    """Largest absolute difference between scikit-learn and onnxruntime class probabilities."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (ours,) = session.run([PROBABILITIES], {INPUT_NAME: rows})
    theirs = estimator.predict_proba(rows)
    return float(np.max(np.abs(np.asarray(ours) - theirs))) if len(rows) else 0.0


def write_model(
    out_dir: Path,
    stem: str,
    onnx_bytes: bytes,
    *,
    model_id: str,
    version: str,
    kind: model_pb2.ModelKind.ValueType,
    feature_set: FeatureSet,
    labels: list[str],
    normal_label: str,
    score_output: str = PROBABILITIES,
    explanation_output: str = "",
    threshold: float,
    threshold_method: str,
    evaluation: model_pb2.Evaluation,
    provenance: dict[str, tuple[str, int]],
    description: str,
    data_root: Path | None = None,
    signing_key: Ed25519PrivateKey | None = None,
    reference: model_pb2.ReferenceDistribution | None = None,
) -> Path:
    """Write ``stem.onnx`` and ``stem.manifest.json`` into out_dir (signed when a key is given); return
    the manifest path."""
    manifest = model_pb2.ModelManifest(
        manifest_version=MANIFEST_VERSION,
        model_id=model_id,
        version=version,
        kind=kind,
        domain=model_pb2.MODEL_DOMAIN_NETWORK_FLOW,
        feature_set=model_pb2.FeatureSet(
            name=feature_set.name, version=feature_set.version, columns=list(feature_set.columns)
        ),
        input_name=INPUT_NAME,
        score_output=score_output,
        explanation_output=explanation_output,
        labels=labels,
        normal_label=normal_label,
        threshold=model_pb2.Threshold(value=threshold, method=threshold_method),
        evaluation=evaluation,
        library_versions=library_versions(
            "scikit-learn", "skl2onnx", "onnx", "onnxruntime", "nfstream", "numpy"
        ),
        description=description,
    )
    for path, (sha, rows) in sorted(provenance.items()):
        shown = str(Path(path).relative_to(data_root)) if data_root else path
        manifest.training_data.add(path=shown, sha256=sha, rows=rows)
    return store_model(out_dir, stem, onnx_bytes, manifest, reference=reference, signing_key=signing_key)


def store_model(
    out_dir: Path,
    stem: str,
    onnx_bytes: bytes,
    manifest: model_pb2.ModelManifest,
    *,
    reference: model_pb2.ReferenceDistribution | None = None,
    signing_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write ``stem.onnx`` and ``stem.manifest.json`` (the manifest completed with the file's name,
    sha256, creation time and reference; signed when a key is given); return the manifest path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{stem}.onnx"
    onnx_path.write_bytes(onnx_bytes)
    manifest.onnx_file = onnx_path.name
    manifest.onnx_sha256 = file_sha256(onnx_path)
    manifest.created_time.FromDatetime(dt.datetime.now(dt.UTC).replace(microsecond=0))
    if reference is not None:
        manifest.reference.CopyFrom(reference)
    if signing_key is not None:
        sign_manifest(manifest, signing_key)
    manifest_path = out_dir / f"{stem}{MANIFEST_SUFFIX}"
    manifest_path.write_text(dump_manifest(manifest), encoding="utf-8")
    return manifest_path
