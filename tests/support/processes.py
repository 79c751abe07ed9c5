"""More processes of a service beside the session's, for the tests that need two of one."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.stack import Stack, stop_process

from .ports import free_port


@dataclass
class ExtraService:
    target: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class ExtraServices:
    """Starts service processes on free ports against ``stack``'s database and Redis; ``stop()`` ends them."""

    stack: Stack
    log_dir: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, env: dict[str, str] | None = None, wait: bool = True) -> ExtraService:
        """Another process of service ``name``: it listens on a free port (``<NAME>_PORT``),
        shares the stack's database and Redis unless ``env`` says otherwise, skips migrations
        and logs to ``log_dir``."""
        port = free_port()
        instance = f"{name}-{port}"
        log_path = self.log_dir / f"{instance}.log"
        with log_path.open("ab") as log:
            process = self.stack.start_service(
                name,
                instance=instance,
                log=log,
                extra_env={f"{name.upper()}_PORT": str(port), "MIGRATE_ON_START": "0", **(env or {})},
            )
        self.started.append(process)
        if wait:
            self.stack.wait_serving(name, port=port, instance=instance)
        return ExtraService(f"127.0.0.1:{port}", process, log_path)

    def stop(self) -> None:
        for process in self.started:
            stop_process(process)
