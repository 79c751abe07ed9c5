"""The gateway's overload manager: how much it holds, and what it lets go first when full.

Two resources are watched. Connections have a hard cap, checked as each one is accepted
(past it, new ones are refused). The heap has a budget: as it fills, connections with no
call in flight are closed sooner and sooner (their idle timeout scaled down to one
second), then free memory is given back, and at the brim new calls are refused
(UNAVAILABLE, with RetryInfo, by grpc_replies.lua) while calls in flight finish.
"""

from __future__ import annotations

from typing import Any

CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"
HEAP = "envoy.resource_monitors.fixed_heap"
#: Fractions of the heap budget: idle timeouts start shrinking, reach their floor, heap is
#: released, new calls are refused.
SCALE_FROM, SCALE_FULL, SHRINK_AT, REFUSE_AT = 0.80, 0.95, 0.95, 0.98
IDLE_FLOOR = "1s"


def overload_manager(max_connections: int, max_heap_bytes: int) -> dict[str, Any]:
    connections = _typed(
        "extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
        max_active_downstream_connections=max_connections,
    )
    heap = _typed("extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig", max_heap_size_bytes=max_heap_bytes)
    idle_scaled = _typed(
        "config.overload.v3.ScaleTimersOverloadActionConfig",
        timer_scale_factors=[{"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": IDLE_FLOOR}],
    )
    scaled = {"scaling_threshold": SCALE_FROM, "saturation_threshold": SCALE_FULL}
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {"name": CONNECTIONS, "typed_config": connections},
            {"name": HEAP, "typed_config": heap},
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.reduce_timeouts",
                "triggers": [{"name": HEAP, "scaled": scaled}],
                "typed_config": idle_scaled,
            },
            _at("envoy.overload_actions.shrink_heap", SHRINK_AT),
            _at("envoy.overload_actions.stop_accepting_requests", REFUSE_AT),
        ],
    }


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/envoy.{type_name}", **fields}


def _at(action: str, fraction: float) -> dict[str, Any]:
    return {"name": action, "triggers": [{"name": HEAP, "threshold": {"value": fraction}}]}
