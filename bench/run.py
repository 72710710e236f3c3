"""Every benchmark in one run, and one table of what they measured.

    .venv/bin/python bench/run.py                  # full sizes, into bench/results/
    .venv/bin/python bench/run.py --quick          # small sizes, reports in a temporary folder
    .venv/bin/python bench/run.py --only agent,feeds

Each benchmark runs as a child process and writes its own report (``bench/results/NAME.md``,
with its method and parameters) and its summary rows as JSON. This script prints one table of
those rows (benchmark, what, baseline measured in the same run, ours, ratio, target) and writes
it to ``bench/results/README.md`` with the latest figures of the benchmarks not run this time
(``--only``), each dated (``--quick``: nothing is written, so the committed figures stay the
full-size ones). A benchmark that fails or needs what the machine lacks (root
for the live-capture one) is listed with the reason; the others still run. None of this is a
test: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchlib import REPO, loadavg, machine, say, versions

RESULTS = REPO / "bench" / "results"


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str
    script: str
    quick: tuple[str, ...] = ()
    full: tuple[str, ...] = ()
    needs_root: bool = False


BENCHES = (
    Bench("agent", "agent_bench.py", ("--packets", "200000", "--flows", "10000", "--runs", "1",
                                      "--score-rows", "20000")),
    Bench("collector", "collector_bench.py", ("--quick",)),
    Bench("feeds", "feeds_bench.py", ("--rows", "20000", "--runs", "1", "--latency-records", "1000")),
    Bench("feed-service", "feed_service_bench.py", ("--rows", "20000", "--latency-calls", "500")),
    Bench("live", "live_bench.py", ("--flows", "20000"), needs_root=True),
    Bench("load", "load_bench.py", ("--agents", "10", "--duration-s", "5")),
)  # fmt: skip


@dataclasses.dataclass
class Outcome:
    bench: Bench
    rows: list[list[str]]
    seconds: float | None  # None: figures of an earlier run
    problem: str = ""
    written: str = ""


def run_one(bench: Bench, quick: bool, folder: Path, timeout_s: float) -> Outcome:
    if bench.needs_root and os.geteuid() != 0:
        return Outcome(bench, [], 0.0, "skipped: needs root (network namespaces, live capture)")
    figures = folder / f"{bench.name}.json"
    report = folder / f"{bench.name}.md"
    cmd = [sys.executable, str(REPO / "bench" / bench.script), *(bench.quick if quick else bench.full),
           "--out", str(report), "--figures", str(figures)]  # fmt: skip
    say(f"{bench.name}: {' '.join(cmd[1:])}")
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return Outcome(bench, [], time.monotonic() - started, f"timed out after {timeout_s:.0f} s")
    seconds = time.monotonic() - started
    if done.returncode != 0 or not figures.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Outcome(bench, [], seconds, f"failed (exit {done.returncode}): {last[:200]}")
    return _read(bench, figures, seconds)


def _read(bench: Bench, figures: Path, seconds: float | None) -> Outcome:
    got = json.loads(figures.read_text(encoding="utf-8"))
    return Outcome(bench, got["rows"], seconds, written=got.get("written", ""))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(outcomes: Sequence[Outcome], quick: bool, started: datetime.datetime, folder: Path) -> str:
    lines = [
        "# Benchmarks: the latest figures\n",
        f"Run {started:%Y-%m-%d %H:%M} UTC by `bench/run.py{' --quick' if quick else ''}`. Each benchmark's "
        "own report (method, parameters, more rows) is linked; the baseline is measured in the same run.\n",
        "| benchmark | what | baseline | ours | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        link = f"[{o.bench.name}]({o.bench.name}.md)" if not quick else o.bench.name
        if o.seconds is None:
            link += f" ({o.written})"
        if o.problem:
            lines.append(f"| {link} | {_cell(o.problem)} |  |  |  |  |")
        for row in o.rows:
            lines.append(f"| {link} | " + " | ".join(_cell(c) for c in row) + " |")
    took = ", ".join(f"{o.bench.name} {o.seconds / 60:.1f} min" for o in outcomes if o.seconds is not None)
    lines += [
        "",
        f"Time: {took}. Machine: {'; '.join(f'{k} {v}' for k, v in machine().items())}; load average at "
        f"the end {loadavg()}. Versions: {', '.join(f'{k} {v}' for k, v in versions([]).items())}.",
        "",
    ]
    if quick:
        lines.append(f"Quick sizes: reports in {folder} (not kept).\n")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, reports in a temporary folder")
    p.add_argument(
        "--only", default="", help="comma-separated benchmark names: " + ", ".join(b.name for b in BENCHES)
    )
    p.add_argument("--timeout-s", type=float, default=3600.0, help="give up on one benchmark after this long")
    p.add_argument(
        "--table-only", action="store_true", help="run nothing: rewrite the table from the latest figures"
    )
    args = p.parse_args(argv)
    chosen = [b for b in BENCHES if not args.only or b.name in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {b.name for b in BENCHES}
    if unknown:
        print(f"bench/run.py: unknown benchmark {sorted(unknown)[0]!r}", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="auris-bench-run-") as tmp:
        folder = Path(tmp) if args.quick else RESULTS
        if args.table_only:
            chosen = []
        outcomes = [run_one(b, args.quick, folder, args.timeout_s) for b in chosen]
        if not args.quick:  # the latest figures of the others, with their date
            earlier = [b for b in BENCHES if b not in chosen and (RESULTS / f"{b.name}.json").is_file()]
            outcomes += [_read(b, RESULTS / f"{b.name}.json", None) for b in earlier]
            outcomes.sort(key=lambda o: BENCHES.index(o.bench))
        text = render(outcomes, args.quick, started, folder)
        print(text)
        if not args.quick:
            (RESULTS / "README.md").write_text(text, encoding="utf-8")
            say(f"written to {RESULTS / 'README.md'}")
    return 1 if any(o.problem.startswith(("failed", "timed out")) for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
