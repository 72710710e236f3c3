"""The auris.v1 contract: generated code is current, and the protos follow buf's STANDARD rules."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
from google.protobuf import descriptor

from auris.v1 import (
    admin_service_pb2,
    agent_service_pb2,
    feed_service_pb2,
    flow_pb2,
    model_pb2,
    query_service_pb2,
    verdict_pb2,
)
from tests.conftest import REPO

FILES = [
    m.DESCRIPTOR
    for m in (
        admin_service_pb2,
        agent_service_pb2,
        feed_service_pb2,
        flow_pb2,
        model_pb2,
        query_service_pb2,
        verdict_pb2,
    )
]
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
LOWER_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
PASCAL = re.compile(r"^[A-Z][a-zA-Z0-9]*$")


def test_generated_code_is_current() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_every_proto_file_is_loaded() -> None:
    on_disk = {p.name for p in (REPO / "proto" / "auris" / "v1").glob("*.proto")}
    assert {f.name.rsplit("/", 1)[1] for f in FILES} == on_disk


def _messages(container: descriptor.FileDescriptor | descriptor.Descriptor) -> list[descriptor.Descriptor]:
    found = []
    for message in (
        container.message_types_by_name.values()
        if isinstance(container, descriptor.FileDescriptor)
        else container.nested_types
    ):
        found.append(message)
        found += _messages(message)
    return found


def _prefix(enum_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper() + "_"


def test_standard_rules_checked_by_hand() -> None:
    """The STANDARD rules that apply to this contract, for machines without buf.

    PACKAGE_VERSION_SUFFIX, PACKAGE_DIRECTORY_MATCH, FILE_LOWER_SNAKE_CASE, SERVICE_SUFFIX,
    SERVICE_PASCAL_CASE, RPC_PASCAL_CASE, RPC_REQUEST_STANDARD_NAME, RPC_RESPONSE_STANDARD_NAME,
    RPC_REQUEST_RESPONSE_UNIQUE, MESSAGE_PASCAL_CASE, FIELD_LOWER_SNAKE_CASE, ENUM_PASCAL_CASE,
    ENUM_VALUE_UPPER_SNAKE_CASE, ENUM_VALUE_PREFIX, ENUM_ZERO_VALUE_SUFFIX, ENUM_FIRST_VALUE_ZERO.
    """
    used: Counter[str] = Counter()
    for f in FILES:
        assert f.package == "auris.v1"
        directory, name = f.name.rsplit("/", 1)
        assert directory == "auris/v1"
        assert LOWER_SNAKE.match(name.removesuffix(".proto"))
        for service in f.services_by_name.values():
            assert service.name.endswith("Service")
            assert PASCAL.match(service.name)
            for method in service.methods:
                assert PASCAL.match(method.name)
                assert method.input_type.name == f"{method.name}Request", method.full_name
                assert method.output_type.name == f"{method.name}Response", method.full_name
                used[method.input_type.full_name] += 1
                used[method.output_type.full_name] += 1
        for message in _messages(f):
            assert PASCAL.match(message.name), message.full_name
            for field in message.fields:
                assert LOWER_SNAKE.match(field.name), field.full_name
        enums = list(f.enum_types_by_name.values()) + [e for m in _messages(f) for e in m.enum_types]
        for enum in enums:
            assert PASCAL.match(enum.name)
            assert enum.values[0].number == 0
            assert enum.values[0].name == _prefix(enum.name) + "UNSPECIFIED"
            for value in enum.values:
                assert UPPER_SNAKE.match(value.name), value.name
                assert value.name.startswith(_prefix(enum.name)), value.name
    assert used
    assert max(used.values()) == 1


def _buf() -> str | None:
    return os.environ.get("AURIS_BUF") or shutil.which("buf")


@pytest.mark.skipif(_buf() is None, reason="buf is not installed (make lint-proto installs it from npm)")
def test_buf_lint_standard() -> None:
    buf = _buf()
    assert buf is not None
    done = subprocess.run([buf, "lint"], cwd=REPO / "proto", capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
