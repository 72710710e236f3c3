"""A network namespace joined to this one by a veth pair, for live capture and partition tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def veth_namespace(short: str, host_ip: str, peer_ip: str, need: str) -> Iterator[tuple[str, str, str]]:
    """(namespace, this side's interface, the namespace's interface), addresses /24 and loopback
    up in the namespace; removed afterwards. ``short`` (two letters) keeps names of concurrent
    users apart; the test is skipped, saying ``need``, where the machine cannot make one."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip(f"{need} needs root and iproute2 to make a network namespace")
    tag = str(os.getpid() % 100000)
    ns, here, there = f"auris{short}{tag}", f"a{short}{tag}h", f"a{short}{tag}p"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"this machine forbids network namespaces: {exc.stderr.decode().strip()}")
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"{host_ip}/24", "dev", here)
        _ip("link", "set", here, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{peer_ip}/24", "dev", there)
        _ip("netns", "exec", ns, "ip", "link", "set", there, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, here, there
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
