"""Models from the collector: the set it wants, fetched, verified, kept on disk and swapped in.

The collector streams the complete set of models an agent should run
(``WatchModelUpdates``). The agent downloads what it lacks (``DownloadModel``) into
``state_dir/models/<id>@<version>/``, each verified before it is written: the bytes
against the manifest's sha256, the manifest against a trusted signature. The wanted
set is kept in ``state_dir/models/desired.json`` so that a restarted agent runs it even
while the collector is away. A wanted model the agent refuses (bad signature, feature
set it cannot compute, broken graph) is reported in heartbeats, and the version of that
model id it ran before keeps running. The new set is handed to the scoring loop, which
swaps it in between two batches: no flow is scored half by one set and half by another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from auris.agent.manifest import MANIFEST_SUFFIX, ManifestError, dump_manifest, file_sha256, read_manifest
from auris.agent.scoring import LoadedModel, ModelSet, load_model, load_models
from auris.agent.signing import ModelTrust
from auris.agent.state import desired_models_file, models_folder
from auris.v1 import agent_service_pb2, agent_service_pb2_grpc, model_pb2

__all__ = ["ModelCatalog", "ModelWatcher", "Refusal", "ref_name"]

logger = logging.getLogger(__name__)

# A model id or version becomes a folder name: keep it to a safe alphabet.
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_MANIFEST = f"model{MANIFEST_SUFFIX}"


def ref_name(ref: model_pb2.ModelRef) -> str:
    return f"{ref.model_id}@{ref.version}"


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A wanted model the agent does not run, and why (one line)."""

    model_id: str
    version: str
    reason: str

    def to_proto(self) -> model_pb2.ModelRefusal:
        return model_pb2.ModelRefusal(
            model=model_pb2.ModelRef(model_id=self.model_id, version=self.version), reason=self.reason
        )


