"""Per-feature contributions of a tree-ensemble classifier to one flow's score (on the collector).

Path contributions (Saabas): walking a row down each tree, every split moves the tree's
expected output from the node's value to the child's; that move is credited to the split's
feature. The root values sum to a bias, and bias + contributions = the model's attack score
(1 - P(normal)), exactly, whatever the node values are. The node values are expected leaf
outputs over a background sample (the ONNX graph keeps no training covers): flows stored
with their feature vectors, or the rows given. Trees are read from the exported
``TreeEnsembleClassifier`` itself, so what is explained is what the agents run. Computed for
flagged flows only, never on the agent's hot path.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

from auris.agent.features import feature_set
from auris.collector.registry import ModelRegistry, StageError
from auris.collector.store import VerdictStore
from auris.v1 import admin_service_pb2, model_pb2

__all__ = ["Explainers", "Explanation", "TreeExplainer"]

# Background flows behind the node values, and the fewest that make a meaningful estimate.
BACKGROUND = 2000
MIN_BACKGROUND = 50


@dataclasses.dataclass
class Explanation:
    bias: float
    score: float
    # (feature, contribution), largest magnitude first.
    contributions: list[tuple[str, float]]


@dataclasses.dataclass
class _Tree:
    feature: npt.NDArray[np.intp]  # -1 at leaves
    threshold: npt.NDArray[np.float64]
    left: npt.NDArray[np.intp]  # the "true" (x <= threshold) child
    right: npt.NDArray[np.intp]
    # Per node and class id, the weight the ensemble adds for this tree (leaves only).
    leaf_weights: npt.NDArray[np.float64]
    # This tree's share of the attack score at each leaf, and its expected value at every node.
    leaf_value: npt.NDArray[np.float64] = dataclasses.field(default_factory=lambda: np.zeros(0))
    value: npt.NDArray[np.float64] = dataclasses.field(default_factory=lambda: np.zeros(0))

    def path(self, row: npt.NDArray[np.float32]) -> list[int]:
        node, nodes = 0, [0]
        while self.feature[node] >= 0:
            node = int(
                self.left[node] if row[self.feature[node]] <= self.threshold[node] else self.right[node]
            )
            nodes.append(node)
        return nodes


def _attribute(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    found = next((a for a in node.attribute if a.name == name), None)
    if found is None:
        raise ValueError(f"tree ensemble has no attribute {name}")
    return found


class TreeExplainer:
    """Contributions for one exported random-forest classifier and its manifest."""

    def __init__(
        self, manifest: model_pb2.ModelManifest, onnx_bytes: bytes, background: npt.ArrayLike
    ) -> None:
        if manifest.kind != model_pb2.MODEL_KIND_CLASSIFIER:
            raise ValueError(f"{manifest.model_id} is not a classifier")
        graph = onnx.load_model_from_string(onnx_bytes).graph
        nodes = [n for n in graph.node if n.op_type == "TreeEnsembleClassifier"]
        if len(nodes) != 1:
            raise ValueError(f"{manifest.model_id}: not a single tree-ensemble classifier graph")
        ensemble = nodes[0]
        if _attribute(ensemble, "post_transform").s != b"NONE":
            raise ValueError(
                f"{manifest.model_id}: only averaged forests (post_transform NONE) are explained"
            )
        modes = set(_attribute(ensemble, "nodes_modes").strings)
        if not modes <= {b"BRANCH_LEQ", b"LEAF"}:
            raise ValueError(f"{manifest.model_id}: split modes {sorted(modes)} are not supported")
        self.manifest = manifest
        self._columns = list(manifest.feature_set.columns)
        self._session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        self._trees = self._read(ensemble)
        x = np.asarray(background, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self._columns) or not len(x):
            raise ValueError(f"background must be rows of {len(self._columns)} features")
        self._check_mapping(x[:64])
        for tree in self._trees:
            tree.value = self._node_values(tree, x)

    def _read(self, ensemble: onnx.NodeProto) -> list[_Tree]:
        tree_ids = np.asarray(_attribute(ensemble, "nodes_treeids").ints)
        node_ids = np.asarray(_attribute(ensemble, "nodes_nodeids").ints)
        features = np.asarray(_attribute(ensemble, "nodes_featureids").ints)
        values = np.asarray(_attribute(ensemble, "nodes_values").floats, dtype=np.float64)
        true_ids = np.asarray(_attribute(ensemble, "nodes_truenodeids").ints)
        false_ids = np.asarray(_attribute(ensemble, "nodes_falsenodeids").ints)
        leaf = np.asarray([m == b"LEAF" for m in _attribute(ensemble, "nodes_modes").strings])
        class_tree = np.asarray(_attribute(ensemble, "class_treeids").ints)
        class_node = np.asarray(_attribute(ensemble, "class_nodeids").ints)
        class_ids = np.asarray(_attribute(ensemble, "class_ids").ints)
        weights = np.asarray(_attribute(ensemble, "class_weights").floats, dtype=np.float64)
        self._class_ids = sorted(set(class_ids.tolist()))
        trees = []
        for t in sorted(set(tree_ids.tolist())):
            mask = tree_ids == t
            n = int(node_ids[mask].max()) + 1
            feature = np.full(n, -1, dtype=np.intp)
            threshold = np.zeros(n)
            left = np.zeros(n, dtype=np.intp)
            right = np.zeros(n, dtype=np.intp)
            for i in np.flatnonzero(mask):
                k = node_ids[i]
                if not leaf[i]:
                    feature[k], threshold[k] = features[i], values[i]
                    left[k], right[k] = true_ids[i], false_ids[i]
            # Per leaf and class id, the weight the ensemble adds for this tree.
            leaf_weights = np.zeros((n, max(self._class_ids) + 1))
            cmask = class_tree == t
            np.add.at(leaf_weights, (class_node[cmask], class_ids[cmask]), weights[cmask])
            trees.append(_Tree(feature, threshold, left, right, leaf_weights))
        return trees

    def _check_mapping(self, rows: npt.NDArray[np.float32]) -> None:
        """Find how leaf weights make the attack score, by comparing with onnxruntime itself."""
        m = self.manifest
        (probs,) = self._session.run([m.score_output], {m.input_name: rows})
        probs = np.asarray(probs).reshape(len(rows), -1)
        attack = 1.0 - probs[:, list(m.labels).index(m.normal_label)]
        n_trees = len(self._trees)
        candidates: dict[str, list[npt.NDArray[np.float64]]] = {}
        for cid in self._class_ids:
            sums = [np.asarray([t.leaf_weights[t.path(r)[-1], cid] for t in self._trees]) for r in rows]
            candidates[f"1 - class {cid}"] = [1.0 / n_trees - s for s in sums]
            candidates[f"class {cid}"] = list(sums)
        for name, per_row in candidates.items():
            if np.allclose([s.sum() for s in per_row], attack, atol=1e-5):
                cid = int(name.rsplit(" ", 1)[1])
                for t in self._trees:
                    w = t.leaf_weights[:, cid]
                    t.leaf_value = (1.0 / n_trees - w) if name.startswith("1 -") else w
                return
        raise ValueError(f"{m.model_id}: cannot relate the trees' leaves to its attack score")

    def _node_values(self, tree: _Tree, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        n = len(tree.feature)
        total = np.zeros(n)
        count = np.zeros(n)
        for row in x:
            nodes = tree.path(row)
            leaf_value = tree.leaf_value[nodes[-1]]
            total[nodes] += leaf_value
            count[nodes] += 1
        value = np.divide(total, count, out=np.zeros(n), where=count > 0)
        # Nodes no background row reached: their leaves' mean (bottom-up), so paths stay consistent.
        for k in range(n - 1, -1, -1):
            if count[k] == 0:
                value[k] = (
                    tree.leaf_value[k]
                    if tree.feature[k] < 0
                    else (value[tree.left[k]] + value[tree.right[k]]) / 2
                )
        return value

    def explain(self, row: Sequence[float], top: int = 5) -> Explanation:
        """The attack score of one row (in the model's column order), its bias and top contributions."""
        x = np.nan_to_num(np.asarray(row, dtype=np.float32), nan=0.0, posinf=1e12, neginf=-1e12)
        contributions = np.zeros(len(self._columns))
        bias = score = 0.0
        for tree in self._trees:
            nodes = tree.path(x)
            bias += tree.value[0]
            score += tree.leaf_value[nodes[-1]]
            for parent, child in itertools.pairwise(nodes):
                contributions[tree.feature[parent]] += tree.value[child] - tree.value[parent]
        order = np.argsort(-np.abs(contributions))[:top]
        return Explanation(bias, score, [(self._columns[j], float(contributions[j])) for j in order])


class Explainers:
    """ExplainVerdict on the collector: explainers built on demand, one per model version (kept until
    the background they were built on is 10 minutes old)."""

    def __init__(self, store: VerdictStore, registry: ModelRegistry, max_age_s: float = 600.0) -> None:
        self._store = store
        self._registry = registry
        self._max_age_s = max_age_s
        self._cache: dict[tuple[str, str], tuple[float, TreeExplainer, int]] = {}
        self._lock = threading.Lock()

    def _explainer(self, ref: model_pb2.ModelRef) -> tuple[TreeExplainer, int]:
        key = (ref.model_id, ref.version)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and time.monotonic() - cached[0] < self._max_age_s:
                return cached[1], cached[2]
        manifest, onnx_bytes = self._registry.onnx(ref)
        fs = manifest.feature_set
        columns = feature_set(fs.name, fs.version).columns
        rows = self._store.recent_features(fs.name, fs.version, BACKGROUND)
        if len(rows) < MIN_BACKGROUND:
            raise StageError(
                f"explaining needs at least {MIN_BACKGROUND} stored {fs.name} feature vectors, there are "
                f"{len(rows)} (agents send them with send_features)"
            )
        index = [list(columns).index(c) for c in fs.columns]
        explainer = TreeExplainer(manifest, onnx_bytes, np.asarray(rows, dtype=np.float32)[:, index])
        with self._lock:
            self._cache[key] = (time.monotonic(), explainer, len(rows))
        return explainer, len(rows)

    def explain(
        self, verdict_id: int, model_id: str = "", top: int = 10
    ) -> admin_service_pb2.ExplainVerdictResponse:
        stored = self._store.fetch([verdict_id])
        if not stored:
            raise LookupError(f"no verdict {verdict_id}")
        v = stored[0].verdict
        scores = [s for s in v.scores if not s.shadow]
        if model_id:
            score = next((s for s in scores if s.model.model_id == model_id), None)
        else:
            # The deciding model, or when a detector (an autoencoder) decided, the verdict's classifier.
            classifiers = [s for s in scores if s.kind == model_pb2.MODEL_KIND_CLASSIFIER]
            score = next((s for s in classifiers if s.model.model_id == v.model.model_id), None)
            score = score or next(iter(classifiers), None)
            model_id = v.model.model_id
        if score is None:
            raise LookupError(f"verdict {verdict_id} has no classifier score of {model_id}")
        explainer, background = self._explainer(score.model)
        fs = explainer.manifest.feature_set
        vector = next((f for f in v.features if (f.feature_set, f.version) == (fs.name, fs.version)), None)
        if vector is None:
            raise StageError(
                f"verdict {verdict_id} carries no {fs.name} feature vector (agents' send_features)"
            )
        columns = feature_set(fs.name, fs.version).columns
        row = [vector.values[list(columns).index(c)] for c in fs.columns]
        explanation = explainer.explain(row, top=top or 10)
        response = admin_service_pb2.ExplainVerdictResponse(
            model=score.model,
            score=explanation.score,
            bias=explanation.bias,
            method=(
                f"path contributions through the exported trees; node values are mean outputs over the "
                f"{background} newest stored {fs.name} vectors"
            ),
        )
        for name, value in explanation.contributions:
            response.contributions.add(feature=name, value=value)
        return response
