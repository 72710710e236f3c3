"""A benign-only autoencoder for the agent's ``nfstream`` feature set, judged per flow shape.

Why not the plain autoencoder (``autoencoder.py``) on these columns: most flows of the shared
captures, benign and attack alike, are one packet or one-sided, and their vectors are mostly
zeros, so their reconstruction error is tiny whatever the packet was; a lone SYN and a lone DNS
answer look equally "normal" on raw counts. This model

- derives, inside the graph, what tells such flows apart: the protocol one-hot (a number is not a
  scale), IPv6, the share of each direction's packets carrying each TCP flag (a flood's SYN-only
  packet versus a benign TCP segment's ACK), one-sided and one-packet indicators, and
  ``log1p`` of every count, size and time;
- scales them robustly (benign median and interquartile range; the standard deviation, then 1,
  where the range is zero);
- averages the squared reconstruction errors of several MLPs (seeds);
- divides each feature's error by that feature's mean error on benign training flows OF THE SAME
  SHAPE (one packet / one-sided / two-sided), so a one-packet flow is judged against one-packet
  flows and the error of one oddity is not drowned by 74 well-reconstructed zeros.

Outputs: ``feature_errors`` (normalised errors attributed to the input columns a derived feature
comes from, each divided by the number of derived features) and ``score`` (their sum: the mean
normalised error). The agent takes the top ``feature_errors`` as the explanation.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor

from auris.training.autoencoder import ERRORS_OUTPUT, INPUT_NAME, SCORE_OUTPUT, detector_model

__all__ = [
    "ERRORS_OUTPUT",
    "INPUT_NAME",
    "SCORE_OUTPUT",
    "SHAPES",
    "FlowAutoencoder",
    "fit_flow_autoencoder",
    "flow_shapes",
]

SHAPES = ("one packet", "one-sided", "two-sided")
_PROTOCOLS = (6, 17, 1, 58)  # TCP, UDP, ICMP, ICMPv6; anything else is "other"
_FLAGS = ("syn", "ack", "psh", "rst", "fin")
_DIRECTIONS = ("src2dst", "dst2src")
# Added to each per-shape mean error before dividing: a feature benign flows of a shape always
# reconstruct perfectly (a constant) must not turn a rounding error into a huge score.
ERROR_FLOOR = 1e-2

Matrix = npt.NDArray[np.float32]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each derived feature comes from in the input columns."""

    columns: tuple[str, ...]

    def index(self, name: str) -> int:
        return self.columns.index(name)

    @property
    def logged(self) -> list[int]:
        return [i for i, c in enumerate(self.columns) if c not in ("protocol", "ip_version")]

    @property
    def flag_pairs(self) -> list[tuple[int, int]]:
        """(flag column, packets column) per direction and flag."""
        return [
            (self.index(f"{d}_{f}_packets"), self.index(f"{d}_packets")) for d in _DIRECTIONS for f in _FLAGS
        ]

    def names(self) -> list[str]:
        names = [f"protocol=={p}" for p in _PROTOCOLS] + ["protocol other", "ip_version==6"]
        names += [f"log1p {self.columns[i]}" for i in self.logged]
        names += [f"{d}_{f} share" for d in _DIRECTIONS for f in _FLAGS]
        return [*names, "one-sided", "one packet"]

    def sources(self) -> list[int]:
        """The input column each derived feature is attributed to."""
        protocol, version = self.index("protocol"), self.index("ip_version")
        sources = [protocol] * (len(_PROTOCOLS) + 1) + [version] + self.logged
        sources += [flag for flag, _ in self.flag_pairs]
        return [*sources, self.index("dst2src_packets"), self.index("bidirectional_packets")]


def flow_shapes(x: Matrix, columns: Sequence[str]) -> npt.NDArray[np.intp]:
    """0: one packet, 1: one-sided (no packet back, more than one sent), 2: two-sided."""
    layout = _Layout(tuple(columns))
    packets = x[:, layout.index("bidirectional_packets")]
    back = x[:, layout.index("dst2src_packets")]
    return np.where(packets == 1, 0, np.where(back == 0, 1, 2)).astype(np.intp)


