"""The forkserver that starts nfstream's meter processes, importable before anything heavy.

Meters are forked from a server process rather than from the agent (whose gRPC threads may
hold locks at fork time). The server imports what meters need once (``PRELOAD``: nfstream and
the agent's metering modules; not gRPC, onnxruntime or numpy) and every meter inherits it.
``start`` launches it at once: ``auris-agent`` does so before its own imports, so that the
server's imports run beside the agent's instead of after them.
"""

from __future__ import annotations

import multiprocessing.forkserver as forkserver
import signal

__all__ = ["FLUSH_SIGNAL", "PRELOAD", "preload", "start"]

# lean first: the server imports nfstream as the agent does (multiprocessing would swallow the
# ImportError of a venv without pandas, and every meter process would die of it).
PRELOAD = ("auris.agent.lean", "nfstream.meter", "auris.agent.live", "auris.agent.meter")
# What the agent sends a live meter to make it expire its flows and finish (auris.agent.live).
FLUSH_SIGNAL = signal.SIGUSR1


def preload(*modules: str) -> None:
    """Also import ``modules`` in the server (before it starts: a running server keeps its own).

    multiprocessing re-runs the main script in every child it starts this way; when that
    script imports a heavy module, preloading it spares each meter the import.
    """
    forkserver.set_forkserver_preload([PRELOAD[0], *modules, *PRELOAD[1:]])


def start(*modules: str) -> None:
    """Start the server now (a no-op once it runs); ``modules``: preload these too (none given:
    what ``preload`` last set)."""
    # Ignored signals survive fork and exec: a meter that gets its flush request before it has
    # installed its handler ignores it (the agent repeats it) instead of dying of it.
    signal.signal(FLUSH_SIGNAL, signal.SIG_IGN)
    if modules:
        preload(*modules)
    forkserver.ensure_running()


preload()
