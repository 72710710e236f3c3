"""An MLP autoencoder trained on benign flows only, exported as a hand-built ONNX graph.

The graph does all the preprocessing itself, so the agent feeds raw feature
vectors: a sign-preserving ``log1p`` (flow features span many orders of
magnitude), standardisation with the benign training statistics, the MLP, and
the squared reconstruction error per feature (output ``feature_errors``, used to
explain a score) and its mean (output ``score``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPRegressor

__all__ = ["ERRORS_OUTPUT", "SCORE_OUTPUT", "Autoencoder", "fit_autoencoder"]

SCORE_OUTPUT = "score"
ERRORS_OUTPUT = "feature_errors"
INPUT_NAME = "features"
# onnxruntime 1.31 accepts IR version 10 at most for opset 17 graphs built by hand.
_IR_VERSION = 10
_OPSET = 17

Matrix = npt.NDArray[np.float32]


def _log_scale(x: Matrix) -> Matrix:
    return np.sign(x) * np.log1p(np.abs(x))


@dataclasses.dataclass
class Autoencoder:
    """A fitted autoencoder: the MLP plus the scaling it was trained with."""

    mlp: MLPRegressor
    mean: Matrix
    std: Matrix

    def reference(self, x: Matrix) -> tuple[Matrix, Matrix]:
        """(scores, per-feature errors) computed in numpy, the yardstick for the ONNX graph."""
        z = ((_log_scale(x) - self.mean) / self.std).astype(np.float32)
        errors = (self.mlp.predict(z).astype(np.float32) - z) ** 2
        return errors.mean(axis=1), errors

    def to_onnx(self) -> bytes:
        n = self.mean.shape[0]
        nodes = [
            helper.make_node("Abs", [INPUT_NAME], ["abs"]),
            helper.make_node("Add", ["abs", "one"], ["abs1"]),
            helper.make_node("Log", ["abs1"], ["log"]),
            helper.make_node("Sign", [INPUT_NAME], ["sign"]),
            helper.make_node("Mul", ["log", "sign"], ["scaled"]),
            helper.make_node("Sub", ["scaled", "mean"], ["centred"]),
            helper.make_node("Div", ["centred", "std"], ["z"]),
        ]
        inits = [
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
            numpy_helper.from_array(self.mean.astype(np.float32), "mean"),
            numpy_helper.from_array(self.std.astype(np.float32), "std"),
        ]
        current = "z"
        layers = len(self.mlp.coefs_)
        for i, (w, b) in enumerate(zip(self.mlp.coefs_, self.mlp.intercepts_, strict=True)):
            inits += [
                numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                numpy_helper.from_array(b.astype(np.float32), f"b{i}"),
            ]
            nodes += [
                helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"]),
                helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"lin{i}"]),
            ]
            current = f"lin{i}"
            if i < layers - 1:  # MLPRegressor: hidden activation, identity output
                if self.mlp.activation != "relu":
                    raise ValueError(f"only relu autoencoders export, not {self.mlp.activation}")
                nodes.append(helper.make_node("Relu", [current], [f"act{i}"]))
                current = f"act{i}"
        nodes += [
            helper.make_node("Sub", [current, "z"], ["residual"]),
            helper.make_node("Mul", ["residual", "residual"], [ERRORS_OUTPUT]),
            helper.make_node("ReduceMean", [ERRORS_OUTPUT], [SCORE_OUTPUT], axes=[1], keepdims=0),
        ]
        return detector_model(nodes, "auris_autoencoder", n, inits)


def detector_model(
    nodes: list[onnx.NodeProto],
    name: str,
    width: int,
    initializers: list[onnx.TensorProto],
    *,
    full_check: bool = False,
) -> bytes:
    """A serialised detector graph as the agent reads one: ``INPUT_NAME`` [rows, width] in,
    ``SCORE_OUTPUT`` [rows] and ``ERRORS_OUTPUT`` [rows, width] (per-column contributions) out."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, width])],
        [
            helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, [None]),
            helper.make_tensor_value_info(ERRORS_OUTPUT, TensorProto.FLOAT, [None, width]),
        ],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION  # make_model may write a newer IR than onnxruntime reads
    onnx.checker.check_model(model, full_check=full_check)
    data: bytes = model.SerializeToString()
    return data


def fit_autoencoder(x_benign: Matrix, hidden: tuple[int, ...] = (32, 8, 32), seed: int = 0) -> Autoencoder:
    """Fit on benign rows only; features with no spread get unit scale."""
    scaled = _log_scale(x_benign)
    mean = scaled.mean(axis=0).astype(np.float32)
    std = scaled.std(axis=0).astype(np.float32)
    std[std < 1e-6] = 1.0
    z = ((scaled - mean) / std).astype(np.float32)
    mlp = MLPRegressor(
        hidden_layer_sizes=hidden,
        activation="relu",
        alpha=1e-4,
        max_iter=300,
        early_stopping=True,
        random_state=seed,
    )
    mlp.fit(z, z)
    return Autoencoder(mlp, mean, std)
