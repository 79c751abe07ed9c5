"""A tenant's flood, in a process of its own so it does not share the measuring client's loop.

``python -m tests.bench.flood`` reads ``{"target", "authority", "token", "rate", "seconds"}`` as
one JSON line on stdin, connects, prints ``ready``, then sends ListSites for ``seconds``:
- open loop (``rate`` > 0): one call every ``1 / rate`` seconds whatever the answers (a late
  send goes at once, to catch up); calls beyond ``MAX_IN_FLIGHT`` outstanding are skipped and
  counted rather than queued, so a stalled server cannot make it grow without bound;
- closed loop (``"clients": n``): n callers, each sending its next call when the last is
  answered, as fast as the server answers.
Then it waits for the calls still out (each has a 5 s deadline), prints one JSON line,
``{"sent", "skipped", "send_seconds", "codes": {"<status> [<ErrorInfo reason>]": count},
"cpu_seconds", "niceness"}`` (``UNANSWERED``: calls still out after their deadline), and exits:
it stops by itself.

``"nice": n`` lowers the generator's CPU priority by n first. The flooder is a tenant's client:
in a deployment it runs on the tenant's machines, not on the platform's cores. On one shared
machine its own CPU (several times what the platform spends refusing it) would otherwise be
measured as the platform's; at a low priority it still sends at its rate whenever the machine
has a core to spare, and what the platform does for each of its calls runs at normal priority.
The report says what it sent and what CPU it used, so a generator that fell behind shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from towerco.sites.v1 import sites_service_pb2 as pb
from towerco.sites.v1 import sites_service_pb2_grpc as pb_grpc

MAX_IN_FLIGHT = 2000
CALL_DEADLINE = 5.0

Call = Callable[[], Coroutine[Any, Any, None]]


async def _open_loop(one: Call, rate: float, seconds: float) -> tuple[int, int]:
    """Calls sent and skipped."""
    in_flight: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    start = loop.time()
    skipped = created = 0
    for i in range(int(rate * seconds)):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(in_flight) >= MAX_IN_FLIGHT:
            skipped += 1
            continue
        task = asyncio.create_task(one())
        created += 1
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight, timeout=CALL_DEADLINE + 1)
    return created, skipped


async def _closed_loop(one: Call, clients: int, seconds: float) -> tuple[int, int]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    created = 0

    async def caller() -> None:
        nonlocal created
        while loop.time() < deadline:
            created += 1
            await one()

    await asyncio.gather(*(caller() for _ in range(clients)))
    return created, 0


def _reason(error: aio.AioRpcError) -> str:
    """The ErrorInfo reason of a refusal (RATE_LIMITED, or another bound's), if it has one."""
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return ""


async def flood(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("nice"):
        os.nice(int(config["nice"]))
    options = [("grpc.default_authority", config["authority"])] if config.get("authority") else []
    metadata = (("authorization", f"Bearer {config['token']}"),)
    request = pb.ListSitesRequest(page_size=10)
    codes: dict[str, int] = {}
    async with aio.insecure_channel(config["target"], options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        stub = pb_grpc.SiteServiceStub(channel)

        async def one() -> None:
            try:
                await stub.ListSites(request, metadata=metadata, timeout=CALL_DEADLINE)
                code = "OK"
            except aio.AioRpcError as error:
                code = " ".join(filter(None, (error.code().name, _reason(error))))
            codes[code] = codes.get(code, 0) + 1

        print("ready", flush=True)
        start = asyncio.get_running_loop().time()
        if config.get("clients"):
            created, skipped = await _closed_loop(one, config["clients"], config["seconds"])
        else:
            created, skipped = await _open_loop(one, config["rate"], config["seconds"])
        send_seconds = min(asyncio.get_running_loop().time() - start, config["seconds"])
    unanswered = created - sum(codes.values())
    if unanswered:
        codes["UNANSWERED"] = unanswered
    return {
        "sent": created,
        "skipped": skipped,
        "send_seconds": round(send_seconds, 3),
        "codes": codes,
        "rate": config.get("rate") or 0,
        "cpu_seconds": round(time.process_time(), 3),
        "niceness": os.nice(0),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(flood(json.loads(sys.stdin.readline())))), flush=True)