class ModelCatalog:
    """The models this agent can run: the shipped folder and those the collector sent."""

    def __init__(self, models_dir: Path, state_dir: Path, trust: ModelTrust, threads: int = 1) -> None:
        self.models_dir = models_dir
        self.folder = models_folder(state_dir)
        self._desired = desired_models_file(state_dir)
        self.trust = trust
        self.threads = threads

    def wanted(self) -> tuple[list[model_pb2.ModelRef], list[model_pb2.ModelRef]]:
        """The (production, shadow) sets the collector last asked for; empty when it never asked."""
        try:
            data = json.loads(self._desired.read_text(encoding="utf-8"))
            refs = [
                [model_pb2.ModelRef(model_id=d["model_id"], version=d["version"]) for d in data[key]]
                for key in ("models", "shadow")
            ]
            return refs[0], refs[1]
        except FileNotFoundError:
            return [], []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("ignoring %s: %s", self._desired, exc)
            return [], []

    def desired(self) -> list[model_pb2.ModelRef]:
        return self.wanted()[0]

    def save_desired(
        self, refs: Sequence[model_pb2.ModelRef], shadow: Sequence[model_pb2.ModelRef] = ()
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {
            key: [{"model_id": r.model_id, "version": r.version} for r in group]
            for key, group in (("models", refs), ("shadow", shadow))
        }
        _write_atomically(self._desired, json.dumps(data, indent=1).encode())

    def find(self, ref: model_pb2.ModelRef) -> Path | None:
        """The manifest of ``ref`` on disk: downloaded, or shipped in models_dir."""
        if _SAFE.match(ref.model_id) and _SAFE.match(ref.version):
            downloaded = self.folder / ref_name(ref) / _MANIFEST
            if downloaded.is_file():
                return downloaded
        for path in sorted(self.models_dir.glob(f"*{MANIFEST_SUFFIX}")) if self.models_dir.is_dir() else ():
            try:
                manifest = read_manifest(path, verify_file=False)
            except ManifestError:
                continue
            if (manifest.model_id, manifest.version) == (ref.model_id, ref.version):
                return path
        return None

    def store(self, manifest: model_pb2.ModelManifest, onnx: bytes) -> Path:
        """Verify a downloaded model and keep it; ManifestError (one line) when it does not verify."""
        name = f"{manifest.model_id}@{manifest.version}"
        if not (_SAFE.match(manifest.model_id) and _SAFE.match(manifest.version)):
            raise ManifestError(f"{name}: model id or version has characters this agent does not accept")
        self.trust.verify(manifest, f"downloaded {name}")
        folder = self.folder / name
        staging = self.folder / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        onnx_path = staging / Path(manifest.onnx_file).name
        _write_atomically(onnx_path, onnx)
        if file_sha256(onnx_path) != manifest.onnx_sha256:
            shutil.rmtree(staging, ignore_errors=True)
            raise ManifestError(f"downloaded {name}: its bytes do not match the manifest's sha256")
        _write_atomically(staging / _MANIFEST, dump_manifest(manifest).encode())
        read_manifest(staging / _MANIFEST)  # the same checks a model on disk gets
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        return folder / _MANIFEST

    def compose(
        self, running: ModelSet | None = None, metered: set[str] | None = None
    ) -> tuple[ModelSet, list[Refusal], list[str]]:
        """The set to run now: the wanted models the agent accepts, else what ran before.

        ``metered`` names the feature sets the running meter computes (None at start, when the
        meter is built for whatever this returns). Returns the set, the refused wanted models,
        and one error line per refused shipped model when nothing is wanted.
        """
        wanted, shadow = self.wanted()
        if not wanted:
            models, errors = load_models(self.models_dir, self.threads, self.trust)
            return models, [], errors
        before = {m.manifest.model_id: m for m in running.models if not m.shadow} if running else {}
        chosen: list[LoadedModel] = []
        refusals: list[Refusal] = []
        for ref in wanted:
            same = self._running(running, ref)
            if same is not None:  # keep it as it runs: its session, its drift window
                chosen.append(same)
                continue
            try:
                model = self._load(ref, metered)
            except ManifestError as exc:
                reason = str(exc).splitlines()[0]
                refusals.append(Refusal(ref.model_id, ref.version, reason))
                old = before.get(ref.model_id)
                if old is not None:
                    chosen.append(old)
                kept = f"; keeping {old.ref}" if old else ""
                logger.error("refusing model %s: %s%s", ref_name(ref), reason, kept)
                continue
            chosen.append(model)
        shadows = [s for s in (self._load_shadow(ref, metered, refusals) for ref in shadow) if s is not None]
        if not chosen:
            if running is not None:
                return running, refusals, []
            models, errors = load_models(self.models_dir, self.threads, self.trust)
            return models, refusals, errors
        return ModelSet(chosen + shadows), refusals, []

    def _running(self, running: ModelSet | None, ref: model_pb2.ModelRef) -> LoadedModel | None:
        """The running production model that is ``ref`` (same id, version and ONNX bytes), if any."""
        if running is None:
            return None
        for model in running.models:
            m = model.manifest
            if model.shadow or (m.model_id, m.version) != (ref.model_id, ref.version):
                continue
            path = self.find(ref)
            if path is not None:
                try:
                    if read_manifest(path).onnx_sha256 != m.onnx_sha256:
                        return None  # same name, other bytes: load (and verify) the wanted one
                except ManifestError:
                    return None
            return model
        return None

    def _load(self, ref: model_pb2.ModelRef, metered: set[str] | None) -> LoadedModel:
        """One wanted model, verified and loaded; ManifestError (one line) when the agent will not run it."""
        path = self.find(ref)
        if path is None:
            raise ManifestError(f"{ref_name(ref)} is not downloaded yet")
        model = load_model(path, self.threads, self.trust)
        if metered is not None and model.feature_set.name not in metered:
            raise ManifestError(
                f"{ref_name(ref)} needs feature set {model.feature_set.name!r}, which this run does not "
                "meter; it is used after a restart"
            )
        return model

    def _load_shadow(
        self, ref: model_pb2.ModelRef, metered: set[str] | None, refusals: list[Refusal]
    ) -> LoadedModel | None:
        """A shadow model, or None (refused and reported: nothing else to keep running for it)."""
        try:
            model = self._load(ref, metered)
        except ManifestError as exc:
            refusals.append(Refusal(ref.model_id, ref.version, str(exc).splitlines()[0]))
            logger.error("refusing shadow model %s: %s", ref_name(ref), exc)
            return None
        model.shadow = True
        return model


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".tmp")
    with partial.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    partial.replace(path)


