"""Feed scores encoded with numpy (``feed_wire``) parse to the messages that setting each field
through the protobuf API builds, whatever the rows."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from auris.collector.feeds import FeedRows, _encoded_scores
from auris.v1 import feed_service_pb2

T = TypeVar("T")
_MODELS = [("", ""), ("tick-local-z", "2"), ("tx-ulb-gb", ""), ("modèle", "v" * 130)]


def _reference(feed_id: str, rows: FeedRows, first_id: int, only: Sequence[bool] | None) -> bytes:
    """The answer's scores set field by field (the collector's way before feed_wire)."""
    answer = feed_service_pb2.StreamTicksResponse()
    fields = zip(
        itertools.count(first_id), rows.record_ids, rows.entities, rows.seconds, rows.nanos, rows.model_ids,
        rows.model_versions, rows.scores, rows.anomalous, rows.explanations,
    )  # fmt: skip
    for row_id, record_id, entity, sec, nanos, model_id, version, score, anomalous, text in (
        fields if only is None else itertools.compress(fields, only)
    ):
        entry = answer.scores.add(
            id=row_id, feed_id=feed_id, record_id=record_id, entity=entity, anomalous=anomalous,
            explanation=text, score=math.nan if score is None else score,
        )  # fmt: skip
        entry.time.seconds = sec
        entry.time.nanos = nanos
        if model_id:
            entry.model.model_id = model_id
            entry.model.version = version
    return answer.SerializeToString()


@st.composite
def _rows(draw: st.DrawFn) -> tuple[str, FeedRows, int, list[bool] | None]:
    n = draw(st.integers(0, 40))

    def column(strategy: st.SearchStrategy[T]) -> list[T]:
        return draw(st.lists(strategy, min_size=n, max_size=n))

    models = column(st.sampled_from(_MODELS) if draw(st.booleans()) else st.just(_MODELS[1]))
    values = column(st.floats(allow_nan=True, allow_infinity=True))
    scores = [None if not model_id else score for (model_id, _), score in zip(models, values, strict=True)]
    rows = FeedRows(
        column(st.text(max_size=150)),
        column(st.text(max_size=20)),
        column(st.integers(-(1 << 63), (1 << 63) - 1)),
        column(st.integers(-(1 << 31), (1 << 31) - 1)),
        [b""] * n,
        [m for m, _ in models],
        [v for _, v in models],
        scores,
        column(st.booleans()),
        column(st.text(max_size=200) | st.just("")),
    )
    first_id = draw(st.integers(0, (1 << 63) - 1 - n))
    only = column(st.booleans()) if draw(st.booleans()) else None
    return draw(st.text(max_size=140)), rows, first_id, only


@settings(max_examples=300, deadline=None)
@given(_rows())
def test_encoded_scores_parse_to_the_messages_set_field_by_field(
    case: tuple[str, FeedRows, int, list[bool] | None],
) -> None:
    feed_id, rows, first_id, only = case
    answer = feed_service_pb2.StreamTicksResponse()
    answer.MergeFromString(_encoded_scores(feed_id, rows, first_id, only))
    assert answer.SerializeToString() == _reference(feed_id, rows, first_id, only)
    kept = len(rows.record_ids) if only is None else sum(only)
    assert [s.id for s in answer.scores] == [
        first_id + i for i in range(len(rows.record_ids)) if only is None or only[i]
    ]
    assert len(answer.scores) == kept


def test_encoded_scores_append_to_an_answer_with_scores_already() -> None:
    rows = FeedRows(["a@1", "b@2"], ["a", "b"], [1, 2], [0, 5], [b"", b""], ["m", "m"], ["1", "1"],
                    [0.5, 2.0], [False, True], ["", "z 4.0"])  # fmt: skip
    answer = feed_service_pb2.SubmitTicksResponse(accepted=2)
    answer.MergeFromString(_encoded_scores("f", rows, 10, None))
    answer.MergeFromString(_encoded_scores("g", rows, 20, [False, True]))
    assert [(s.feed_id, s.id, s.record_id, s.anomalous) for s in answer.scores] == [
        ("f", 10, "a@1", False), ("f", 11, "b@2", True), ("g", 21, "b@2", True),
    ]  # fmt: skip
    assert answer.scores[1].time.nanos == 5
    assert answer.scores[1].model.version == "1"
    assert answer.accepted == 2
