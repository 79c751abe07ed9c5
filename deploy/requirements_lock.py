"""The image's lock files, made from pyproject.toml and checked against it.

``requirements.lock`` pins, with hashes, everything [project.dependencies] needs in a pod;
the Dockerfile's runtime stage installs exactly that (``--require-hashes --no-deps``).
``requirements-proto.lock`` adds the ``proto`` extra (grpcio-tools) for the build stage
that generates gen/, constrained to the runtime lock's pins so that the generated code and
the protobuf it runs on come from one resolution.

``compile`` (``make lock``) resolves with uv for the image's platform (Linux, Python 3.11),
keeping the pins already there unless ``--upgrade``, and writes in each header a digest of
the requirement lists it was made from. ``check`` (``make lint``, tests/test_dependencies.py)
works offline: the digest still matches pyproject.toml, every requirement is met by a pin,
every pin has hashes, and the build stage protobuf is the runtime's.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYTHON_VERSION = "3.11"
DIGEST_PREFIX = "# pyproject.toml requirements sha256: "
#: The image's platform, for markers (``; sys_platform == "win32"`` and the like).
TARGET = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


@dataclass(frozen=True)
class Lock:
    """One lock file: [project.dependencies] plus ``extras``, pinned within ``constraint``'s pins."""

    path: str
    extras: tuple[str, ...] = ()
    constraint: str | None = None


RUNTIME = Lock("requirements.lock")
PROTO = Lock("requirements-proto.lock", extras=("proto",), constraint=RUNTIME.path)
LOCKS = (RUNTIME, PROTO)


@dataclass(frozen=True)
class Pin:
    version: Version
    hashes: int


def requirements(project: dict[str, Any], lock: Lock) -> list[Requirement]:
    """The requirements ``lock`` is made from, as pyproject.toml's ``[project]`` table lists them."""
    listed = list(project.get("dependencies", []))
    for extra in lock.extras:
        listed += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(line) for line in listed]


def digest(reqs: list[Requirement]) -> str:
    """Order and spelling do not count: ``Requirement`` normalises, the list is sorted."""
    return hashlib.sha256("\n".join(sorted(str(req) for req in reqs)).encode()).hexdigest()


def read_project(pyproject: Path) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads(pyproject.read_text())["project"]
    return project


def parse_lock(text: str) -> tuple[str | None, dict[NormalizedName, Pin]]:
    """The header's digest and the pins (``name==version`` with their ``--hash`` options)."""
    recorded = None
    pins: dict[NormalizedName, Pin] = {}
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if line.startswith(DIGEST_PREFIX):
            recorded = line.removeprefix(DIGEST_PREFIX).strip()
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match:
            pins[canonicalize_name(match[1])] = Pin(Version(match[2]), line.count("--hash=sha256:"))
    return recorded, pins


def check(root: Path = ROOT) -> list[str]:
    """What is wrong between pyproject.toml and the lock files, one line each (nothing: in step)."""
    project = read_project(root / "pyproject.toml")
    problems: list[str] = []
    locked: dict[str, dict[NormalizedName, Pin]] = {}
    for lock in LOCKS:
        path = root / lock.path
        if not path.is_file():
            problems.append(f"{lock.path} is missing: run make lock")
            continue
        recorded, pins = parse_lock(path.read_text())
        locked[lock.path] = pins
        reqs = requirements(project, lock)
        source = "[project.dependencies]" + "".join(f" + [{extra}]" for extra in lock.extras)
        if recorded != digest(reqs):
            problems.append(f"{lock.path} was not made from pyproject.toml's {source} as they are now: run make lock")
        for req in reqs:
            if req.marker is not None and not Marker(str(req.marker)).evaluate(TARGET):
                continue
            pin = pins.get(canonicalize_name(req.name))
            if pin is None:
                problems.append(f"{lock.path} pins no {req.name} ({req} in pyproject.toml): run make lock")
            elif not req.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{lock.path} pins {req.name}=={pin.version}, outside {req}: run make lock")
        problems += [
            f"{lock.path} pins {name} without a hash: run make lock" for name, p in pins.items() if not p.hashes
        ]
    for lock in LOCKS:
        if lock.constraint and lock.path in locked and lock.constraint in locked:
            base = locked[lock.constraint]
            problems += [
                f"{lock.path} pins {name}=={pin.version} but {lock.constraint} {base[name].version}: run make lock"
                for name, pin in locked[lock.path].items()
                if name in base and base[name].version != pin.version
            ]
    return problems


def compile_locks(root: Path = ROOT, upgrade: bool = False) -> None:
    """Resolve each lock with uv (PyPI, the image's platform) and record its digest."""
    project = read_project(root / "pyproject.toml")
    for lock in LOCKS:
        command = [sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml", "--quiet", "--generate-hashes"]
        command += ["--python-version", PYTHON_VERSION, "--python-platform", "linux"]
        command += ["--custom-compile-command", "make lock", "--output-file", lock.path]
        command += [arg for extra in lock.extras for arg in ("--extra", extra)]
        command += ["--constraint", lock.constraint] if lock.constraint else []
        command += ["--upgrade"] if upgrade else []
        subprocess.run(command, cwd=root, check=True, timeout=600)  # noqa: S603 - our own arguments
        path = root / lock.path
        lines = [line for line in path.read_text().splitlines() if not line.startswith(DIGEST_PREFIX)]
        lines.insert(2, DIGEST_PREFIX + digest(requirements(project, lock)))
        path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.requirements_lock", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="fail when pyproject.toml and the lock files disagree (offline)")
    compile_parser = commands.add_parser("compile", help="regenerate the lock files (make lock)")
    compile_parser.add_argument("--upgrade", action="store_true", help="newest versions, not the pins already there")
    args = parser.parse_args(argv)
    if args.command == "compile":
        compile_locks(upgrade=args.upgrade)
    problems = check()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