def derive(x: Matrix, columns: Sequence[str]) -> Matrix:
    """The derived features in numpy, float32 step by step as the graph computes them."""
    layout = _Layout(tuple(columns))
    x = x.astype(np.float32)
    protocol = x[:, [layout.index("protocol")]]
    onehot = (protocol == np.asarray(_PROTOCOLS, dtype=np.float32)).astype(np.float32)
    other = np.float32(1.0) - onehot.sum(axis=1, keepdims=True)
    ipv6 = (x[:, [layout.index("ip_version")]] == np.float32(6)).astype(np.float32)
    logged = np.log(np.maximum(x[:, layout.logged], np.float32(0)) + np.float32(1))
    flags = np.asarray([f for f, _ in layout.flag_pairs])
    packets = np.asarray([p for _, p in layout.flag_pairs])
    shares = x[:, flags] / np.maximum(x[:, packets], np.float32(1))
    one_sided = (x[:, [layout.index("dst2src_packets")]] == np.float32(0)).astype(np.float32)
    one_packet = (x[:, [layout.index("bidirectional_packets")]] == np.float32(1)).astype(np.float32)
    parts = (onehot, other, ipv6, logged, shares, one_sided, one_packet)
    return np.concatenate(parts, axis=1).astype(np.float32)


@dataclasses.dataclass
class FlowAutoencoder:
    """The fitted ensemble plus everything the graph bakes in."""

    columns: tuple[str, ...]
    centre: Matrix
    scale: Matrix
    mlps: list[MLPRegressor]
    # Per shape (rows of SHAPES), per derived feature: 1 / (mean benign training error + floor).
    inverse_error: Matrix

    @property
    def derived_names(self) -> list[str]:
        return _Layout(self.columns).names()

    def _attribution(self) -> Matrix:
        sources = _Layout(self.columns).sources()
        matrix = np.zeros((len(sources), len(self.columns)), dtype=np.float32)
        matrix[np.arange(len(sources)), sources] = 1.0 / len(sources)
        return matrix

    def _errors(self, x: Matrix) -> Matrix:
        """Mean squared error per derived feature over the ensemble (not yet normalised)."""
        z = ((derive(x, self.columns) - self.centre) / self.scale).astype(np.float32)
        total = np.zeros_like(z)
        for mlp in self.mlps:
            total += (mlp.predict(z).astype(np.float32) - z) ** 2
        return total / np.float32(len(self.mlps))

    def reference(self, x: Matrix) -> tuple[Matrix, Matrix]:
        """(scores, per-column errors) in numpy, the yardstick for the ONNX graph."""
        errors = self._errors(x) * self.inverse_error[flow_shapes(x, self.columns)]
        column_errors = (errors @ self._attribution()).astype(np.float32)
        return column_errors.sum(axis=1), column_errors

    def to_onnx(self) -> bytes:
        layout = _Layout(self.columns)
        n = len(self.columns)
        f = np.float32
        consts = {
            "one": np.array(1.0, dtype=f),
            "zero": np.array(0.0, dtype=f),
            "six": np.array(6.0, dtype=f),
            "protocols": np.asarray(_PROTOCOLS, dtype=f),
            "centre": self.centre.astype(f),
            "scale": self.scale.astype(f),
            "inverse_error": self.inverse_error.astype(f),
            "attribution": self._attribution(),
            "ensemble_size": np.array(len(self.mlps), dtype=f),
        }
        indices = {
            "i_protocol": [layout.index("protocol")],
            "i_version": [layout.index("ip_version")],
            "i_logged": layout.logged,
            "i_flags": [a for a, _ in layout.flag_pairs],
            "i_packets": [b for _, b in layout.flag_pairs],
            "i_back": [layout.index("dst2src_packets")],
            "i_total": [layout.index("bidirectional_packets")],
        }
        inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
        inits += [numpy_helper.from_array(np.asarray(v, dtype=np.int64), k) for k, v in indices.items()]
        node = helper.make_node

        def gather(name: str) -> onnx.NodeProto:
            return node("Gather", [INPUT_NAME, f"i_{name}"], [name], axis=1)

        def indicator(source: str, value: str, out: str) -> list[onnx.NodeProto]:
            return [node("Equal", [source, value], [f"{out}_b"]), node("Cast", [f"{out}_b"], [out], to=1)]

        nodes = [gather(k) for k in ("protocol", "version", "logged", "flags", "packets", "back", "total")]
        nodes += indicator("protocol", "protocols", "onehot")
        nodes += [
            node("ReduceSum", ["onehot", "one_axis"], ["known"], keepdims=1),
            node("Sub", ["one", "known"], ["other"]),
        ]
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one_axis"))
        nodes += indicator("version", "six", "ipv6")
        nodes += [
            node("Relu", ["logged"], ["logged_pos"]),
            node("Add", ["logged_pos", "one"], ["logged_1"]),
            node("Log", ["logged_1"], ["logs"]),
            node("Max", ["packets", "one"], ["packets_1"]),
            node("Div", ["flags", "packets_1"], ["shares"]),
        ]
        nodes += indicator("back", "zero", "one_sided")
        nodes += indicator("total", "one", "one_packet")
        nodes += [
            node(
                "Concat",
                ["onehot", "other", "ipv6", "logs", "shares", "one_sided", "one_packet"],
                ["derived"],
                axis=1,
            ),
            node("Sub", ["derived", "centre"], ["centred"]),
            node("Div", ["centred", "scale"], ["z"]),
        ]
        squares: list[str] = []
        for m, mlp in enumerate(self.mlps):
            if mlp.activation != "relu":
                raise ValueError(f"only relu autoencoders export, not {mlp.activation}")
            current = "z"
            layers = len(mlp.coefs_)
            for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_, strict=True)):
                inits += [
                    numpy_helper.from_array(w.astype(f), f"m{m}_w{i}"),
                    numpy_helper.from_array(b.astype(f), f"m{m}_b{i}"),
                ]
                nodes += [
                    node("MatMul", [current, f"m{m}_w{i}"], [f"m{m}_mm{i}"]),
                    node("Add", [f"m{m}_mm{i}", f"m{m}_b{i}"], [f"m{m}_lin{i}"]),
                ]
                current = f"m{m}_lin{i}"
                if i < layers - 1:  # MLPRegressor: hidden activation, identity output
                    nodes.append(node("Relu", [current], [f"m{m}_act{i}"]))
                    current = f"m{m}_act{i}"
            nodes += [
                node("Sub", [current, "z"], [f"m{m}_residual"]),
                node("Mul", [f"m{m}_residual", f"m{m}_residual"], [f"m{m}_square"]),
            ]
            squares.append(f"m{m}_square")
        nodes += [
            node("Sum", squares, ["square_sum"]),
            node("Div", ["square_sum", "ensemble_size"], ["errors"]),
            # The shape one-hot picks each row's normalisers: [one packet, one-sided, two-sided].
            node("Sub", ["one_sided", "one_packet"], ["only_one_sided"]),
            node("Sub", ["one", "one_sided"], ["two_sided"]),
            node("Concat", ["one_packet", "only_one_sided", "two_sided"], ["shape"], axis=1),
            node("MatMul", ["shape", "inverse_error"], ["row_inverse"]),
            node("Mul", ["errors", "row_inverse"], ["normalised"]),
            node("MatMul", ["normalised", "attribution"], [ERRORS_OUTPUT]),
            node("ReduceSum", [ERRORS_OUTPUT, "one_axis"], [SCORE_OUTPUT], keepdims=0),
        ]
        return detector_model(nodes, "auris_flow_autoencoder", n, inits, full_check=True)


