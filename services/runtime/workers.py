"""Several worker processes of one service on one port: the parent that starts and stops them.

With ``<SERVICE>_WORKERS`` above 1, ``python -m services.<name>`` is this parent. Once, before
any worker exists, it checks the ports (a second copy is refused in one line, as before) and
applies migrations (``MIGRATE_ON_START``); server.py does both, then hands over here. The
parent serves ``/metrics`` itself: the workers write their values into a folder they share
(``PROMETHEUS_MULTIPROC_DIR``, a fresh one unless given) and a scrape reads their sum.

Each worker is a fresh interpreter (``python -m services.<name> worker <index> <lifeline>``),
never a fork: grpc's threads and the event loop do not survive one. A worker is a whole
service process (server.serve) that binds the port with SO_REUSEPORT, so the kernel spreads
incoming connections (not the calls of one connection) over the workers.

SIGTERM or SIGINT to the parent goes to every worker, each drains as a single process does
(health NOT_SERVING, then in-flight calls within the grace period), and the parent exits 0
once all have. A worker that dies on its own stops the others the same way and the parent
exits non-zero (the worker's code, else 1): whoever runs the service (``make run``'s
supervisor, the kubelet) restarts it whole with its own backoff and crash limit, rather than a
second restart policy in here that would hide a worker crashing in a loop. If the parent
itself dies, even by SIGKILL, the workers see their lifeline pipe close and stop at once:
the port closed first (so the service's restart can have it), then the calls in flight
finish within the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import multiprocess

from .environment import process_environment
from .metrics_endpoint import MetricsEndpoint, start_metrics_endpoint
from .settings import METRICS_PORTS, MIGRATE_ON_START, PROMETHEUS_MULTIPROC_DIR, Settings

log = logging.getLogger("towerco.workers")

#: The first argument that makes ``python -m services.<name>`` a worker of a parent.
WORKER_COMMAND = "worker"
#: How long past its own drain (delay + grace) a worker gets to exit before it is killed.
EXIT_MARGIN_SECONDS = 10.0


@dataclass
class WorkerRole:
    """What a worker process is told by its parent on its command line."""

    #: 0 .. workers-1: says which one in the logs.
    index: int
    #: The read end of a pipe whose only write end the parent holds: end of file once it is gone.
    lifeline: int
    #: Set once the parent is gone: nobody will forward a SIGTERM, and a restart waits for the port.
    orphaned: bool = False

    @classmethod
    def from_args(cls, args: list[str]) -> WorkerRole | None:
        """The role ``worker <index> <lifeline fd>`` gives, else None."""
        if len(args) == 3 and args[0] == WORKER_COMMAND and args[1].isdigit() and args[2].isdigit():
            return cls(int(args[1]), int(args[2]))
        return None

    def watch_parent(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        """Set ``stop`` (and :attr:`orphaned`) once the parent is gone (its end of the lifeline closed)."""

        def readable() -> None:
            if os.read(self.lifeline, 64):
                return
            loop.remove_reader(self.lifeline)
            log.warning("the parent process is gone: stopping")
            self.orphaned = True
            stop.set()

        loop.add_reader(self.lifeline, readable)


async def run_workers(settings: Settings) -> int:
    """Start ``settings.workers`` workers of ``settings.service`` and wait for them; the exit code.

    The caller has checked the ports and migrated.
    """
    name = settings.service
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    folder, made = _metrics_folder(settings)
    endpoint: MetricsEndpoint | None = None
    if settings.metrics_port:
        endpoint = start_metrics_endpoint(settings.bind_host, settings.metrics_port, str(folder))
    env = dict(process_environment())
    # The parent alone serves /metrics and migrates; the workers write their metrics to the folder.
    env.update({METRICS_PORTS[name].name: "0", MIGRATE_ON_START.name: "false"})
    env[PROMETHEUS_MULTIPROC_DIR.name] = str(folder)
    lifeline, parent_end = os.pipe()
    workers: list[asyncio.subprocess.Process] = []
    try:
        for index in range(settings.workers):
            command = (sys.executable, "-m", f"services.{name}", WORKER_COMMAND, str(index), str(lifeline))
            workers.append(await asyncio.create_subprocess_exec(*command, env=env, pass_fds=(lifeline,)))
        os.close(lifeline)
        log.info(
            "%s: %d workers (pids %s) on %s:%d%s",
            name,
            len(workers),
            ", ".join(str(w.pid) for w in workers),
            settings.bind_host,
            settings.port,
            f", metrics on http://{settings.bind_host}:{settings.metrics_port}/metrics" if endpoint else "",
        )
        return await _supervise(name, workers, stop, folder, settings)
    finally:
        for worker in workers:  # only on a failure while starting them: _supervise waits for all
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
        os.close(parent_end)
        if endpoint is not None:
            endpoint.close()
        if made:
            shutil.rmtree(folder, ignore_errors=True)


async def _supervise(
    name: str, workers: list[asyncio.subprocess.Process], stop: asyncio.Event, folder: Path, settings: Settings
) -> int:
    exits = {asyncio.ensure_future(w.wait()): w for w in workers}
    asked = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([asked, *exits], return_when=asyncio.FIRST_COMPLETED)
    died = None if asked in done else next(exits[t] for t in done)
    asked.cancel()
    if died is None:
        log.info("%s: stopping %d workers", name, len(workers))
    else:
        log.error(
            "%s: worker pid %d exited with code %s while serving: stopping the others",
            name,
            died.pid,
            died.returncode,
        )
    for worker in workers:
        if worker.returncode is None:
            worker.send_signal(signal.SIGTERM)
    drain = settings.shutdown_delay_seconds + settings.shutdown_grace_seconds + EXIT_MARGIN_SECONDS
    _, late = await asyncio.wait(exits, timeout=drain)
    for task in late:
        log.error("%s: worker pid %d still running %.0fs after SIGTERM: killed", name, exits[task].pid, drain)
        exits[task].kill()
    await asyncio.gather(*exits)
    for worker in workers:  # a dead worker's gauges stop counting
        multiprocess.mark_process_dead(worker.pid, str(folder))  # type: ignore[no-untyped-call]
    if died is not None:
        code = died.returncode or 0
        return code if code > 0 else 1
    failed = [w for w in workers if w.returncode != 0]
    for worker in failed:
        log.error("%s: worker pid %d exited with code %s", name, worker.pid, worker.returncode)
    log.info("%s stopped", name)
    return 1 if failed else 0


def _metrics_folder(settings: Settings) -> tuple[Path, bool]:
    """The folder the workers share their metrics in, emptied; and whether it was made here (to remove)."""
    if settings.prometheus_multiproc_dir:
        folder = Path(settings.prometheus_multiproc_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):  # a previous run's values would be summed in
            stale.unlink()
        return folder, False
    return Path(tempfile.mkdtemp(prefix=f"towerco-{settings.service}-metrics-")), True
