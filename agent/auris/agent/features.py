"""Feature sets: the named, versioned, ordered columns a model reads from a flow.

This module is the single definition shared by the agent (live scoring) and
training (building tables from captures), so a model is trained on exactly what
the agent computes. A model manifest names its feature set and version; the agent
refuses a model whose set or columns it cannot produce.
"""

from __future__ import annotations

import dataclasses
import operator
from array import array
from collections.abc import Callable, Sequence
from typing import Any

from auris.agent.cicflowmeter import CICFLOWMETER_COLUMNS, CICFlowMeterPlugin, extract_cicflowmeter

__all__ = ["CICFLOWMETER", "FEATURE_SETS", "NFSTREAM", "FeatureSet", "feature_set"]

_DIRECTIONS = ("bidirectional", "src2dst", "dst2src")
_FLAGS = ("syn", "cwr", "ece", "urg", "ack", "psh", "rst", "fin")


def _nfstream_columns() -> tuple[str, ...]:
    cols = ["protocol", "ip_version"]
    for d in _DIRECTIONS:
        cols += [f"{d}_duration_ms", f"{d}_packets", f"{d}_bytes"]
    for d in _DIRECTIONS:
        cols += [f"{d}_{stat}_ps" for stat in ("min", "mean", "stddev", "max")]
    for d in _DIRECTIONS:
        cols += [f"{d}_{stat}_piat_ms" for stat in ("min", "mean", "stddev", "max")]
    for d in _DIRECTIONS:
        cols += [f"{d}_{flag}_packets" for flag in _FLAGS]
    return tuple(cols)


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """A named, versioned extractor producing ``columns`` from one metered flow.

    Vectors are ``array("d")``: they cross from nfstream's meter process to the agent as one
    block of bytes each, and ``auris.agent.scoring.to_matrix`` stacks them without a float
    object per value.
    """

    name: str
    version: str
    columns: tuple[str, ...]
    # nfstream options the extractor needs (statistical_analysis, splt_analysis...).
    meter_options: dict[str, Any]
    extract: Callable[[Any], array[float]]

    def check_columns(self, wanted: Sequence[str]) -> None:
        """Raise ValueError naming the first column this set cannot produce, or a reordering."""
        missing = [c for c in wanted if c not in self.columns]
        if missing:
            raise ValueError(f"feature set {self.name} v{self.version} has no column {missing[0]!r}")


def _extract_nfstream(flow: Any) -> array[float]:
    # NFlow exposes every statistic as an attribute; missing ones are a programming error.
    return array("d", _NFSTREAM_GET(flow))


NFSTREAM_COLUMNS = _nfstream_columns()
_NFSTREAM_GET = operator.attrgetter(*NFSTREAM_COLUMNS)  # one C call for every column

NFSTREAM = FeatureSet(
    name="nfstream",
    version="1",
    columns=NFSTREAM_COLUMNS,
    meter_options={"statistical_analysis": True},
    extract=_extract_nfstream,
)

# CICFlowMeter's columns, as in the CIC-IDS2017 table; see docs/cicflowmeter.md.
CICFLOWMETER = FeatureSet(
    name="cicflowmeter",
    version="1",
    columns=CICFLOWMETER_COLUMNS,
    meter_options={"udps": CICFlowMeterPlugin()},
    extract=extract_cicflowmeter,
)

FEATURE_SETS: dict[str, FeatureSet] = {NFSTREAM.name: NFSTREAM, CICFLOWMETER.name: CICFLOWMETER}


def feature_set(name: str, version: str) -> FeatureSet:
    """Return the extractor for ``name`` at ``version``, or raise ValueError."""
    found = FEATURE_SETS.get(name)
    if found is None:
        raise ValueError(f"unknown feature set {name!r} (this agent has: {', '.join(sorted(FEATURE_SETS))})")
    if found.version != version:
        raise ValueError(f"feature set {name!r} is version {found.version} here, the model wants {version}")
    return found
