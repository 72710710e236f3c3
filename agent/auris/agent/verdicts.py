"""Verdicts: a metered flow plus its model scores, as the contract's ``Verdict``."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from google.protobuf import timestamp_pb2

from auris.agent.meter import FlowRecord
from auris.agent.scoring import Score
from auris.agent.wire import length_delimited, length_prefix
from auris.v1 import model_pb2, verdict_pb2

__all__ = ["MAX_TIME_SECONDS", "VerdictBuilder", "build_verdict", "decide"]

# The latest second a verdict's times may name: the collector stores times in ns in signed 64-bit
# integers, which end on 2262-04-11 (the protobuf Timestamp itself goes to 9999).
MAX_TIME_SECONDS = (2**63 - 1) // 1_000_000_000 - 1
_MAX_TIME_MS = MAX_TIME_SECONDS * 1000

NORMAL_LABEL = "benign"
ANOMALY_LABEL = "anomaly"
_CLASSIFIER = model_pb2.MODEL_KIND_CLASSIFIER
_DOUBLE = struct.Struct("<d").pack


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


def _string_field(tag: bytes, text: str) -> bytes:
    return length_delimited(tag, text.encode())


class _Encoded(dict[tuple[object, ...], bytes]):
    """Encoded protobuf pieces by what they encode: built on first use, then looked up (the
    names and models come from manifests: a few dozen per model)."""

    def __init__(self, encode: Callable[..., bytes], limit: int = 4096) -> None:
        super().__init__()
        self._encode = encode
        self._limit = limit

    def __missing__(self, key: tuple[object, ...]) -> bytes:
        value = self._encode(*key)
        if len(self) < self._limit:
            self[key] = value
        return value


def _named_double_prefix(tag: bytes, name: str) -> bytes:
    """A (string 1, double 2) message in field ``tag`` (a map<string, double> entry, a
    FeatureContribution), all but the double's 8 bytes."""
    key = _string_field(b"\x0a", name)
    return tag + length_prefix(len(key) + 9) + key + b"\x11"


def _score_prefix(model_id: str, version: str, kind: int, threshold: float, shadow: bool) -> bytes:
    """A ModelScore's fields that are the model's, not the flow's: model, kind, threshold, shadow."""
    entry = verdict_pb2.ModelScore(kind=kind, threshold=threshold, shadow=shadow)  # type: ignore[arg-type]
    entry.model.model_id = model_id
    entry.model.version = version
    return entry.SerializeToString()


def _model_field(model_id: str, version: str) -> bytes:
    """Verdict.model (field 7) naming this model."""
    return length_delimited(b"\x3a", _string_field(b"\x0a", model_id) + _string_field(b"\x12", version))


_SCORE_PREFIX = _Encoded(_score_prefix)
_MODEL_FIELD = _Encoded(_model_field)
_LABEL = _Encoded(lambda label: _string_field(b"\x32", label))
_PROBABILITY = _Encoded(lambda name: _named_double_prefix(b"\x3a", name))
_TOP_FEATURE = _Encoded(lambda name: _named_double_prefix(b"\x42", name))


def _score_field(s: Score) -> bytes:
    """One Verdict.scores entry (field 8), encoded: a ModelScore is a handful of fields, and
    joining their bytes costs less than setting them one by one on the message."""
    model_id, version, kind, score, threshold, anomalous, label, probabilities, top_features, shadow = s
    parts = [_SCORE_PREFIX[model_id, version, kind, threshold, shadow], b"\x19", _DOUBLE(score)]
    if anomalous:
        parts.append(b"\x28\x01")
    if label:
        parts.append(_LABEL[(label,)])
    for name, p in probabilities.items():
        parts += (_PROBABILITY[(name,)], _DOUBLE(p))
    for name, value in top_features:
        parts += (_TOP_FEATURE[(name,)], _DOUBLE(value))
    return length_delimited(b"\x42", b"".join(parts))


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
    fired = [s for s in scores if s.anomalous and not s.shadow]  # shadow models never decide
    if fired:
        fired_classifier = next((s for s in fired if s.kind == _CLASSIFIER), None)
        decider = fired_classifier or fired[0]
        label = fired_classifier.label if fired_classifier else ANOMALY_LABEL
        explanation = "; ".join(_explain(s) for s in fired)
        return decider, label, True, explanation
    first = None
    for s in scores:
        if not s.shadow:
            if s.kind == _CLASSIFIER:
                first = s
                break
            first = first or s
    if first is None:
        return None, NORMAL_LABEL, False, "no model scored this flow"
    return first, NORMAL_LABEL, False, f"{first.model_id} {first.score:.3g} < {first.threshold:.3g}"


