"""The noisy neighbour: another tenant's p99 and errors while ``bench_flood`` floods at 10x and 100x its rate.

``bench_flood`` may read 600 calls a minute (10/s); ``flood.py``, a process of its own, sends
it ListSites open loop at 100 and at 1,000 calls/s, then from 32 clients as fast as answered
(closed loop, the issue's harshest row). Meanwhile this process calls GetSite as
``bench_quiet``, one call at a time, as it did just before for as long without the flood. Straight to the
sites service, then through the gateway (each tenant on its own host). Per flood: the quiet
tenant's p99 against its quiet p99 (target <= 1.5x), its errors (target 0), the flooder's
answers by status, and how many of its calls reached the sites service (its
``towerco_tenant_calls_total``, any outcome): near its rate when the gateway refuses the rest.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable

from .bench_stack import FLOOD_RPM_READ, BenchStack
from .latency import GET, site_stub, tenant_host
from .own_processes import start, stop
from .results import Figure, Results, at_most, ratio_at_least, ratio_at_most
from .timing import for_seconds, ms, percentile, sample

#: Each flood: its name, and the generator's rate (open loop) or clients (closed loop).
FLOODS: tuple[tuple[str, dict[str, float]], ...] = (
    *((f"{m}x ({FLOOD_RPM_READ / 60 * m:g}/s)", {"rate": FLOOD_RPM_READ / 60 * m}) for m in (10, 100)),
    ("32 clients, closed loop", {"clients": 32}),
)
#: The flood runs this long before the quiet tenant's calls are measured.
WARMUP = 0.5
#: The generator's lower CPU priority: the flooder's client is not the platform's (flood.py).
FLOOD_NICE = 19
#: An open-loop flood counts only if the generator sent at least this share of its rate.
MIN_SENT_SHARE = 0.9
_FLOODER_CALLS = re.compile(r'^towerco_tenant_calls_total\{[^}]*tenant="bench_flood"[^}]*\} (\S+)$', re.M)


def _reached_sites(bench: BenchStack) -> float | None:
    """The flooder's calls the sites service has counted (any outcome), from its /metrics; None if unreadable."""
    url = f"http://127.0.0.1:{bench.stack.config.metrics_ports['sites']}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    return sum(float(value) for value in _FLOODER_CALLS.findall(text))


def _flood(
    bench: BenchStack, path: str, load: dict[str, float], seconds: float, measure: Callable[[], object]
) -> tuple[list[float], dict[str, int], dict[str, object]]:
    """Run the flood; measure the quiet tenant during it; the flooder's report."""
    config = {
        "target": bench.gateway if path == "gateway" else bench.sites,
        "authority": tenant_host("bench_flood") if path == "gateway" else "",
        "token": bench.tokens["bench_flood"],
        **load,
        "seconds": WARMUP + seconds + 0.2,
        "nice": FLOOD_NICE,
    }
    flooder = start("flood", config, bench.log("flood"))
    try:
        time.sleep(WARMUP)
        samples, errors = for_seconds(measure, seconds)
        assert flooder.stdout is not None
        report: dict[str, object] = json.loads(flooder.stdout.readline() or "{}")
    finally:
        stop(flooder, timeout=15)
    return samples, errors, report


def bench_isolation(bench: BenchStack, results: Results, seconds: float) -> None:
    md = bench.metadata("bench_quiet")
    for path in ("direct", "gateway"):
        results.section(
            f"Isolation, {path}: bench_quiet's sequential GetSite, {seconds:g} s quiet then {seconds:g} s flooded"
        )
        target = bench.gateway if path == "gateway" else bench.sites
        authority = tenant_host("bench_quiet") if path == "gateway" else ""
        with site_stub(target, authority) as quiet:
            call = lambda: quiet.GetSite(GET, metadata=md, timeout=5)  # noqa: E731
            sample(call, 0)
            for flood, load in FLOODS:
                name = f"{path}: flood {flood}"
                # The quiet p99 just before each flood: the machine's load of the same minute.
                calm, calm_errors = for_seconds(call, seconds)
                note = f"n={len(calm)}, errors {sum(calm_errors.values())}"
                results.add(Figure(f"{name}: other tenant p50 quiet", ms(percentile(calm, 0.5)), "ms"))
                results.add(Figure(f"{name}: other tenant p99 quiet", ms(percentile(calm, 0.99)), "ms", note=note))
                before = _reached_sites(bench)
                samples, errors, report = _flood(bench, path, load, seconds, call)
                after = _reached_sites(bench)
                _report(results, name, calm, samples, errors, report, before, after)


def _report(
    results: Results,
    name: str,
    calm: list[float],
    samples: list[float],
    errors: dict[str, int],
    report: dict[str, object],
    before: float | None,
    after: float | None,
) -> None:
    # The p50 too: a flood that slows every call a little shows there before the p99 moves.
    p50, calm_p50 = ms(percentile(samples, 0.5)), ms(percentile(calm, 0.5))
    results.add(Figure(f"{name}: other tenant p50", p50, "ms", calm_p50, "quiet"))
    p99, calm_p99 = ms(percentile(samples, 0.99)), ms(percentile(calm, 0.99))
    results.add(
        Figure(f"{name}: other tenant p99", p99, "ms", calm_p99, "quiet", ratio_at_most(1.5), f"n={len(samples)}")
    )
    error_note = ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
    results.add(
        Figure(f"{name}: other tenant errors", sum(errors.values()), "calls", target=at_most(0), note=error_note)
    )
    codes = report.get("codes", {})
    assert isinstance(codes, dict)
    admitted = int(codes.get("OK", 0))
    refused = sum(int(v) for k, v in codes.items() if k.startswith("RESOURCE_EXHAUSTED"))
    # Which refusals (by reason) and any other failure.
    other = "; ".join(f"{k} {v}" for k, v in sorted(codes.items()) if k != "OK")
    send_seconds = float(str(report.get("send_seconds", 0))) or 1.0
    sent = float(str(report.get("sent", 0)))
    results.add(Figure(f"{name}: flooder admitted", admitted, "calls"))
    results.add(Figure(f"{name}: flooder refused", refused, "calls", note=other or ""))
    # An open-loop flood is judged only at the rate it was meant to be: the generator must keep up.
    rate = float(str(report.get("rate") or 0))
    note = f"skipped {report.get('skipped', 0)}, nice {report.get('niceness', 0)}"
    if rate:
        results.add(
            Figure(
                f"{name}: flooder sent",
                sent / send_seconds,
                "calls/s",
                rate,
                "its rate",
                ratio_at_least(MIN_SENT_SHARE),
                note,
            )
        )
    else:
        results.add(Figure(f"{name}: flooder sent", sent / send_seconds, "calls/s", note=note))
    cpu = float(str(report.get("cpu_seconds", 0)))
    results.add(Figure(f"{name}: flooder's own CPU", cpu / send_seconds, "cores", note=f"{cpu:.2f} s CPU"))
    if before is not None and after is not None:
        results.add(Figure(f"{name}: flooder calls reaching sites", after - before, "calls"))
