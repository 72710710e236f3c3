"""An isolation forest exported as ONE tree ensemble: every tree in a single TreeEnsembleRegressor.

skl2onnx converts ``IsolationForest`` into ~27 operators per tree, which costs ~0.6 ms per call
whatever the batch. Here each leaf carries its whole contribution to the path length
(depth + c(samples in the leaf), as scikit-learn's ``score_samples`` adds them), one ensemble sums
them over the trees, and two element-wise operators turn the sum into the anomaly score
``2 ** (-mean path length / c(max_samples))``: scikit-learn's ``-score_samples``, higher is more
anomalous, in (0, 1).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.ensemble import IsolationForest

__all__ = ["INPUT_NAME", "SCORE_OUTPUT", "average_path_length", "isolation_forest_to_onnx"]

INPUT_NAME = "features"
SCORE_OUTPUT = "score"
# onnxruntime 1.31 reads IR version 10 at most; helper.make_model may write a newer one.
_IR_VERSION = 10
_OPSET = 17
_ML_OPSET = 3


def average_path_length(n: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """c(n): the mean path length of an unsuccessful search in a binary search tree of n points."""
    n_arr = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n_arr)
    out[n_arr == 2] = 1.0
    big = n_arr > 2
    out[big] = 2.0 * (np.log(n_arr[big] - 1.0) + np.euler_gamma) - 2.0 * (n_arr[big] - 1.0) / n_arr[big]
    return out


def _float32_at_most(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """The largest float32 <= each value: for float32 x, x <= t exactly when x <= this."""
    rounded = values.astype(np.float32)
    too_big = rounded.astype(np.float64) > values
    rounded[too_big] = np.nextafter(rounded[too_big], np.float32(-np.inf))
    return rounded


def _node_depths(children_left: npt.NDArray[np.intp], children_right: npt.NDArray[np.intp]) -> list[int]:
    depth = [0] * len(children_left)
    for node in range(len(children_left)):  # parents come before their children in sklearn trees
        for child in (children_left[node], children_right[node]):
            if child != -1:
                depth[child] = depth[node] + 1
    return depth


def isolation_forest_to_onnx(forest: IsolationForest, n_features: int) -> bytes:
    """A fitted IsolationForest (all features per tree) as ONNX: input ``features``, output ``score``."""
    for features in forest.estimators_features_:
        if len(features) != n_features or not np.array_equal(features, np.arange(n_features)):
            raise ValueError("only isolation forests with max_features=1.0 export (trees see every feature)")
    ints: dict[str, list[int]] = {
        k: []
        for k in (
            "nodes_treeids",
            "nodes_nodeids",
            "nodes_featureids",
            "nodes_truenodeids",
            "nodes_falsenodeids",
            "target_treeids",
            "target_nodeids",
            "target_ids",
        )
    }
    values: list[float] = []
    weights: list[float] = []
    modes: list[str] = []
    for t, estimator in enumerate(forest.estimators_):
        tree = estimator.tree_
        left, right = tree.children_left, tree.children_right
        thresholds = _float32_at_most(tree.threshold)
        leaf_values = np.asarray(_node_depths(left, right), dtype=np.float64) + average_path_length(
            tree.n_node_samples
        )
        for node in range(tree.node_count):
            is_leaf = bool(left[node] == -1)
            ints["nodes_treeids"].append(t)
            ints["nodes_nodeids"].append(node)
            ints["nodes_featureids"].append(0 if is_leaf else int(tree.feature[node]))
            ints["nodes_truenodeids"].append(0 if is_leaf else int(left[node]))
            ints["nodes_falsenodeids"].append(0 if is_leaf else int(right[node]))
            values.append(0.0 if is_leaf else float(thresholds[node]))
            modes.append("LEAF" if is_leaf else "BRANCH_LEQ")
            if is_leaf:
                ints["target_treeids"].append(t)
                ints["target_nodeids"].append(node)
                ints["target_ids"].append(0)
                weights.append(float(leaf_values[node]))
    scale = -1.0 / (len(forest.estimators_) * float(average_path_length([forest.max_samples_])[0]))
    nodes = [
        helper.make_node(
            "TreeEnsembleRegressor",
            [INPUT_NAME],
            ["path_sum"],
            domain="ai.onnx.ml",
            n_targets=1,
            aggregate_function="SUM",
            post_transform="NONE",
            nodes_values=values,
            nodes_modes=modes,
            target_weights=weights,
            nodes_treeids=ints["nodes_treeids"],
            nodes_nodeids=ints["nodes_nodeids"],
            nodes_featureids=ints["nodes_featureids"],
            nodes_truenodeids=ints["nodes_truenodeids"],
            nodes_falsenodeids=ints["nodes_falsenodeids"],
            target_treeids=ints["target_treeids"],
            target_nodeids=ints["target_nodeids"],
            target_ids=ints["target_ids"],
        ),
        helper.make_node("Mul", ["path_sum", "scale"], ["exponent"]),
        helper.make_node("Pow", ["two", "exponent"], ["score_2d"]),
        helper.make_node("Reshape", ["score_2d", "flat"], [SCORE_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes,
        "auris_isolation_forest",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, [None])],
        initializer=[
            numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
            numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid("ai.onnx.ml", _ML_OPSET)],
    )
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data
