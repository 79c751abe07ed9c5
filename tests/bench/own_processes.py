"""The bench's own processes (the bare server, the flood generator): started with their
configuration as one JSON line on stdin, ready when they print ``ready``, and stopped by the bench
that started them, by their own process handle."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from deploy.local.stack import stop_process

REPO = Path(__file__).resolve().parents[2]


def start(module: str, config: Mapping[str, Any], log: IO[bytes] | None = None) -> subprocess.Popen[str]:
    """``python -m tests.bench.<module>`` given ``config``; returns once it has printed ``ready``."""
    process = subprocess.Popen(
        [sys.executable, "-m", f"tests.bench.{module}"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(json.dumps(dict(config)) + "\n")
    process.stdin.close()
    line = process.stdout.readline().strip()
    if line != "ready":
        process.kill()
        process.wait()
        raise RuntimeError(f"tests.bench.{module} did not start (exit {process.poll()}, said {line!r}); see its log")
    return process


def stop(process: subprocess.Popen[str], timeout: float = 10.0) -> None:
    stop_process(process, timeout)


@contextmanager
def running(module: str, config: Mapping[str, Any], log: IO[bytes] | None = None) -> Iterator[subprocess.Popen[str]]:
    process = start(module, config, log)
    try:
        yield process
    finally:
        stop(process)
