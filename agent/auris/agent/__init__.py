"""The Auris agent: meters flows, scores them with ONNX models, streams verdicts."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
