"""The model registry on a real collector: models imported from a folder at start, listed and shown
over gRPC and through aurisctl; bad manifests refused one by one while the rest come in."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import grpc
import pytest

from auris.agent.manifest import ManifestError, dump_manifest, read_manifest
from auris.agent.signing import key_id
from auris.collector import ctl
from auris.collector.client import CollectorClient
from auris.collector.registry import ModelRegistry
from auris.collector.store import VerdictStore
from auris.v1 import admin_service_pb2, model_pb2
from tests.conftest import MODELS, TEST_SIGNING_KEY, TEST_TRUST, running_collector, write_test_key

PRODUCTION = admin_service_pb2.MODEL_STAGE_PRODUCTION
CANDIDATE = admin_service_pb2.MODEL_STAGE_CANDIDATE


def _models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    for path in MODELS.glob("nfstream-*.*"):
        shutil.copy(path, folder)
    # A second version of the classifier (same bytes, new version, unsigned): a candidate, which
    # the collector signs with its own key.
    manifest = read_manifest(folder / "nfstream-rf.manifest.json")
    manifest.version = "2099.1"
    manifest.ClearField("signature")
    manifest.ClearField("signing_key_id")
    (folder / "nfstream-rf-next.manifest.json").write_text(dump_manifest(manifest))
    # Three bad ones: not JSON; an ONNX file whose bytes differ from the manifest's sha256; a
    # signature that does not verify (the version was changed after signing).
    (folder / "broken.manifest.json").write_text("{ not json")
    manifest.version = "2099.2"
    manifest.onnx_file = "tampered.onnx"
    (folder / "tampered.manifest.json").write_text(dump_manifest(manifest))
    (folder / "tampered.onnx").write_bytes(b"\x00" * 64)
    forged = read_manifest(folder / "nfstream-rf.manifest.json")
    forged.version = "2099.3"
    (folder / "forged.manifest.json").write_text(dump_manifest(forged))
    return folder


def test_models_are_imported_listed_and_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _models_dir(tmp_path)
    key = write_test_key(tmp_path / "models.key")
    with (
        caplog.at_level(logging.INFO, logger="auris.collector.server"),
        running_collector(
            tmp_path / "auris.db", models_dir=str(folder), signing_key_file=str(key)
        ) as running,
        CollectorClient(running.address, insecure=True) as client,
    ):
        models = {(m.manifest.model_id, m.manifest.version): m.stage for m in client.models()}
        rf_version = read_manifest(MODELS / "nfstream-rf.manifest.json").version
        assert models == {
            (
                "nfstream-ae",
                read_manifest(MODELS / "nfstream-ae.manifest.json").version,
            ): PRODUCTION,
            ("nfstream-rf", rf_version): PRODUCTION,
            ("nfstream-rf", "2099.1"): CANDIDATE,
        }
        refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model refused")]
        assert len(refusals) == 3
        assert any("broken.manifest.json: not a valid manifest" in r for r in refusals)
        assert any("tampered.manifest.json" in r and "refusing a modified model" in r for r in refusals)
        assert any("forged.manifest.json" in r and "does not verify" in r for r in refusals)
        assert "3 registered, 0 already known, 3 refused" in caplog.text
        signed_here = client.model("nfstream-rf", "2099.1").manifest
        assert signed_here.signing_key_id == key_id(TEST_SIGNING_KEY.public_key())
        TEST_TRUST.verify(signed_here, "test")
        # The shipped models keep the release signature.
        assert (
            client.model("nfstream-rf").manifest.signing_key_id
            == read_manifest(MODELS / "nfstream-rf.manifest.json").signing_key_id
        )

        assert client.models(model_pb2.MODEL_DOMAIN_TICK) == []
        production = client.model("nfstream-rf")
        assert (production.manifest.version, production.stage) == (rf_version, PRODUCTION)
        assert production.manifest.evaluation.per_class  # the manifest travels whole
        with pytest.raises(grpc.RpcError) as caught:
            client.model("nope")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        out = io.StringIO()
        assert ctl.main(["--collector", running.address, "--insecure", "models", "list"], out) == 0
        lines = out.getvalue().splitlines()
        assert lines[0].split()[:3] == ["MODEL", "STAGE", "KIND"]
        assert any(line.split()[:2] == ["nfstream-rf@2099.1", "candidate"] for line in lines)
        out = io.StringIO()
        assert (
            ctl.main(
                ["--collector", running.address, "--insecure", "models", "show", "nfstream-rf@2099.1"], out
            )
            == 0
        )
        assert "candidate" in out.getvalue()
        assert "macro F1" in out.getvalue()
        out = io.StringIO()
        args = ["--collector", running.address, "--insecure", "models", "show", "nfstream-ae", "--json"]
        assert ctl.main(args, out) == 0
        assert json.loads(out.getvalue())["manifest"]["kind"] == "MODEL_KIND_AUTOENCODER"

    # A restart with the same folder registers nothing twice.
    with caplog.at_level(logging.INFO, logger="auris.collector.server"):
        caplog.clear()
        with running_collector(tmp_path / "auris.db", models_dir=str(folder), signing_key_file=str(key)):
            pass
        assert "0 registered, 3 already known, 3 refused" in caplog.text


def test_a_version_is_immutable_and_must_be_signed(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path / "auris.db")
    manifest = read_manifest(MODELS / "nfstream-rf.manifest.json")
    onnx = (MODELS / "nfstream-rf.onnx").read_bytes()
    unsigned = ModelRegistry(store)  # no signing key: only signed models come in
    assert unsigned.register(manifest, onnx) is True
    assert unsigned.register(manifest, onnx) is False  # the same bytes again: nothing to do
    other = bytearray(onnx)
    other[-1] ^= 1
    manifest.onnx_sha256 = hashlib.sha256(other).hexdigest()
    manifest.ClearField("signature")
    with pytest.raises(ManifestError, match="is not signed"):
        unsigned.register(manifest, bytes(other))
    with pytest.raises(ManifestError, match="refusing a modified model"):
        unsigned.register(manifest, onnx)  # bytes that are not the ones the manifest names
    signing = ModelRegistry(store, signing_key=TEST_SIGNING_KEY)
    with pytest.raises(ManifestError, match="already registered with other bytes"):
        signing.register(manifest, bytes(other))
    assert [m.stage for m in signing.models()] == [PRODUCTION]
    store.close()


def test_aurisctl_signs_imports_promotes_diffs_rolls_back_and_retires(tmp_path: Path) -> None:
    folder = tmp_path / "next"
    folder.mkdir()
    shutil.copy(MODELS / "nfstream-rf.onnx", folder)
    manifest = read_manifest(MODELS / "nfstream-rf.manifest.json")
    manifest.version = "2"
    manifest.threshold.value = 0.3
    (folder / "nfstream-rf.manifest.json").write_text(dump_manifest(manifest))  # signature now stale
    key = write_test_key(tmp_path / "release.key")

    def ctl_ok(*args: str) -> str:
        out = io.StringIO()
        assert ctl.main(list(args), out) == 0, out.getvalue()
        return out.getvalue()

    # Offline signing (a release step): the manifest is checked against its ONNX file first.
    assert "signed nfstream-rf@2" in ctl_ok(
        "models", "sign", "--key", str(key), str(folder / "nfstream-rf.manifest.json")
    )
    TEST_TRUST.verify(read_manifest(folder / "nfstream-rf.manifest.json"), "test")
    assert (
        ctl.main(
            ["models", "sign", "--key", str(tmp_path / "nope.key"), str(folder / "x.json")], io.StringIO()
        )
        == 2
    )

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in MODELS.glob("nfstream-rf.*"):
        shutil.copy(path, shipped)
    with running_collector(
        tmp_path / "auris.db", models_dir=str(shipped), model_keys=(str(key.with_suffix(".pub")),)
    ) as running:
        base = ["--collector", running.address, "--insecure", "models"]
        assert "registered nfstream-rf@2 (candidate" in ctl_ok(*base, "import", str(folder))
        diff = ctl_ok(*base, "diff", "nfstream-rf", "nfstream-rf@2").splitlines()
        assert any(line.split()[:1] == ["threshold"] and line.rstrip().endswith("*") for line in diff)
        assert any(line.split()[:2] == ["macro", "F1"] and not line.rstrip().endswith("*") for line in diff)
        assert "nfstream-rf@2 is now production" in ctl_ok(*base, "promote", "nfstream-rf@2")
        assert "nfstream-rf@1 is now production" in ctl_ok(*base, "rollback", "nfstream-rf")
        # Nothing earlier than the first version: a clear refusal, exit 5 (the RPC failed).
        err = io.StringIO()
        assert ctl.main([*base, "rollback", "nfstream-rf"], err) != 0
        assert "nfstream-rf@2 is now retired" in ctl_ok(*base, "retire", "nfstream-rf@2")
        assert ctl.main([*base, "promote", "nfstream-rf@2"], io.StringIO()) != 0  # retired is for good
        listed = ctl_ok(*base, "list")
        assert "0/0 online agents" in listed


def test_aurisctl_trains_a_zoo_model_on_a_table_and_the_collector_signs_it(tmp_path: Path) -> None:
    sample = Path(__file__).parent / "data" / "network" / "cicids2017-sample.csv.gz"
    key = write_test_key(tmp_path / "models.key")
    with running_collector(tmp_path / "auris.db", signing_key_file=str(key)) as running:
        base = ["--collector", running.address, "--insecure", "models", "train", "--data", str(sample)]
        out = io.StringIO()
        assert ctl.main([*base, "--kind", "kmeans", "--label", "Label", "--model-id", "zoo-km"], out) == 0
        assert "registered zoo-km@1 (production, signed by " in out.getvalue()
        with CollectorClient(running.address, insecure=True) as client:
            model = client.model("zoo-km")
            TEST_TRUST.verify(model.manifest, "test")
            assert model.manifest.evaluation.baseline_name
        # A supervised kind without a label column: one line, exit 2, nothing registered.
        assert ctl.main([*base, "--kind", "random-forest", "--model-id", "zoo-rf"], io.StringIO()) == 2
