"""The first capture's metering, started before the agent's heavy imports and model loading.

``auris-agent`` spends about a quarter of a second importing gRPC, onnxruntime and numpy and
loading its models before it could start a meter; a replay or a capture can start meanwhile.
``EarlyMeter`` meters the first source on a thread of its own, with the feature sets of the
models the agent will most likely run (the manifests in ``models_dir``, read but not yet
verified: computing features from a capture is harmless), and keeps what it metered until the
agent claims it. The agent claims it only when source, feature sets and options are the ones
it settled on; otherwise (a model refused, a replay completed before, a stop) it is cancelled:
its meter is terminated and nothing it metered is used.

Light on purpose: it imports only what metering needs.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from auris.agent.config import AgentConfig
from auris.agent.features import FeatureSet, feature_set
from auris.agent.manifest import ManifestError, find_manifests, read_manifest
from auris.agent.meter import FlowRecord, MeterOptions, meter_batches, stop_meters
from auris.agent.state import desired_models_file

__all__ = ["EarlyMeter", "meter_options", "metering_sources", "planned_feature_sets"]

logger = logging.getLogger(__name__)

# Batches held for the agent before the meter is held back (64 flows each).
_HELD_BATCHES = 256


def metering_sources(config: AgentConfig) -> list[str]:
    """The capture files (each once, however often it is named) or the interface."""
    if config.pcaps:
        return list(dict.fromkeys(str(Path(p).resolve()) for p in config.pcaps))
    return [config.interface] if config.interface else []


def meter_options(config: AgentConfig) -> MeterOptions:
    return MeterOptions(
        bpf_filter=config.bpf_filter,
        snapshot_length=config.snapshot_length,
        promiscuous=config.promiscuous,
        idle_timeout_s=config.idle_timeout_s,
        active_timeout_s=config.active_timeout_s,
    )


def planned_feature_sets(config: AgentConfig) -> list[FeatureSet] | None:
    """The feature sets of the manifests in ``models_dir``, in the order the agent loads them;
    None when the agent would run others (models the collector sent) or none is readable."""
    if not config.models_dir or desired_models_file(Path(config.state_dir)).exists():
        return None
    sets: dict[str, FeatureSet] = {}
    for path in find_manifests(Path(config.models_dir)):
        try:
            manifest = read_manifest(path, verify_file=False)
            fs = feature_set(manifest.feature_set.name, manifest.feature_set.version)
        except (ManifestError, ValueError, OSError):
            continue  # the agent will refuse it too, and say why
        sets.setdefault(fs.name, fs)
    return list(sets.values()) or None


def _signature(feature_sets: Sequence[FeatureSet]) -> frozenset[tuple[str, str]]:
    return frozenset((fs.name, fs.version) for fs in feature_sets)


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


class _Done:
    pass


class EarlyMeter:
    """One source metered from start-up, its batches held for the agent (see the module doc)."""

    def __init__(self, source: str, feature_sets: Sequence[FeatureSet], options: MeterOptions) -> None:
        self.source = source
        self._options = options
        self._feature_sets = list(feature_sets)
        self._held: queue.Queue[list[FlowRecord] | _Failed | _Done] = queue.Queue(_HELD_BATCHES)
        self._meters: list[Any] = []
        self._cancelled = threading.Event()
        self._claimed = False
        # time.monotonic() when it started.
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="auris-early-meter", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, config: AgentConfig) -> EarlyMeter | None:
        """Meter the configuration's first source now, if the models' feature sets can be told."""
        sources = metering_sources(config)
        feature_sets = planned_feature_sets(config)
        if not sources or feature_sets is None:
            return None
        return cls(sources[0], feature_sets, meter_options(config))

    def _run(self) -> None:
        try:
            for batch in meter_batches(self.source, self._feature_sets, self._options, self._meters):
                if self._cancelled.is_set():
                    break
                self._held.put(batch)
            else:
                self._held.put(_Done())
        except BaseException as exc:  # handed to whoever claims the metering
            self._held.put(_Failed(exc))
        finally:
            if self._cancelled.is_set():
                stop_meters(self._meters)

    def claim(self, source: str, feature_sets: Sequence[FeatureSet], options: MeterOptions) -> bool:
        """Whether this is the metering the agent would start (then it is the agent's to read)."""
        if self._claimed or self._cancelled.is_set():
            return False
        mine = (self.source, _signature(self._feature_sets), self._options)
        if (source, _signature(feature_sets), options) != mine:
            return False
        self._claimed = True
        return True

    def batches(self) -> Iterator[list[FlowRecord]]:
        """The flows of the claimed source, in the meter's batches; its errors are raised."""
        while True:
            item = self._held.get()
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def cancel(self) -> None:
        """Stop it and drop what it metered (a no-op once claimed)."""
        if self._claimed or self._cancelled.is_set():
            return
        self._cancelled.set()
        deadline = time.monotonic() + 1.0
        while not self._meters and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # nfstream is about to start the meter: end it, not just its reading
        stop_meters(self._meters)
        while True:  # room for the thread to see the cancellation, if it waits to hand a batch on
            try:
                self._held.get_nowait()
            except queue.Empty:
                break
