"""Local scoring: every flow through every loaded ONNX model, in micro-batches."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from auris.agent.drift import DriftWindow
from auris.agent.features import FeatureSet, feature_set
from auris.agent.manifest import ManifestError, find_manifests, read_manifest
from auris.agent.runtime import open_session
from auris.agent.signing import ModelTrust
from auris.v1 import model_pb2

__all__ = ["LoadedModel", "ModelSet", "Score", "load_model", "load_models", "to_matrix"]

logger = logging.getLogger(__name__)

# Flow features can be infinite (rates over zero durations) or NaN; forests exported to
# ONNX do not route NaN as the trainer did, so both sides clean rows the same way here.
_FEATURE_CAP = 1e12


def to_matrix(rows: Sequence[Sequence[float]], width: int) -> npt.NDArray[np.float32]:
    """Stack feature rows into a float32 matrix with NaN -> 0 and ±inf clipped.

    Rows of ``array("d")`` (what the meter makes) are joined as bytes: converting a float
    object per value cost 2.5x this whole function.
    """
    if not rows:
        return np.zeros((0, width), dtype=np.float32)
    if all(type(row) is array and row.typecode == "d" and len(row) == width for row in rows):
        matrix = np.frombuffer(b"".join(rows), dtype=np.float64).reshape(len(rows), width)  # type: ignore[arg-type]
    else:
        matrix = np.asarray(rows, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != width:
            raise ValueError(f"expected rows of {width} features, got shape {matrix.shape}")
    # Clipped into a new array (the joined one is read-only): also ±inf. np.clip's wrapper
    # costs as much again as these two calls.
    matrix = np.minimum(matrix, _FEATURE_CAP)
    np.maximum(matrix, -_FEATURE_CAP, out=matrix)
    nan = np.isnan(matrix)
    if nan.any():  # rare; np.nan_to_num costs 2.5x this whole function on every batch
        matrix[nan] = 0.0
    return matrix.astype(np.float32)


# Shared by every detector Score (read-only: a Score is a value, never filled in later).
_NO_PROBABILITIES: Mapping[str, float] = MappingProxyType({})


class Score(NamedTuple):
    """What one model said about one row (a tuple: built for every flow and model)."""

    model_id: str
    model_version: str
    kind: model_pb2.ModelKind.ValueType
    score: float
    threshold: float
    anomalous: bool
    label: str
    # Classifiers: class -> probability.
    probabilities: Mapping[str, float] = _NO_PROBABILITIES
    # Explaining detectors: (feature, contribution), largest first.
    top_features: tuple[tuple[str, float], ...] = ()
    # A shadow model's score: reported, never deciding the verdict.
    shadow: bool = False


# How many features an explanation names.
TOP_FEATURES = 3


@dataclasses.dataclass
class LoadedModel:
    manifest: model_pb2.ModelManifest
    feature_set: FeatureSet
    session: ort.InferenceSession
    # Index of each manifest column in the feature set's vector.
    column_index: npt.NDArray[np.intp]
    normal_index: int
    # Runs beside production for comparison (the collector's shadow stage).
    shadow: bool = False
    # Recent inputs and scores against the manifest's reference (None: the manifest has none).
    drift: DriftWindow | None = None

    @property
    def ref(self) -> str:
        return f"{self.manifest.model_id}@{self.manifest.version}"

    def score_matrix(self, matrix: npt.NDArray[np.float32]) -> list[Score]:
        """Score rows already in this model's feature set order."""
        m = self.manifest
        inputs = matrix[:, self.column_index]
        names = [m.score_output] + ([m.explanation_output] if m.explanation_output else [])
        outputs = self.session.run(names, {m.input_name: inputs})
        out = np.asarray(outputs[0])
        threshold = m.threshold.value
        n = len(inputs)
        probabilities: list[Mapping[str, float]] | itertools.repeat[Mapping[str, float]]
        probabilities = itertools.repeat(_NO_PROBABILITIES)
        top_features: list[tuple[tuple[str, float], ...]] | itertools.repeat[tuple[()]] = itertools.repeat(())
        if m.kind == model_pb2.MODEL_KIND_CLASSIFIER:
            probs = out.reshape(n, -1)
            scores = 1.0 - probs[:, self.normal_index]
            # Above threshold the label is the likeliest class other than the normal one, even
            # when the normal class alone is the single most likely.
            others = probs.copy()
            others[:, self.normal_index] = -1.0
            best = np.where(scores >= threshold, others.argmax(axis=1), probs.argmax(axis=1))
            class_labels = self._labels
            labels: list[str] | itertools.repeat[str] = [class_labels[i] for i in best.tolist()]
            probabilities = [dict(zip(class_labels, row, strict=True)) for row in probs.tolist()]
        else:
            scores = out.reshape(n, -1)[:, 0]
            labels = itertools.repeat("")
        if len(outputs) > 1:
            contributions = np.asarray(outputs[1]).reshape(n, -1)
            k = min(TOP_FEATURES, contributions.shape[1])
            if k < contributions.shape[1]:  # the k largest (unordered), then those in order
                top = np.argpartition(contributions, -k, axis=1)[:, -k:]
                picked = np.take_along_axis(contributions, top, axis=1)
                top = np.take_along_axis(top, np.argsort(-picked, axis=1, kind="stable"), axis=1)
            else:
                top = np.argsort(-contributions, axis=1, kind="stable")
            values = np.take_along_axis(contributions, top, axis=1).astype(np.float64).tolist()
            names = self._column_names[top].tolist()
            top_features = [tuple(zip(n, v, strict=True)) for n, v in zip(names, values, strict=True)]
        if self.drift is not None:
            self.drift.observe(inputs, scores)
        # Built as plain tuples: Score's own __new__ is a Python function, a third of this loop.
        fields = (m.model_id, m.version, m.kind)
        shadow = self.shadow
        new = tuple.__new__
        return [
            new(Score, (*fields, s, threshold, s >= threshold, label, p, t, shadow))
            for s, label, p, t in zip(scores.tolist(), labels, probabilities, top_features, strict=False)
        ]

    @functools.cached_property
    def _labels(self) -> tuple[str, ...]:
        # A tuple: indexing and zipping the manifest's repeated field costs ~10x as much, per row.
        return tuple(self.manifest.labels)

    @functools.cached_property
    def _column_names(self) -> npt.NDArray[np.object_]:
        return np.array(self.manifest.feature_set.columns, dtype=object)