class ModelWatcher:
    """Follows the collector's wanted set from a background thread, reconnecting with backoff."""

    def __init__(
        self,
        channel: grpc.Channel,
        agent_id: str,
        catalog: ModelCatalog,
        running: Callable[[], ModelSet],
        offer: Callable[[ModelSet, list[Refusal]], None],
        *,
        metered: set[str] | None = None,
        backoff_max_s: float = 30.0,
    ) -> None:
        self._stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        self._agent_id = agent_id
        self._catalog = catalog
        self._running = running
        self._offer = offer
        self._metered = metered
        self._backoff_max_s = backoff_max_s
        self._stop = threading.Event()
        self._call: grpc.RpcContext | None = None
        self._thread = threading.Thread(target=self._run, name="auris-models", daemon=True)
        self.updates = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        self._thread.join(5)

    def _download(self, ref: model_pb2.ModelRef) -> None:
        manifest: model_pb2.ModelManifest | None = None
        chunks: list[bytes] = []
        request = agent_service_pb2.DownloadModelRequest(model=ref)
        for part in self._stub.DownloadModel(request, timeout=300):
            if manifest is None:
                manifest = part.manifest
            chunks.append(part.chunk)
        if manifest is None or (manifest.model_id, manifest.version) != (ref.model_id, ref.version):
            raise ManifestError(f"{ref_name(ref)}: the collector sent another model or none")
        self._catalog.store(manifest, b"".join(chunks))
        logger.info("downloaded model %s", ref_name(ref))

    def apply(self, wanted: Sequence[model_pb2.ModelRef], shadow: Sequence[model_pb2.ModelRef] = ()) -> None:
        """Fetch what is missing, remember the wanted sets, offer the resulting set for a swap."""
        names = (sorted(ref_name(r) for r in wanted), sorted(ref_name(r) for r in shadow))
        running = self._running()
        if names == (
            sorted(m.ref for m in running.models if not m.shadow),
            sorted(m.ref for m in running.models if m.shadow),
        ):
            # Already running exactly this (a reconnect repeats the set): nothing to load.
            saved = self._catalog.wanted()
            if names != (sorted(ref_name(r) for r in saved[0]), sorted(ref_name(r) for r in saved[1])):
                self._catalog.save_desired(wanted, shadow)
            self._offer(running, [])
            return
        refusals: list[Refusal] = []
        for ref in [*wanted, *shadow]:
            if self._catalog.find(ref) is not None:
                continue
            try:
                self._download(ref)
            except ManifestError as exc:
                refusals.append(Refusal(ref.model_id, ref.version, str(exc).splitlines()[0]))
                logger.error("refusing model %s: %s", ref_name(ref), exc)
        self._catalog.save_desired(wanted, shadow)
        models, refused, _ = self._catalog.compose(self._running(), self._metered)
        failed_downloads = {(r.model_id, r.version) for r in refusals}
        refusals += [r for r in refused if (r.model_id, r.version) not in failed_downloads]
        self.updates += 1
        self._offer(models, refusals)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            installed = [
                model_pb2.ModelRef(model_id=m.manifest.model_id, version=m.manifest.version)
                for m in self._running().models
            ]
            request = agent_service_pb2.WatchModelUpdatesRequest(agent_id=self._agent_id, installed=installed)
            try:
                call = self._stub.WatchModelUpdates(request)
                self._call = call
                for response in call:
                    backoff = 0.5
                    if response.desired_models or self._catalog.desired():
                        self.apply(list(response.desired_models), list(response.shadow_models))
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
                logger.debug("model updates stream ended (%s); retrying in %.1fs", code, backoff)
            except Exception:  # a download or disk error: keep the running models, try again later
                logger.exception("model update failed; keeping the running models")
            self._stop.wait(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self._backoff_max_s)
