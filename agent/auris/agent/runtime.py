"""onnxruntime sessions for models on disk: one way to open them for the agent and the collector.

Light on purpose (onnxruntime and the manifest only), so that the collector's feed scoring can
use it without the network meter's dependencies.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from auris.agent.manifest import ManifestError, onnx_path_of
from auris.v1 import model_pb2

__all__ = ["open_session"]


def open_session(
    manifest_path: Path, manifest: model_pb2.ModelManifest, threads: int
) -> ort.InferenceSession:
    """The model's onnxruntime session (CPU, ``threads`` intra-op threads), its input checked;
    ManifestError (one line) when onnxruntime cannot load it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            str(onnx_path_of(manifest_path, manifest)), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
        raise ManifestError(f"{manifest_path}: onnxruntime cannot load {manifest.onnx_file}: {exc}") from None
    if manifest.input_name not in {i.name for i in session.get_inputs()}:
        raise ManifestError(f"{manifest_path}: graph has no input {manifest.input_name!r}")
    return session