def load_model(manifest_path: Path, threads: int = 1, trust: ModelTrust | None = None) -> LoadedModel:
    """Load and validate one model; raise ManifestError with a one-line reason.

    The manifest must be signed by a key ``trust`` holds (by default: the release keys).
    """
    manifest = read_manifest(manifest_path)
    (trust or ModelTrust.load([])).verify(manifest, str(manifest_path))
    if manifest.domain not in (model_pb2.MODEL_DOMAIN_NETWORK_FLOW, model_pb2.MODEL_DOMAIN_UNSPECIFIED):
        raise ManifestError(f"{manifest_path}: not a network-flow model")
    try:
        fs = feature_set(manifest.feature_set.name, manifest.feature_set.version)
        fs.check_columns(manifest.feature_set.columns)
    except ValueError as exc:
        raise ManifestError(f"{manifest_path}: {exc}") from None
    session = open_session(manifest_path, manifest, threads)
    inputs = {i.name: i for i in session.get_inputs()}
    width = inputs[manifest.input_name].shape[-1]
    if isinstance(width, int) and width != len(manifest.feature_set.columns):
        raise ManifestError(
            f"{manifest_path}: graph reads {width} features, "
            f"manifest lists {len(manifest.feature_set.columns)}"
        )
    outputs = {o.name: o for o in session.get_outputs()}
    for name in filter(None, (manifest.score_output, manifest.explanation_output)):
        if name not in outputs:
            raise ManifestError(f"{manifest_path}: graph has no output {name!r}")
    position = {c: i for i, c in enumerate(fs.columns)}
    index = np.array([position[c] for c in manifest.feature_set.columns], dtype=np.intp)
    normal = list(manifest.labels).index(manifest.normal_label) if manifest.labels else -1
    reference = manifest.reference
    usable = [f.feature for f in reference.features] == list(manifest.feature_set.columns)
    drift = DriftWindow(reference) if usable and reference.score.counts else None
    return LoadedModel(manifest, fs, session, index, normal, drift=drift)


@dataclasses.dataclass
class ModelSet:
    """The models an agent runs, grouped by the feature set they read."""

    models: list[LoadedModel]
    # Batches a model failed to score (counted, logged, never fatal: the flows still get verdicts).
    errors: int = 0

    @property
    def feature_sets(self) -> list[FeatureSet]:
        seen: dict[str, FeatureSet] = {}
        for model in self.models:
            seen.setdefault(model.feature_set.name, model.feature_set)
        return list(seen.values())

    def score(self, features: Sequence[Mapping[str, Sequence[float]]]) -> list[list[Score]]:
        """Score a batch of flows (feature set name -> vector) with every model."""
        if not features:
            return []
        matrices = {
            fs.name: to_matrix([f[fs.name] for f in features], len(fs.columns)) for fs in self.feature_sets
        }
        columns: list[list[Score]] = []
        for model in self.models:
            try:
                columns.append(model.score_matrix(matrices[model.feature_set.name]))
            # onnxruntime's errors are untyped; one bad batch must not stop the agent.
            except Exception as exc:
                self.errors += 1
                logger.error("model %s failed on a batch of %d flows: %s", model.ref, len(features), exc)
        if not columns:
            return [[] for _ in features]
        return [list(row) for row in zip(*columns, strict=True)]


def load_models(
    folder: Path, threads: int = 1, trust: ModelTrust | None = None
) -> tuple[ModelSet, list[str]]:
    """Load every valid model in ``folder``; return them and one error line per refused model."""
    trust = trust or ModelTrust.load([])
    models: list[LoadedModel] = []
    errors: list[str] = []
    for path in find_manifests(folder):
        try:
            model = load_model(path, threads, trust)
        except ManifestError as exc:
            errors.append(str(exc))
            logger.error("refusing model: %s", exc)
            continue
        logger.info("loaded model %s (%s, %d features)", model.ref, path.name, len(model.column_index))
        models.append(model)
    return ModelSet(models), errors
