"""``make bench``: the platform measured against its floors, side by side in one run.

Starts its own stack on free ports (embedded PostgreSQL and Redis, the four services, the
gateway) and the bare server, then measures through real gRPC with real JWTs:
- ``latency``: GetSite p50, one client, sequential: asyncpg alone (floor 1), a bare grpc.aio
  server doing the same transaction (floor 2), the sites service for an unlimited tenant and
  for one with a finite rate, the gateway (gRPC, gRPC-web); ListSites(50);
- ``throughput``: GetSite with 32 concurrent clients: bare server, sites, sites with two
  workers (when the checkout has ``SITES_WORKERS``);
- ``isolation``: another tenant's p99 and errors while one floods at 10x and 100x its rate,
  straight to the service and through the gateway;
- ``platform``: token verification, request text, metrics, tracing and usage per call, the
  tenant registry, the feature gate, one decision of the rate limiter;
- ``growth``: GetSite and ListSites p99 on a few tenants' sites process side by side with one
  serving 10,000 more tenants' 1,000,000 sites.
Each figure is printed next to its floor and target (PASS/MISS; a MISS does not fail the
run; a section that breaks is reported, the others still run, and the exit status says so),
and all of them are written as JSON to ``test-output/bench-results.json`` (``--out``).
``--quick`` takes fewer samples and shorter phases (for developing the bench, not for figures);
``--only`` runs some sections; ``--markdown FILE`` prints a written run as the README's table,
``--compare BEFORE AFTER`` two written runs side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from .bench_stack import OUTPUT, BenchStack, bench_stack
from .growth import bench_growth
from .isolation import bench_isolation
from .latency import bench_latency, bench_list_sites
from .platform_rows import bench_platform
from .results import Results, compare, markdown
from .throughput import bench_throughput

SECTIONS = ("latency", "throughput", "isolation", "platform", "growth")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter phases")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=OUTPUT / "bench-results.json", help="where the JSON goes")
    parser.add_argument("--markdown", type=Path, help="only print a written run as the README's tables (targets, all)")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"), help="only compare two runs")
    args = parser.parse_args(argv)
    if args.markdown:
        document = json.loads(args.markdown.read_text())
        print(f"{markdown(document, judged_only=True)}\n\n{markdown(document)}")
        return
    if args.compare:
        print(compare(*(json.loads(path.read_text()) for path in args.compare)))
        return
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    samples = 300 if args.quick else 2000
    seconds = 1.5 if args.quick else 4.0
    grown = (500, 50_000, 100) if args.quick else (10_000, 1_000_000, 2_000)

    def latency(bench: BenchStack, results: Results) -> None:
        bench_latency(bench, results, samples)
        bench_list_sites(bench, results, samples // 2)

    runs: dict[str, Callable[[BenchStack, Results], None]] = {
        "latency": latency,
        "throughput": lambda b, r: bench_throughput(b, r, seconds * 2),
        "isolation": lambda b, r: bench_isolation(b, r, seconds),
        "platform": lambda b, r: bench_platform(b, r, samples // 2),
        # Last: it leaves the registry 10,000 tenants larger. Four series of p99 alternating:
        # the full samples each, so that a p99 is not the few slowest calls of a bad second.
        "growth": lambda b, r: bench_growth(b, r, samples, *grown),
    }
    results = Results()
    failed = []
    with bench_stack() as bench:
        for name in SECTIONS:
            if name in sections:
                try:
                    runs[name](bench, results)
                except Exception:  # the other sections' figures are still worth having
                    traceback.print_exc()
                    failed.append(name)
    results.section("Targets")
    print(results.summary())
    results.write(args.out, "quick" if args.quick else "full", failed)
    print(f"\nfigures written to {args.out}")
    if failed:
        sys.exit(f"sections that failed: {', '.join(failed)} (see the tracebacks above)")


if __name__ == "__main__":
    main()
