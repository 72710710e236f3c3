"""``auris-agent``: starts the meters' forkserver, then imports and runs the agent.

The server imports nfstream (~0.3 s) while this process imports gRPC, onnxruntime and the
rest; started after them, the first capture waited for both in turn.
"""

from __future__ import annotations

import sys

from auris.agent import meterserver

__all__ = ["main"]

# Options that never meter anything: no server for them (argparse takes any unambiguous prefix).
_NO_METERING = ("--check-config", "--help", "--version")


def _meters(args: list[str]) -> bool:
    """Whether these arguments may meter a capture (a wrong guess costs only a wasted start)."""
    if args[:1] == ["enroll"] or "-h" in args:
        return False
    return not any(len(a) > 2 and option.startswith(a) for a in args for option in _NO_METERING)


def main() -> int:
    if _meters(sys.argv[1:]):
        meterserver.start()
    from auris.agent.cli import main as run_agent

    return run_agent()


if __name__ == "__main__":
    sys.exit(main())
