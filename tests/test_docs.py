"""The generated reference pages (docs/cli.md, docs/api.md) match the parsers and the .proto files:
``docs/generate.py --check`` as a real process, which must also catch a stale page."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from auris.v1 import admin_service_pb2, agent_service_pb2, feed_service_pb2, query_service_pb2
from tests.conftest import REPO

GENERATE = REPO / "docs" / "generate.py"


def _generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATE), *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_the_committed_reference_pages_are_current() -> None:
    done = _generate("--check")
    assert done.returncode == 0, done.stderr  # run `python docs/generate.py` and commit the pages


def test_the_check_catches_a_stale_page(tmp_path: Path) -> None:
    for name in ("cli.md", "api.md"):
        shutil.copy(REPO / "docs" / name, tmp_path / name)
    page = tmp_path / "cli.md"
    page.write_text(page.read_text().replace("--check-config", "--check-konfig", 1))
    done = _generate("--check", "--docs", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip() == "generate: docs/cli.md stale; run python docs/generate.py"


def test_the_pages_cover_every_program_command_and_rpc() -> None:
    cli = (REPO / "docs" / "cli.md").read_text()
    for heading in ("## auris-agent", "## auris-agent enroll", "## auris-collector", "## aurisctl",
                    "## auris-train", "### auris-collector serve", "#### aurisctl alerts list"):  # fmt: skip
        assert f"\n{heading}\n" in cli, heading
    api = (REPO / "docs" / "api.md").read_text()
    for module in (agent_service_pb2, query_service_pb2, admin_service_pb2, feed_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            assert f"\n### {service.name}\n" in api
            for method in service.methods:
                assert f"| `{method.name}` |" in api, method.full_name
        for message in module.DESCRIPTOR.message_types_by_name.values():
            assert f"\n### {message.name}\n" in api, message.full_name
    readme = (REPO / "README.md").read_text()
    assert "docs/cli.md" in readme
    assert "docs/api.md" in readme