class VerdictBuilder:
    """Builds the verdicts of one batch of flows.

    Each verdict carries ``features`` ((set name, version) pairs: the flow's vector of each) for
    every flow (``features_when`` "all"), for anomalous ones ("anomalous"), or never ("none").
    Called with (index in the batch, sequence number), as ``Spool.append`` builds a batch; then
    ``scores`` is one ``ModelSet.score`` result. What the batch's verdicts share (agent, host,
    scoring time) is encoded once; the scores are encoded, each with its model's fields cached,
    and parsed into the verdict with it in one call.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        hostname: str,
        scored_time: timestamp_pb2.Timestamp,
        flows: Sequence[FlowRecord] = (),
        scores: Sequence[Sequence[Score]] = (),
        feature_sets: Sequence[tuple[str, str]] = (),
        features_when: str = "all",
    ) -> None:
        template = verdict_pb2.Verdict(agent_id=agent_id, hostname=hostname)
        template.scored_time.CopyFrom(scored_time)
        self._head = template.SerializeToString()
        self._flows = flows
        self._scores = scores
        if features_when not in ("all", "anomalous", "none"):
            raise ValueError(f"features_when: expected all, anomalous or none, got {features_when!r}")
        self._feature_sets = tuple(feature_sets) if features_when != "none" else ()
        self._anomalous_only = features_when == "anomalous"

    def __call__(self, index: int, sequence: int) -> verdict_pb2.Verdict:
        return self.build(sequence, self._flows[index], self._scores[index])

    def build(self, sequence: int, flow: FlowRecord, scores: Sequence[Score]) -> verdict_pb2.Verdict:
        """The verdict on one flow."""
        decider, label, anomalous, explanation = decide(scores)
        encoded = [self._head]
        if decider is not None:
            encoded.append(_MODEL_FIELD[decider.model_id, decider.model_version])
        encoded += map(_score_field, scores)
        verdict = verdict_pb2.Verdict.FromString(b"".join(encoded))
        # The flow's own fields, set in place (building sub-messages apart and copying them in
        # costs half again; encoding its integers in Python, as much as setting them).
        verdict.sequence = sequence
        verdict.label = label
        verdict.anomalous = anomalous
        verdict.explanation = explanation[:200]
        verdict.application_name = flow.application_name
        verdict.end_reason = flow.end_reason
        verdict.capture_source = flow.capture_source
        key = verdict.flow
        key.src_ip = flow.src_ip
        key.dst_ip = flow.dst_ip
        key.src_port = flow.src_port
        key.dst_port = flow.dst_port
        key.ip_protocol = flow.protocol
        key.vlan_id = flow.vlan_id
        key.ip_version = flow.ip_version
        first, last = flow.first_seen_ms, flow.last_seen_ms
        if type(first) is int and type(last) is int and 0 <= first <= last <= _MAX_TIME_MS:
            stamp = verdict.first_seen_time  # the usual case, without a call per time
            stamp.seconds, millis = divmod(first, 1000)
            stamp.nanos = millis * 1_000_000
            stamp = verdict.last_seen_time
            stamp.seconds, millis = divmod(last, 1000)
            stamp.nanos = millis * 1_000_000
        else:
            _set_time_ms(verdict.first_seen_time, first)
            _set_time_ms(verdict.last_seen_time, last)
        counters = verdict.counters
        counters.src_to_dst_packets = flow.src2dst_packets
        counters.dst_to_src_packets = flow.dst2src_packets
        counters.src_to_dst_bytes = flow.src2dst_bytes
        counters.dst_to_src_bytes = flow.dst2src_bytes
        if self._feature_sets and (anomalous or not self._anomalous_only):
            vectors = flow.features
            for name, version in self._feature_sets:
                verdict.features.add(feature_set=name, version=version, values=vectors[name])
        return verdict


def build_verdict(
    *,
    agent_id: str,
    sequence: int,
    flow: FlowRecord,
    scores: Sequence[Score],
    hostname: str,
    scored_time: timestamp_pb2.Timestamp,
    feature_sets: Sequence[tuple[str, str]] = (),
    features_when: str = "all",
) -> verdict_pb2.Verdict:
    """The verdict on one flow (see VerdictBuilder, which builds a batch's)."""
    builder = VerdictBuilder(
        agent_id=agent_id,
        hostname=hostname,
        scored_time=scored_time,
        feature_sets=feature_sets,
        features_when=features_when,
    )
    return builder.build(sequence, flow, scores)