def fit_flow_autoencoder(
    x_benign: Matrix,
    columns: Sequence[str],
    hidden: tuple[int, ...] = (32, 8, 32),
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
) -> FlowAutoencoder:
    """Fit on benign flows only (in ``columns`` order, which must hold the nfstream flag columns)."""
    columns = tuple(columns)
    derived = derive(x_benign, columns)
    centre = np.median(derived, axis=0).astype(np.float32)
    spread = (np.quantile(derived, 0.75, axis=0) - np.quantile(derived, 0.25, axis=0)).astype(np.float32)
    std = derived.std(axis=0).astype(np.float32)
    scale = np.where(spread > 1e-6, spread, np.where(std > 1e-6, std, 1.0)).astype(np.float32)
    z = ((derived - centre) / scale).astype(np.float32)
    mlps = []
    for seed in seeds:
        mlp = MLPRegressor(
            hidden_layer_sizes=hidden,
            activation="relu",
            alpha=1e-4,
            max_iter=500,
            early_stopping=True,
            random_state=seed,
        )
        with warnings.catch_warnings():
            # Some seeds run to max_iter before early stopping ends them; the evaluation judges
            # the ensemble as it is, so the warning says nothing the figures do not.
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlps.append(mlp.fit(z, z))
    model = FlowAutoencoder(columns, centre, scale, mlps, np.ones((len(SHAPES), z.shape[1]), np.float32))
    errors = model._errors(x_benign)
    shapes = flow_shapes(x_benign, columns)
    overall = errors.mean(axis=0)
    for s in range(len(SHAPES)):
        # A shape no benign training flow has is judged against all of them.
        mean = errors[shapes == s].mean(axis=0) if (shapes == s).any() else overall
        model.inverse_error[s] = 1.0 / (mean + ERROR_FLOOR)
    return model
