"""Verdicts: a metered flow plus its model scores, as the contract's ``Verdict``."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import timestamp_pb2

from auris.agent.meter import FlowRecord
from auris.agent.scoring import Score
from auris.v1 import model_pb2, verdict_pb2

__all__ = ["MAX_TIME_SECONDS", "build_verdict", "decide"]

# The latest second a verdict's times may name: the collector stores times in ns in signed 64-bit
# integers, which end on 2262-04-11 (the protobuf Timestamp itself goes to 9999).
MAX_TIME_SECONDS = (2**63 - 1) // 1_000_000_000 - 1
_MAX_TIME_MS = MAX_TIME_SECONDS * 1000

NORMAL_LABEL = "benign"
ANOMALY_LABEL = "anomaly"


def _set_time_ms(ts: timestamp_pb2.Timestamp, ms: int) -> None:
    """Set a flow time; clamped to 1970..2262: a corrupt capture record's time (nfstream reports a
    time before 1970 as a huge unsigned number) must not cost the verdict, or the collector
    would refuse the whole batch it travels in."""
    ms = int(ms)
    if ms >= 2**63:  # nfstream's unsigned 64-bit milliseconds of a time before 1970
        ms -= 2**64
    ms = min(max(ms, 0), _MAX_TIME_MS)
    ts.seconds, millis = divmod(ms, 1000)
    ts.nanos = millis * 1_000_000


def _explain(s: Score) -> str:
    """One model's reason in a few words: its score, and its top features or class."""
    text = f"{s.model_id} {s.score:.3g} >= {s.threshold:.3g}"
    if s.top_features:
        text += " (" + ", ".join(name for name, _ in s.top_features) + ")"
    elif s.label:
        text += f" ({s.label} p={s.probabilities.get(s.label, s.score):.2f})"
    return text


def decide(scores: Sequence[Score]) -> tuple[Score | None, str, bool, str]:
    """Combine the models' scores: (deciding score, label, anomalous, explanation).

    Any model that fires makes the flow anomalous. The label is the classifier's
    class when a classifier fired, ``anomaly`` when only detectors fired, and the
    normal label otherwise. The deciding model is the first classifier that fired (its
    label is the verdict's), else the first model that fired, else the first
    classifier, else the first model.
    """
    scores = [s for s in scores if not s.shadow]  # shadow models never decide
    if not scores:
        return None, NORMAL_LABEL, False, "no model scored this flow"
    fired = [s for s in scores if s.anomalous]
    classifiers = [s for s in scores if s.kind == model_pb2.MODEL_KIND_CLASSIFIER]
    if fired:
        fired_classifier = next((s for s in fired if s.kind == model_pb2.MODEL_KIND_CLASSIFIER), None)
        decider = fired_classifier or fired[0]
        label = fired_classifier.label if fired_classifier else ANOMALY_LABEL
        explanation = "; ".join(_explain(s) for s in fired)
        return decider, label, True, explanation
    decider = classifiers[0] if classifiers else scores[0]
    return decider, NORMAL_LABEL, False, f"{decider.model_id} {decider.score:.3g} < {decider.threshold:.3g}"


def build_verdict(
    *,
    agent_id: str,
    sequence: int,
    flow: FlowRecord,
    scores: Sequence[Score],
    hostname: str,
    scored_time: timestamp_pb2.Timestamp,
    features: Sequence[tuple[str, str, Sequence[float]]] = (),
    features_when: str = "all",
) -> verdict_pb2.Verdict:
    """The verdict on one flow; it carries ``features`` ((set, version, values) each) for every flow
    (``features_when`` "all"), for anomalous ones ("anomalous"), or never ("none")."""
    decider, label, anomalous, explanation = decide(scores)
    # Sub-messages are filled in place: building them apart and copying them in costs half again.
    verdict = verdict_pb2.Verdict(
        agent_id=agent_id,
        sequence=sequence,
        label=label,
        anomalous=anomalous,
        explanation=explanation[:200],
        application_name=flow.application_name,
        end_reason=flow.end_reason,
        hostname=hostname,
        capture_source=flow.capture_source,
    )
    key = verdict.flow
    key.src_ip = flow.src_ip
    key.dst_ip = flow.dst_ip
    key.src_port = flow.src_port
    key.dst_port = flow.dst_port
    key.ip_protocol = flow.protocol
    key.vlan_id = flow.vlan_id
    key.ip_version = flow.ip_version
    _set_time_ms(verdict.first_seen_time, flow.first_seen_ms)
    _set_time_ms(verdict.last_seen_time, flow.last_seen_ms)
    counters = verdict.counters
    counters.src_to_dst_packets = flow.src2dst_packets
    counters.dst_to_src_packets = flow.dst2src_packets
    counters.src_to_dst_bytes = flow.src2dst_bytes
    counters.dst_to_src_bytes = flow.dst2src_bytes
    verdict.scored_time.CopyFrom(scored_time)
    if decider is not None:
        verdict.model.model_id = decider.model_id
        verdict.model.version = decider.model_version
    for s in scores:
        score = verdict.scores.add(
            kind=s.kind,
            score=s.score,
            threshold=s.threshold,
            anomalous=s.anomalous,
            label=s.label,
            shadow=s.shadow,
        )
        score.model.model_id = s.model_id
        score.model.version = s.model_version
        if s.probabilities:
            score.class_probabilities.update(s.probabilities)
        for name, value in s.top_features:
            score.top_features.add(feature=name, value=value)
    if features_when == "all" or (features_when == "anomalous" and anomalous):
        for name, version, values in features:
            verdict.features.add(feature_set=name, version=version, values=values)
    return verdict
