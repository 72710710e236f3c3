"""``auris-collector``: the gRPC server that stores verdicts and answers queries.

Exit codes: 0 stopped cleanly, 2 bad configuration or usage, 3 cannot start
(address in use, database unusable).

Signals: SIGTERM or SIGINT stop it gracefully; SIGHUP reloads the configuration file, taking up
what can change while serving (server.RELOADABLE: alert rules and sinks, SIEM sinks, the log
level) or, when the new file is refused, keeping the running configuration. Under systemd
(``Type=notify``) it reports READY=1, RELOADING=1, STOPPING=1 and, with ``WatchdogSec=``,
WATCHDOG=1 from its event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from auris.agent import __version__, sd_notify
from auris.agent.config import ConfigError
from auris.agent.logs import configure_logging
from auris.collector.config import CollectorConfig, load_collector_config

if TYPE_CHECKING:
    from auris.collector.server import Collector

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG, EXIT_START = 0, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="auris-collector",
        description="Receive verdicts from agents, store them, and answer queries over gRPC.",
        epilog="Exit codes: 0 ok, 2 configuration, 3 cannot start.",
    )
    p.add_argument("--version", action="version", version=f"auris-collector {__version__}")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the gRPC server until SIGTERM/SIGINT")
    # Also accepted after the command: `auris-collector serve --config FILE`.
    serve.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="TOML configuration file")
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (port 0: any free port)")
    serve.add_argument("--db", metavar="FILE", help="SQLite database file")
    serve.add_argument(
        "--insecure",
        action="store_const",
        const=True,
        help="plaintext gRPC on a loopback address (local development only)",
    )
    serve.add_argument("--address-file", metavar="FILE", help="write the bound host:port here once serving")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


async def _reload(collector: Collector, load: Callable[[], CollectorConfig]) -> None:
    """One SIGHUP: the new file's reloadable settings, or one line saying why it was refused."""
    try:
        now, later = await collector.reload(load())
    except (ConfigError, OSError, ValueError) as exc:
        logger.error("reload refused, keeping the running configuration: %s", exc)
        return
    if later:
        logger.warning("reload: %s changed; these take effect at the next restart", ", ".join(later))
    logger.info("reloaded: %s", "; ".join(now) if now else "no reloadable setting changed")


async def _reload_on_request(
    collector: Collector, requested: asyncio.Event, load: Callable[[], CollectorConfig]
) -> None:
    while True:
        await requested.wait()
        requested.clear()
        sd_notify.reloading()
        try:
            await _reload(collector, load)
        except Exception:  # a bug must not end reloading for good (this task would die quietly)
            logger.exception("reload failed part way; restart the collector to be sure of its settings")
        finally:
            sd_notify.notify("READY=1")


async def _watchdog(interval_s: float) -> None:
    """WATCHDOG=1 while the event loop turns (every RPC and every commit goes through it)."""
    while True:
        sd_notify.notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


async def _serve(config: CollectorConfig, load: Callable[[], CollectorConfig]) -> int:
    from auris.collector.server import Collector  # grpc server stack loads only when serving

    # The SQLite writer thread gives up the GIL while each statement runs and then waits for it
    # behind the event loop: up to the switch interval (default 5 ms) every time.
    sys.setswitchinterval(0.0005)
    loop = asyncio.get_running_loop()
    # Before anything slow: SIGHUP's default action would end the process.
    reload_requested = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    try:
        collector = Collector(config)
        await collector.start()
    except (OSError, RuntimeError, ValueError, sqlite3.Error) as exc:  # ValueError: an unusable CA
        logger.error("cannot start: %s", exc)
        return EXIT_START
    if config.insecure:
        logger.warning("INSECURE: plaintext gRPC without client authentication; local development only")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [loop.create_task(_reload_on_request(collector, reload_requested, load))]
    interval = sd_notify.watchdog_interval_s()
    if interval is not None:
        tasks.append(loop.create_task(_watchdog(interval)))
    sd_notify.notify("READY=1", f"STATUS=serving on {collector.address}")
    await stop.wait()
    sd_notify.notify("STOPPING=1")
    logger.info("shutting down")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await collector.stop()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = {
        name: getattr(args, name, None) for name in ("listen", "db", "insecure", "address_file", "log_level")
    }
    try:
        config = load_collector_config(args.config, overrides)
    except ConfigError as exc:
        print(f"auris-collector: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print("auris-collector: configuration ok")
        return EXIT_OK
    if args.command != "serve":
        parser.print_usage(sys.stderr)
        print("auris-collector: a command is required (serve)", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_level, config.log_format)
    return asyncio.run(_serve(config, lambda: load_collector_config(args.config, overrides)))


if __name__ == "__main__":
    sys.exit(main())
