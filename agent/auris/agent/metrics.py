"""Prometheus metrics: a tiny ``/metrics`` endpoint in the text exposition format (0.0.4).

No client library: the agent and the collector each hand a ``collect`` function that returns
their figures at scrape time (counters they already keep, a few cheap queries), and this
module renders them. Served from a daemon thread; scrapes never touch the hot paths.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Metric", "MetricsServer", "render"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    value: float
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _escape(value: str, quotes: bool = True) -> str:
    """Backslash and newline escaped; double quotes too in label values (not in HELP text)."""
    value = value.replace("\\", "\\\\").replace("\n", "\\n")
    return value.replace('"', '\\"') if quotes else value


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render(metrics: Iterable[Metric]) -> str:
    """The text format: one HELP and TYPE line per name, then its samples."""
    lines: list[str] = []
    described: set[str] = set()
    for m in sorted(metrics, key=lambda m: m.name):
        if m.name not in described:
            lines += [f"# HELP {m.name} {_escape(m.help, quotes=False)}", f"# TYPE {m.name} {m.kind}"]
            described.add(m.name)
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(m.labels.items()))
        lines.append(f"{m.name}{{{labels}}} {_number(m.value)}" if labels else f"{m.name} {_number(m.value)}")
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serves ``GET /metrics`` on ``host:port`` (port 0: any free port) from a daemon thread."""

    def __init__(self, listen: str, collect: Callable[[], Iterable[Metric]]) -> None:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"metrics_listen: expected host:port, got {listen!r}")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the http.server API
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics here")
                    return
                try:
                    body = render(collect()).encode()
                except Exception as exc:  # a failed collection is a 500, never a dead endpoint
                    logger.exception("metrics collection failed")
                    self.send_error(500, f"metrics collection failed: {exc}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
                return

        self._server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="auris-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
