"""``auris-agent``: starts the meters' forkserver, then imports and runs the agent.

The server imports nfstream (~0.3 s) while this process imports gRPC, onnxruntime and the
rest; started after them, the first capture waited for both in turn.
"""

from __future__ import annotations

import sys

from auris.agent import meterserver

__all__ = ["main"]

# Arguments that never meter anything: no server for them.
_NO_METERING = {"--check-config", "-h", "--help", "--version"}


def main() -> int:
    args = sys.argv[1:]
    if args[:1] != ["enroll"] and not _NO_METERING.intersection(args):
        meterserver.start()
    from auris.agent.cli import main as run_agent

    return run_agent()


if __name__ == "__main__":
    sys.exit(main())
