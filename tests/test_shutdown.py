"""SIGTERM under load: every call is answered OK or UNAVAILABLE (which clients retry), never CANCELLED."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from towerco.features.v1 import feature_gate_service_pb2 as features_pb
from towerco.features.v1 import feature_gate_service_pb2_grpc as features_grpc

from .conftest import ExtraService
from .support import bearer, rich_error

CALLERS = 20
STOPS = 2


async def _call_until_gone(
    target: str, md: Any, outcomes: Counter[str], serving: asyncio.Event, gone: asyncio.Event
) -> None:
    """One client calling again as soon as it has an answer (RetryInfo ignored), until the port is closed."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = features_grpc.FeatureGateServiceStub(channel)
        while not gone.is_set():
            try:
                await stub.ListPlans(features_pb.ListPlansRequest(), metadata=md, timeout=10)
                outcomes["OK"] += 1
                if outcomes["OK"] >= 2 * CALLERS:
                    serving.set()
            except grpc.aio.AioRpcError as error:
                rich = rich_error(error)
                outcomes[f"{rich.code.name} {rich.reason}".strip()] += 1
                if rich.reason == "SHUTTING_DOWN" and rich.retry is None:
                    outcomes["SHUTTING_DOWN without RetryInfo"] += 1
                if rich.code == grpc.StatusCode.UNAVAILABLE and not rich.reason:
                    return  # gRPC's own: the port is closed, nothing more to learn from this client


async def _stop_under_load(service: ExtraService, md: Any) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    serving, gone = asyncio.Event(), asyncio.Event()
    callers = [
        asyncio.create_task(_call_until_gone(service.target, md, outcomes, serving, gone)) for _ in range(CALLERS)
    ]
    try:
        await asyncio.wait_for(serving.wait(), 20)  # the load is on
        service.process.send_signal(signal.SIGTERM)
        for _ in range(600):  # at most 30 s
            if service.process.poll() is not None:
                break
            await asyncio.sleep(0.05)
    finally:
        gone.set()
        await asyncio.gather(*callers)
    assert service.process.poll() == 0, service.output()
    return outcomes


async def test_calls_arriving_while_a_service_stops_get_unavailable_never_cancelled(
    extra_service: Callable[..., ExtraService],
    features: features_grpc.FeatureGateServiceStub,
    new_tenant: Callable[..., str],
    token: Callable[..., str],
    platform_token: str,
) -> None:
    tenant = new_tenant()
    # The load is the point here, not the tenant's rate.
    features.SetLimitOverride(
        features_pb.SetLimitOverrideRequest(tenant_id=tenant, resource="rpm_read", limit=-1),
        metadata=bearer(platform_token),
        timeout=10,
    )
    md = bearer(token(tenant))
    for _ in range(STOPS):
        service = extra_service("features", {"SHUTDOWN_DELAY_SECONDS": "0.2", "SHUTDOWN_GRACE_SECONDS": "5"})
        outcomes = await _stop_under_load(service, md)

        answered = {"OK", "UNAVAILABLE SHUTTING_DOWN", "UNAVAILABLE"}  # the last: the port closed, said by gRPC
        assert set(outcomes) <= answered, outcomes
        assert outcomes["UNAVAILABLE SHUTTING_DOWN"], f"no call was refused by the stopping server: {outcomes}"
        assert "while shutting down" in service.output(), service.output()
