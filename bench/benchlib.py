"""What every benchmark here shares: the machine and versions it ran on, percentiles, number
formatting, and process helpers. The scripts run as ``python bench/NAME.py``, so this module sits
on their import path."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "BIN",
    "REPO",
    "Collector",
    "add_figures_argument",
    "command",
    "cpu_s",
    "fmt",
    "loadavg",
    "machine",
    "percentile",
    "say",
    "verdict",
    "versions",
    "write_figures",
]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def command(script: str, module: str) -> list[str]:
    """The installed console script, else ``python -m module``."""
    exe = BIN / script
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", module]


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], q: float) -> float:
    import numpy as np

    if not values:
        return math.nan
    array: npt.NDArray[np.float64] = np.asarray(values, dtype=np.float64)
    return float(np.percentile(array, q))


def fmt(value: float, unit: str = "") -> str:
    if math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def verdict(ok: bool) -> str:
    return "met" if ok else "**NOT MET**"


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return {
        "cores": f"{os.cpu_count()} logical ({len(os.sched_getaffinity(0))} usable by this process)",
        "CPU": cpu,
        "memory": mem,
        "kernel": platform.release(),
    }


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def versions(dists: Sequence[str], **extra: str) -> dict[str, str]:
    """Python, ``extra`` (name: version), each distribution's version, and the git commit."""
    out = {"python": platform.python_version(), **extra}
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        out["git"] = head + (" with uncommitted changes to tracked files" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        out["git"] = "unknown"
    return out


def add_figures_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--figures", type=Path, metavar="JSON",
        help="also write the summary rows (what, baseline, ours, ratio, target) as JSON, for bench/run.py",
    )  # fmt: skip


def write_figures(path: Path | None, bench: str, rows: Sequence[Sequence[str]]) -> None:
    """The rows of a benchmark's summary table, each [what, baseline, ours, ratio, target], for
    ``bench/run.py``'s single table (nothing when ``path`` is None)."""
    if path is None:
        return
    if any(len(row) != 5 for row in rows):
        raise ValueError("every summary row has 5 cells: what, baseline, ours, ratio, target")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    payload = {"bench": bench, "written": written, "rows": [list(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")


class Collector:
    """A real ``auris-collector serve`` on a free loopback port, on database ``db`` (default
    ``workdir/collector.db``), with the TOML ``config`` file when given: plaintext, or TLS as the
    config says when ``insecure`` is False."""

    def __init__(
        self,
        workdir: Path,
        db: Path | None = None,
        name: str = "collector",
        config: Path | None = None,
        *,
        insecure: bool = True,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.db = db or workdir / "collector.db"
        self.log_path = workdir / f"{name}.log"
        self.log = self.log_path.open("wb")
        address_file = workdir / f"{name}.address"
        address_file.unlink(missing_ok=True)
        cmd = [*command("auris-collector", "auris.collector.cli"), "serve"]
        if config is not None:
            cmd += ["--config", str(config)]
        cmd += ["--listen", "127.0.0.1:0", *(["--insecure"] if insecure else []), "--db", str(self.db),
                "--address-file", str(address_file), "--log-level", "warning"]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while not (address_file.is_file() and address_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"collector did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        self.address = address_file.read_text().strip()

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid) or 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
