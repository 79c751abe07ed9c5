"""Floods at the gateway: a tenant over its rate is turned away by Envoy's penalty box.

The sites service refuses a tenant over its ``rpm_read`` with RATE_LIMITED and the exact wait;
until that wait is over the gateway answers the tenant's read calls itself, with the same
reply. Calls go to the session's real Envoy, services, PostgreSQL and Redis; what reached
the service is read from its own ``/metrics``.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from towerco.sites.v1 import sites_service_pb2 as sites_pb
from towerco.sites.v1 import sites_service_pb2_grpc as sites_grpc
from towerco.tenant.v1 import tenant_registry_service_pb2 as tenant_pb
from towerco.tenant.v1 import tenant_registry_service_pb2_grpc as tenant_grpc

from deploy.local.stack import Stack
from gateway.config import FAULT_DELAY_HEADER, GATEWAY_REFUSAL_HOLD_MAX_HELD, HELD_REFUSAL_HEADERS, GatewaySettings
from services.runtime.audit import GATEWAY_HEADER
from services.runtime.interceptors.rate_limit import RATE_SLOT_HEADER, SLOT_WAIT_MOST_SECONDS
from services.runtime.settings import gateway_secret

from .grpcweb import Reply, call
from .support import RichError, bearer, free_port, rich_error
from .support.requests import set_limit
from .test_metrics import scrape, values

pytestmark = pytest.mark.stack

LIST_SITES = "/towerco.sites.v1.SiteService/ListSites"
#: One read every 2 s, a burst of 5 (services/runtime/ratelimit.py): every wait is at most 2 s.
PER_MINUTE = 30
FLOOD = 300


def handled(stack: Stack, tenant: str) -> float:
    """Calls of ``tenant`` the sites service itself answered, whatever their outcome."""
    return sum(values(scrape(stack, "sites"), "towerco_tenant_calls_total", tenant=tenant, service="sites").values())


def channel_for(settings: GatewaySettings, tenant: str) -> grpc.Channel:
    """A native gRPC channel to the gateway, on ``tenant``'s host."""
    return grpc.insecure_channel(
        f"127.0.0.1:{settings.port}", options=[("grpc.default_authority", f"{tenant}.localhost")]
    )


def list_sites(stub: Any, token: str) -> RichError | None:
    """ListSites; its rich error, or None when it succeeded."""
    return answer(stub, bearer(token))


def answer(stub: Any, metadata: Any) -> RichError | None:
    """ListSites with ``metadata``; its rich error, or None when it succeeded."""
    try:
        stub.ListSites(sites_pb.ListSitesRequest(page_size=1), metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        return rich_error(error)
    return None


def trailers(error: Any) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())


def assert_rate_limited(error: RichError | None, trailers: dict[str, str]) -> int:
    """The full RATE_LIMITED reply (catalogued by rich_error); its wait in milliseconds."""
    assert error is not None
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"), error
    assert error.info is not None and dict(error.info.metadata) == {"limit": "rpm_read", "per_minute": str(PER_MINUTE)}
    assert error.retry is not None
    delay = int(error.retry.retry_delay.ToMilliseconds())
    assert 0 < delay <= 60_000 // PER_MINUTE, error
    assert 0 < int(trailers["retry-after-ms"]) <= 60_000 // PER_MINUTE
    assert "retry in" in error.message, error.message
    return delay


def assert_web_rate_limited(reply: Reply) -> None:
    assert reply.http_status == 200 and reply.status == 8, (reply.status, reply.message)
    assert reply.info is not None and reply.info.reason == "RATE_LIMITED"
    assert dict(reply.info.metadata) == {"limit": "rpm_read", "per_minute": str(PER_MINUTE)}
    assert reply.retry is not None and 0 < reply.retry.retry_delay.ToMilliseconds() <= 60_000 // PER_MINUTE
    wait = reply.trailers.get("retry-after-ms", reply.headers.get("retry-after-ms", "0"))
    assert 0 < int(wait) <= 60_000 // PER_MINUTE


@pytest.fixture
def flooder(gateway, new_tenant, features, platform_token) -> str:
    """A tenant allowed PER_MINUTE reads."""
    tenant: str = new_tenant("fl", plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", PER_MINUTE)
    return tenant


def test_a_flooding_tenant_is_turned_away_at_the_gateway_and_others_are_unaffected(
    stack, gateway, flooder, new_tenant, token, eventually
):
    bystander = new_tenant("by", plan="basic")
    flooder_token, bystander_token = token(flooder), token(bystander)
    refusals: list[RichError] = []
    last_wait = 0
    with channel_for(gateway, flooder) as flooding, channel_for(gateway, bystander) as quiet:
        stub, other = sites_grpc.SiteServiceStub(flooding), sites_grpc.SiteServiceStub(quiet)
        for n in range(FLOOD):
            try:
                stub.ListSites(sites_pb.ListSitesRequest(page_size=1), metadata=bearer(flooder_token), timeout=10)
            except grpc.RpcError as exc:
                error = rich_error(exc)
                last_wait = assert_rate_limited(error, trailers(exc))
                refusals.append(error)
            if n % 10 == 0:
                assert list_sites(other, bystander_token) is None, "another tenant's calls all pass"
        # A public call needs no token and is never held.
        branding = tenant_grpc.TenantRegistryServiceStub(flooding).GetBranding(
            tenant_pb.GetBrandingRequest(tenant_id=flooder), timeout=10
        )
        assert branding is not None

        admitted = FLOOD - len(refusals)
        assert refusals and admitted >= 1
        # The service answered the admitted calls and only a few refusals, not the whole flood.
        reached = eventually(lambda: _at_least(handled(stack, flooder), admitted), within=5)
        assert reached < FLOOD / 5, f"{reached:.0f} of {FLOOD} calls reached the sites service"

        # After the wait it was given, the tenant is admitted again. The loop's last call may
        # have been admitted at the slot its last refusal named (a held refusal is answered
        # when a retry could succeed), so the wait that stands now is asked for first.
        now = list_sites(stub, flooder_token)
        if now is not None:
            assert now.retry is not None, now
            last_wait = now.retry.retry_delay.ToMilliseconds()
            time.sleep(last_wait / 1000 + 0.05)
            assert list_sites(stub, flooder_token) is None


def test_a_held_tenant_is_told_the_wait_that_remains(gateway, flooder, token):
    flooder_token = token(flooder)
    with channel_for(gateway, flooder) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        first = next(error for _ in range(20) if (error := list_sites(stub, flooder_token)) is not None)
        assert first.retry is not None and first.retry.retry_delay.ToMilliseconds() > 1000, first
        held = list_sites(stub, flooder_token)
        time.sleep(0.5)
        later = list_sites(stub, flooder_token)
    waits = []
    for error in (held, later):
        assert error is not None and error.reason == "RATE_LIMITED" and error.retry is not None, error
        waits.append(error.retry.retry_delay.ToMilliseconds())
        assert f"retry in {waits[-1] / 1000:.3f}s" in error.message, (error.message, waits[-1])
    # Half a second later, half a second less: the same moment to come back, not the same wait.
    assert waits[1] <= waits[0] - 500, waits


def test_grpc_web_clients_get_the_same_refusal_from_the_gateway(stack, gateway, flooder, token, eventually):
    flooder_token = token(flooder)
    host = f"{flooder}.localhost:{gateway.port}"
    replies = [
        call(gateway.port, host, LIST_SITES, sites_pb.ListSitesRequest(page_size=1), token=flooder_token)
        for _ in range(60)
    ]
    refused = [reply for reply in replies if reply.status != 0]
    for reply in refused:
        assert_web_rate_limited(reply)
    admitted = len(replies) - len(refused)
    reached = eventually(lambda: _at_least(handled(stack, flooder), admitted), within=5)
    # Each refusal the service made is one call it handled; the others were the gateway's.
    assert reached < len(replies), f"all {len(replies)} calls reached the sites service"


def test_another_tenants_token_flooding_a_tenants_host_does_not_hold_that_tenant(gateway, flooder, new_tenant, token):
    victim = new_tenant("vi", plan="basic")
    attacker_token, victim_token = token(flooder), token(victim)
    with channel_for(gateway, victim) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        # Each attempt is refused by the service and counted against the attacker's own rate,
        # until that is spent: then the refusals are RATE_LIMITED, on the victim's host.
        reasons = [error.reason if (error := list_sites(stub, attacker_token)) else "OK" for _ in range(40)]
        assert set(reasons) == {"CROSS_TENANT_DENIED", "RATE_LIMITED"}, reasons
        assert reasons[-1] == "RATE_LIMITED"
        for _ in range(5):
            assert list_sites(stub, victim_token) is None, "the victim is not held for the attacker's refusals"


def _at_least(value: float, floor: int) -> float:
    assert value >= floor, (value, floor)
    return value


#: The concurrent flood: callers at once, each sending its next call as soon as the last is answered.
CALLERS = 32
#: A read every 857.14 ms (a slot need not fall on a whole millisecond) and a burst of 11: the
#: flood spans a few intervals, all within the box's pacing.
PACED_PER_MINUTE = 70
PACED_FLOOD_SECONDS = 3.5


def test_a_concurrent_flood_reaches_the_service_about_once_per_interval(
    stack, gateway, new_tenant, features, platform_token, token, eventually
):
    """CALLERS callers at once: every one is let through when the box's wait ends, unless the
    box counts the calls it lets through (one per interval of the rate) rather than waiting
    for refusals to come back. The service sees the admitted calls, the calls already in
    flight when its first refusal came back (at most one per caller), and about one per
    interval; the gateway answers the rest, and the other tenant's calls all succeed."""
    flooder = new_tenant("fc", plan="basic")
    set_limit(features, platform_token, flooder, "rpm_read", PACED_PER_MINUTE)
    bystander = new_tenant("bc", plan="basic")
    flooder_token, bystander_token = token(flooder), token(bystander)
    codes: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + PACED_FLOOD_SECONDS

    def caller(stub: Any) -> None:
        while time.monotonic() < deadline:
            error = list_sites(stub, flooder_token)
            outcome = "OK" if error is None else f"{error.code.name} {error.reason}"
            with lock:
                codes[outcome] = codes.get(outcome, 0) + 1

    bystander_errors: list[RichError] = []
    bystander_calls = 0
    held: RichError | None = None
    held_trailers: dict[str, str] = {}
    with channel_for(gateway, flooder) as flooding, channel_for(gateway, bystander) as quiet:
        stub, other = sites_grpc.SiteServiceStub(flooding), sites_grpc.SiteServiceStub(quiet)
        with ThreadPoolExecutor(CALLERS) as pool:
            callers = [pool.submit(caller, stub) for _ in range(CALLERS)]
            while not all(f.done() for f in callers):
                bystander_calls += 1
                if (error := list_sites(other, bystander_token)) is not None:
                    bystander_errors.append(error)
                time.sleep(0.05)  # well within the basic plan's own rate (1,200 a minute, a burst of 200)
            for f in callers:
                f.result()
        # The box's refusal while pacing: the full reply, the wait in whole milliseconds.
        for _ in range(5):
            try:
                stub.ListSites(sites_pb.ListSitesRequest(page_size=1), metadata=bearer(flooder_token), timeout=10)
            except grpc.RpcError as exc:
                held, held_trailers = rich_error(exc), trailers(exc)
                break
        assert held is not None and held.reason == "RATE_LIMITED" and held.retry is not None, held
        wait = int(held_trailers["retry-after-ms"])
        assert 0 < wait <= -(-60_000 // PACED_PER_MINUTE), wait
        assert held.retry.retry_delay.ToMilliseconds() == wait and f"retry in {wait / 1000:.3f}s" in held.message
    assert bystander_calls > 0 and not bystander_errors, bystander_errors
    admitted = codes.pop("OK", 0)
    refused = codes.pop("RESOURCE_EXHAUSTED RATE_LIMITED", 0)
    # The service's bound on a tenant's calls in flight may refuse a few callers of the burst.
    busy = codes.pop("RESOURCE_EXHAUSTED TENANT_CALLS_LIMIT", 0)
    assert not codes, f"only admissions and RESOURCE_EXHAUSTED: {codes}"
    assert admitted >= 1 and refused > 10 * CALLERS, (admitted, refused, busy)
    reached = eventually(lambda: _at_least(handled(stack, flooder), admitted), within=5)
    # Refused RATE_LIMITED by the service itself: the calls in flight when its first refusal
    # came back, and a few let through that reached Redis just before their slot. Without the
    # pacing, every caller's call reaches the service again at the end of each wait, CALLERS
    # per interval.
    by_service = reached - admitted - busy
    assert by_service <= 2 * CALLERS, f"{reached:.0f} reached the service: {admitted} admitted, {busy} busy"
    sent = admitted + refused + busy
    # Held refusals pace the callers to CALLERS per hold, so the flood is some hundreds of calls,
    # not thousands; still most of them are the gateway's to answer.
    assert reached < sent / 4, f"{reached:.0f} of {sent} calls reached the service"


def test_a_call_let_through_for_its_slot_waits_for_it_at_the_service(
    stack, sites, new_tenant, features, platform_token, token
):
    """The box lets a call through when its slot is due by its own clock, which starts a little
    early; the service waits such a call's short refusal out (only with the gateway's secret)."""
    tenant = new_tenant("sl", plan="basic")
    set_limit(features, platform_token, tenant, "rpm_read", PACED_PER_MINUTE)
    unproved = bearer(token(tenant), **{RATE_SLOT_HEADER: "1"})
    proved = (*unproved, (GATEWAY_HEADER, gateway_secret(stack.keys_dir).decode()))
    # The burst, then refusals: the next slot is up to an interval away.
    waits = []
    for _ in range(200):
        # Without the gateway's secret the header is not believed: refused like any call.
        error = answer(sites, unproved)
        if error is None:
            continue  # a slot (of the burst, or one that came before this call): the next one
        assert error.reason == "RATE_LIMITED" and error.retry is not None, error
        waits.append(error.retry.retry_delay.ToMilliseconds() / 1000)
        if waits[-1] <= SLOT_WAIT_MOST_SECONDS / 2:
            # A moment before the slot, the gateway's call for it waits for it and is admitted.
            assert answer(sites, proved) is None
            return
        time.sleep(waits[-1] - SLOT_WAIT_MOST_SECONDS / 4)
    raise AssertionError(f"no slot was caught a moment before it came: {waits}")


#: The session gateway's longest hold (the setting's default, in ms).
HOLD_MS = GatewaySettings().refusal_hold_max_ms
#: Held refusals: a hold in seconds, and callers of the closed loop (the basic plan's bound on a
#: tenant's calls in flight is 8 per process: the service refuses none of them for that).
HOLD = HOLD_MS / 1000
#: Envoy's timers run on its event loop's clock, read once per loop turn: a hold may end a
#: millisecond or so before the client's clock says it should. An answer without a hold comes in
#: a few milliseconds.
HELD_AT_LEAST = HOLD - 0.01
HELD_CALLERS = 8
HELD_FLOOD_SECONDS = 2.0


def boxed(stub: Any, token: str) -> RichError:
    """Calls until the service refuses one (the tenant's burst is spent): the box holds the tenant
    from then on, for up to 60 s / PER_MINUTE."""
    for _ in range(20):
        if (error := list_sites(stub, token)) is not None:
            assert error.reason == "RATE_LIMITED" and error.retry is not None, error
            return error
    raise AssertionError("the tenant's burst never ran out")


def test_a_closed_loop_flood_is_paced_by_the_gateways_held_refusals(stack, gateway, flooder, token, eventually):
    """Callers that call again the moment they are answered get each refusal after a hold, so
    they send about HELD_CALLERS per hold; answered at once, they sent thousands in the time."""
    flooder_token = token(flooder)
    codes: dict[str, int] = {}
    lock = threading.Lock()
    with channel_for(gateway, flooder) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        boxed(stub, flooder_token)
        before = handled(stack, flooder)
        deadline = time.monotonic() + HELD_FLOOD_SECONDS

        def caller() -> None:
            while time.monotonic() < deadline:
                try:
                    stub.ListSites(sites_pb.ListSitesRequest(page_size=1), metadata=bearer(flooder_token), timeout=10)
                    outcome = "OK"
                except grpc.RpcError as exc:
                    error = rich_error(exc)
                    assert_rate_limited(error, trailers(exc))
                    outcome = f"{error.code.name} {error.reason}"
                with lock:
                    codes[outcome] = codes.get(outcome, 0) + 1

        with ThreadPoolExecutor(HELD_CALLERS) as pool:
            for f in [pool.submit(caller) for _ in range(HELD_CALLERS)]:
                f.result()
    answers = sum(codes.values())
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED RATE_LIMITED"}, codes
    # Each caller waits a hold for each refusal: about HELD_CALLERS * seconds / hold answers
    # (80), a few more for the last waits shorter than a hold and for the calls admitted.
    expected = HELD_CALLERS * HELD_FLOOD_SECONDS / HOLD
    assert codes.get("RESOURCE_EXHAUSTED RATE_LIMITED", 0) >= expected / 4, codes
    assert answers <= 2 * expected, f"{answers} answers in {HELD_FLOOD_SECONDS} s: refusals were not held"
    # What reached the service: near its rate (a call every 2 s), and a caller's call now and then.
    admitted = codes.get("OK", 0)
    reached = eventually(lambda: _at_least(handled(stack, flooder) - before, admitted), within=5)
    assert reached <= admitted + 2 * HELD_CALLERS, (reached, codes)


def test_a_held_refusal_comes_no_sooner_than_its_hold_to_grpc_and_grpc_web(gateway, flooder, token):
    flooder_token = token(flooder)
    host = f"{flooder}.localhost:{gateway.port}"
    with channel_for(gateway, flooder) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        first = boxed(stub, flooder_token)
        assert first.retry is not None
        given = first.retry.retry_delay.ToMilliseconds()
        assert given > 4 * HOLD_MS, first  # every box refusal below is held a whole hold
        started = time.monotonic()
        try:
            stub.ListSites(sites_pb.ListSitesRequest(page_size=1), metadata=bearer(flooder_token), timeout=10)
        except grpc.RpcError as exc:
            held, held_trailers = rich_error(exc), trailers(exc)
        else:
            raise AssertionError("a held tenant's call was admitted")
        took = time.monotonic() - started
        wait = assert_rate_limited(held, held_trailers)
        assert took >= HELD_AT_LEAST, f"answered after {took * 1000:.0f} ms"
        # The wait that remains after the hold, in RetryInfo, retry-after-ms and the message.
        assert wait <= given - HOLD_MS and int(held_trailers["retry-after-ms"]) == wait
        assert f"retry in {wait / 1000:.3f}s" in held.message, (held.message, wait)

        # A call whose deadline is shorter than the hold gets its refusal before the deadline,
        # not DEADLINE_EXCEEDED.
        try:
            stub.ListSites(sites_pb.ListSitesRequest(page_size=1), metadata=bearer(flooder_token), timeout=HOLD / 2)
        except grpc.RpcError as exc:
            short = rich_error(exc)
        else:
            raise AssertionError("a held tenant's call was admitted")
        assert (short.code, short.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"), short

    # gRPC-web, from a browser on the tenant's origin: held alike, the same reply, readable by the page.
    # Each such call is a connection of its own, and the box is per Envoy worker: one landing on a
    # worker that has not boxed the tenant yet is refused by the service at once (services answer
    # their refusals at once by default) and teaches that worker, so the next one there is held.
    origin = f"http://{host}"
    timings = []
    for _ in range(3):
        started = time.monotonic()
        reply = call(
            gateway.port,
            host,
            LIST_SITES,
            sites_pb.ListSitesRequest(page_size=1),
            token=flooder_token,
            headers={"Origin": origin},
        )
        timings.append(time.monotonic() - started)
        assert_web_rate_limited(reply)
        if timings[-1] >= HELD_AT_LEAST:
            break
    assert timings[-1] >= HELD_AT_LEAST, f"answered after {[round(t * 1000) for t in timings]} ms"
    assert reply.headers.get("access-control-allow-origin") == origin, reply.headers
    assert "retry-after-ms" in reply.headers.get("access-control-expose-headers", ""), reply.headers


def test_a_client_cannot_ask_the_gateway_to_delay_or_refuse_its_call(gateway, new_tenant, token):
    """The hold route's headers and Envoy's fault headers from a client are removed on arrival:
    a normal call with them is answered at once, by the service."""
    tenant = new_tenant("nf", plan="basic")
    forged = {
        FAULT_DELAY_HEADER: "3000",
        "x-envoy-fault-abort-request": "503",
        "x-envoy-fault-abort-grpc-request": "8",
        **{name: "forged" for name in HELD_REFUSAL_HEADERS.values()},
    }
    with channel_for(gateway, tenant) as channel:
        stub = sites_grpc.SiteServiceStub(channel)
        assert list_sites(stub, token(tenant)) is None  # connected, warm
        started = time.monotonic()
        assert answer(stub, bearer(token(tenant), **forged)) is None
        assert time.monotonic() - started < 1.5, "the forged delay was applied"
    web = call(
        gateway.port,
        f"{tenant}.localhost:{gateway.port}",
        LIST_SITES,
        sites_pb.ListSitesRequest(page_size=1),
        token=token(tenant),
        headers=forged,
    )
    assert web.http_status == 200 and web.status == 0, (web.status, web.message)


def fault_stats(settings: GatewaySettings) -> dict[str, int]:
    """The fault filter's counters and gauge on the gateway's admin interface, by their last name."""
    url = f"http://127.0.0.1:{settings.admin_port}/stats?filter=" + r"\.fault\."
    with urllib.request.urlopen(url, timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return {name.rsplit(".", 1)[-1]: int(value) for name, _, value in (line.partition(": ") for line in lines)}


def test_past_the_cap_on_held_refusals_the_gateway_answers_them_at_once(
    stack, new_tenant, features, platform_token, token, eventually
):
    """With one refusal held, the next is past the cap (the fault filter's max_active_faults): it
    is answered at once, and still by the gateway, as the same refusal; never by the service."""
    env = {
        "GATEWAY_PORT": str(free_port()),
        "GATEWAY_ADMIN_PORT": str(free_port()),
        "GATEWAY_WEB_DIR": "/none",
        GATEWAY_REFUSAL_HOLD_MAX_HELD.name: "1",
    }
    capped = stack.start_gateway(extra_env=env, instance="gateway-one-held")
    try:
        tenant = new_tenant("cap", plan="basic")
        set_limit(features, platform_token, tenant, "rpm_read", PER_MINUTE)
        tenant_token = token(tenant)
        # One connection: one Envoy worker, whose box holds the tenant.
        with channel_for(capped, tenant) as channel:
            stub = sites_grpc.SiteServiceStub(channel)
            boxed(stub, tenant_token)
            reached = handled(stack, tenant)
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(list_sites, stub, tenant_token)
                eventually(lambda: _at_least(fault_stats(capped)["active_faults"], 1), within=5)
                started = time.monotonic()
                second = list_sites(stub, tenant_token)
                took = time.monotonic() - started
                held = first.result()
            for error in (held, second):
                assert error is not None and error.reason == "RATE_LIMITED" and error.retry is not None, error
            assert took < HOLD, f"the refusal past the cap waited {took * 1000:.0f} ms"
        stats = fault_stats(capped)
        assert (stats["delays_injected"], stats["faults_overflow"]) == (1, 1), stats
        assert handled(stack, tenant) == reached, "a refusal past the cap reached the service"
    finally:
        stack.stop("gateway-one-held")
