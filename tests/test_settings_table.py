"""Settings declared once: each process kind's table of environment variables is what its
``load`` reads, what the README documents, and all that the code and the manifests use.

No server: every ``load`` here reads a plain dict, never this process's environment.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from deploy.kubernetes.render import OVERLAYS, render
from deploy.local.settings_doc import PROCESS_SETTINGS, README, current_readme
from deploy.local.stack import DEV_STACK_SETTINGS, StackConfig, machine_cores
from gateway.config import GATEWAY_SETTINGS, GatewaySettings
from services.runtime import settings as service_settings
from services.runtime.environment import SettingsError
from services.runtime.settings import SERVICE_SETTINGS, Settings, load

REPO = Path(__file__).resolve().parents[1]
#: The one module that may touch ``os.environ``.
ENVIRONMENT_MODULE = REPO / "services" / "runtime" / "environment.py"
SCANNED = ("services", "gateway", "deploy")
#: Variables the platform sets for programs it starts but never reads itself.
FOREIGN = {"PYTHONUNBUFFERED", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PATH"}
#: What the test harness reads for itself or hands the README's demo script: not the platform's.
TEST_HARNESS = {"TEST_CONTAINERS", "CI", "CHROMIUM", "GRPCURL", "TOKEN", "ADMIN"}
DECLARED = frozenset().union(*(table.names for table in PROCESS_SETTINGS))


def python_sources() -> Iterator[tuple[Path, ast.Module]]:
    for root in SCANNED:
        for path in sorted((REPO / root).rglob("*.py")):
            if path != ENVIRONMENT_MODULE:
                yield path, ast.parse(path.read_text(), str(path))


def _names_environment(node: ast.expr) -> bool:
    """Whether an expression reads as an environment mapping (``env``, ``environ``, ``DEPLOY_ENV``...)."""
    return "env" in ast.unparse(node).lower()


def _dict_keys(node: ast.expr) -> list[ast.expr | None]:
    return list(node.keys) if isinstance(node, ast.Dict) else []


def variables_used(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Every constant variable name read from or written to an environment mapping."""
    for node in ast.walk(tree):
        keys: list[ast.expr | None] = []
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _names_environment(node.func.value):
            if node.func.attr in {"get", "pop", "setdefault"} and node.args:
                keys.append(node.args[0])
            if node.func.attr == "update" and node.args and isinstance(node.args[0], ast.Dict):
                keys.extend(node.args[0].keys)
        if isinstance(node, ast.Call):
            # extra_env={...}, env={...}, and the tests' extra_sites({...}): an environment for a process.
            keys.extend(k for kw in node.keywords if kw.arg and "env" in kw.arg for k in _dict_keys(kw.value))
            if ast.unparse(node.func).startswith("extra_") and node.args:
                keys.extend(_dict_keys(node.args[0]))
        if isinstance(node, ast.Subscript) and _names_environment(node.value):
            keys.append(node.slice)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            if any(_names_environment(target) for target in node.targets):
                keys.extend(node.value.keys)
        for key in keys:
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.isupper():
                yield key.lineno, key.value


def test_the_readme_configuration_table_is_generated_from_the_declarations() -> None:
    readme = README.read_text()
    assert readme == current_readme(readme), "README.md's configuration table drifted: run `make settings-doc`"


def test_no_code_touches_os_environ_outside_the_environment_module() -> None:
    touched = []
    for path, tree in python_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
                if node.attr in {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}:
                    touched.append(f"{path.relative_to(REPO)}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.module == "os":
                touched.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not touched, f"read the environment through a declared Setting (services.runtime.environment): {touched}"


def test_every_variable_the_code_reads_or_passes_on_is_declared() -> None:
    undeclared = [
        f"{path.relative_to(REPO)}:{line} {name}"
        for path, tree in python_sources()
        for line, name in variables_used(tree)
        if name not in DECLARED | FOREIGN
    ]
    assert not undeclared, f"declare these in their process's settings table: {undeclared}"


def test_every_variable_a_test_starts_a_process_with_is_declared() -> None:
    # A misspelt name would configure nothing, and the test would prove less than it says.
    undeclared = [
        f"{path.relative_to(REPO)}:{line} {name}"
        for path in sorted((REPO / "tests").rglob("*.py"))
        for line, name in variables_used(ast.parse(path.read_text()))
        if name not in DECLARED | FOREIGN | TEST_HARNESS
    ]
    assert not undeclared, f"not a declared setting: {undeclared}"


def test_the_scan_sees_reads_through_a_mapping_and_environments_for_processes() -> None:
    # The scans above must not pass by seeing nothing: they find each kind of use written here.
    source = (
        "env.get('A_B')\nenviron['C_D']\nenv.update({'E_F': '1'})\nDEPLOY_ENV = {'G_H': 'x'}\n"
        "start(extra_env={'I_J': '1'})\nextra_sites({'K_L': '1'})\nother.get('M_N')\nstart({'O_P': '1'})\n"
    )
    found = sorted(name for _, name in variables_used(ast.parse(source)))
    assert found == ["A_B", "C_D", "E_F", "G_H", "I_J", "K_L"]


def test_envoy_reads_only_declared_gateway_variables_from_its_environment() -> None:
    sources = [*(REPO / "gateway").glob("*.py"), *(REPO / "gateway").glob("*.lua")]
    sources.extend((REPO / "deploy" / "kubernetes" / "overlays").glob("*/gateway-envoy.json"))
    read = {name for path in sources for name in re.findall(r"%ENVIRONMENT\((\w+)\)%", path.read_text())}
    assert read, "Envoy reads GATEWAY_SECRET from its environment; the scan found nothing"
    assert read <= GATEWAY_SETTINGS.names, read - GATEWAY_SETTINGS.names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_a_kubernetes_overlay_sets_is_declared_for_that_process(overlay: str) -> None:
    # The rendered overlay (kubectl kustomize): each container's env, and every key of the
    # ConfigMaps and Secrets it reads whole (envFrom), is a variable of its own process.
    objects = [doc for doc in yaml.safe_load_all(render(overlay)) if doc]
    generated = {(o["kind"], o["metadata"]["name"]): set(o.get("data", {})) for o in objects}
    checked = 0
    for workload in objects:
        if workload["kind"] not in {"Deployment", "Job"}:
            continue
        spec = workload["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            names = {env["name"] for env in container.get("env", [])}
            for source in container.get("envFrom", []):
                for ref, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if ref in source:
                        names |= generated[kind, source[ref]["name"]]
            table = GATEWAY_SETTINGS if workload["metadata"]["name"] == "gateway" else SERVICE_SETTINGS
            where = f"{overlay}: {workload['kind']}/{workload['metadata']['name']} {container['name']}"
            assert names, where
            assert names <= table.names, f"{where} sets undeclared {sorted(names - table.names)}"
            checked += 1
    assert checked == 10, "five Deployments, the gateway's domain sync and the Job's four migrations"


def test_the_deploy_gateway_environment_names_only_gateway_variables() -> None:
    from gateway.__main__ import DEPLOY_ENV, OVERLAY_VALUES

    assert set(DEPLOY_ENV) <= GATEWAY_SETTINGS.names, set(DEPLOY_ENV) - GATEWAY_SETTINGS.names
    assert set(OVERLAY_VALUES) <= GATEWAY_SETTINGS.names, set(OVERLAY_VALUES) - GATEWAY_SETTINGS.names


def test_a_variable_several_processes_read_is_one_declaration() -> None:
    seen: dict[str, object] = {}
    for table in PROCESS_SETTINGS:
        for setting in table.settings:
            assert seen.setdefault(setting.name, setting) is setting, f"{setting.name} is declared twice"


def test_every_declaration_has_a_meaning_and_a_default_its_own_range_accepts() -> None:
    for table in PROCESS_SETTINGS:
        for setting in table.settings:
            assert setting.doc.strip(), setting.name
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*", setting.name), setting.name
            assert setting.read({}) == setting.default, setting.name


def test_a_service_settings_field_is_the_declared_variable_of_its_name_or_a_named_exception() -> None:
    import dataclasses

    unnamed = {f.name for f in dataclasses.fields(service_settings.Settings)} - {
        name.lower() for name in SERVICE_SETTINGS.names
    }
    # As Settings' docstring lists them: load's argument, and fields named otherwise or made from several.
    assert unnamed == {
        "service",
        "bind_host",
        "port",
        "workers",
        "metrics_port",
        "db_acquire_timeout",
        "runtime_database_url",
        "read_database_url",
        "cell_database_urls",
        "targets",
    }


def test_the_variables_once_undocumented_have_rows() -> None:
    readme = README.read_text()
    for name in ("LOG_LEVEL", "JWT_LEEWAY_SECONDS", "DATA_DIR", "REDIS_MAX_CONNECTIONS", "GATEWAY_SECRET"):
        assert f"| `{name}`" in readme or f", `{name}`" in readme, name
    assert {"DATA_DIR", "GATEWAY_SECRET"} <= DEV_STACK_SETTINGS.names & GATEWAY_SETTINGS.names


# What load makes of the mapping it is given


def service_environment(tmp_path: Path, **values: str) -> dict[str, str]:
    """What a service needs to load: its runtime DSN, a page-token secret and the service key files."""
    key = tmp_path / "service-key"
    key.write_text("not read by load")
    return {
        "DATA_DIR": str(tmp_path),
        "SITES_DATABASE_URL": "postgresql://sites_app:secret@127.0.0.1:1/towerco",
        "PAGE_TOKEN_SECRET": "page-secret",
        "SERVICE_JWKS_FILE": str(key),
        "SERVICE_KEY_FILE": str(key),
        **values,
    }


@pytest.fixture(scope="module")
def sites_defaults(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Settings]:
    """What the sites service loads from the least it needs (its data folder and settings)."""
    data_dir = tmp_path_factory.mktemp("defaults")
    return data_dir, load("sites", service_environment(data_dir))


@pytest.mark.parametrize(
    ("field", "default"),
    [
        ("port", 50052),
        ("db_pool_max_size", 20),
        ("db_pool_min_size", 2),
        ("redis_max_connections", 16),
        ("audit_refusal_window_seconds", 60.0),
        ("jwt_leeway_seconds", 30),
        ("log_level", "INFO"),
        ("migrate_on_start", False),
        ("rate_limit_fail_closed", False),
        ("runtime_database_url", "postgresql://sites_app:secret@127.0.0.1:1/towerco"),
        ("migration_database_url", ""),
    ],
)
def test_a_service_loads_the_declared_default_of(sites_defaults, field: str, default: object) -> None:
    value = getattr(sites_defaults[1], field)
    assert value is default if isinstance(default, bool) else value == default


def test_the_declared_port_of_sites_is_50052() -> None:
    assert service_settings.PORTS["sites"].default == 50052


def test_a_service_finds_its_jwks_file_under_its_data_folder_by_default(sites_defaults) -> None:
    data_dir, settings = sites_defaults
    assert settings.jwt_jwks_file == str(data_dir.resolve() / "keys" / "jwks.json")


def test_a_service_calls_the_audit_service_on_its_default_port(sites_defaults) -> None:
    assert sites_defaults[1].targets["audit"] == "127.0.0.1:50054"


def test_a_service_reads_the_mapping_it_is_given_not_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "not a number")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    settings = load("sites", service_environment(tmp_path, AUDIT_PORT="6000", LOG_LEVEL="warning"))
    assert settings.db_pool_max_size == 20
    assert settings.log_level == "WARNING"
    assert settings.targets["audit"] == "127.0.0.1:6000"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DB_POOL_MAX_SIZE", "twenty", "DB_POOL_MAX_SIZE must be a number, got 'twenty'"),
        ("TENANT_CACHE_SECONDS", "5s", "TENANT_CACHE_SECONDS must be a number, got '5s'"),
        ("MIGRATE_ON_START", "Maybe", "MIGRATE_ON_START must be true or false, got 'maybe'"),
        ("DB_POOL_MAX_SIZE", "0", "DB_POOL_MAX_SIZE must be at least 1"),
        ("REDIS_MAX_CONNECTIONS", "0", "REDIS_MAX_CONNECTIONS must be at least 1"),
        ("AUDIT_REFUSAL_WINDOW_SECONDS", "0", "AUDIT_REFUSAL_WINDOW_SECONDS must be a positive number of seconds"),
        ("RATE_LIMIT_LOCAL_SHARE", "1.5", "RATE_LIMIT_LOCAL_SHARE must be a fraction in (0, 1]"),
        ("RATE_LIMIT_LOCAL_SHARE", "0", "RATE_LIMIT_LOCAL_SHARE must be a fraction in (0, 1]"),
        ("SERVICE_JWT_ISSUER", "towerco-dev-issuer", "SERVICE_JWT_ISSUER must differ from JWT_ISSUER"),
        ("SITES_DATABASE_URL", " ", "SITES_DATABASE_URL is not set"),
    ],
)
def test_a_service_refuses_a_bad_value_naming_the_variable(tmp_path: Path, name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as refused:
        load("sites", service_environment(tmp_path, **{name: value}))
    assert str(refused.value).startswith(message)


def test_the_gateway_loads_its_declared_defaults_and_keeps_whole_second_timeouts(tmp_path: Path) -> None:
    settings = GatewaySettings.from_env({"DATA_DIR": str(tmp_path), "GATEWAY_WEB_DIR": "/none"})
    assert (settings.port, settings.admin_port, settings.max_heap_mb) == (8080, 9901, 400)
    assert (settings.route_timeout_seconds, settings.idle_timeout_seconds) == (15.0, 15.0)
    assert settings.cors_origins == ("http://*.localhost:8080",)
    assert settings.jwt_clock_skew_seconds == 30
    with pytest.raises(SettingsError, match=re.escape("GATEWAY_ROUTE_TIMEOUT_SECONDS must be a number, got '1.5'")):
        GatewaySettings.from_env({"DATA_DIR": str(tmp_path), "GATEWAY_ROUTE_TIMEOUT_SECONDS": "1.5"})


def test_the_dev_stack_starts_embedded_servers_unless_given_urls(tmp_path: Path) -> None:
    embedded = StackConfig.from_env(tmp_path, {})
    assert (embedded.database_url, embedded.redis_url) == (None, None)
    assert (embedded.pg_port, embedded.redis_port, embedded.gateway_port) == (55432, 56379, 8080)
    given = StackConfig.from_env(tmp_path, {"REDIS_URL": "redis://127.0.0.1:7000/0", "PG_PORT": "6000"})
    assert (given.redis_url, given.pg_port) == ("redis://127.0.0.1:7000/0", 6000)


def test_make_runs_gateway_has_an_envoy_worker_per_core_unless_told(tmp_path: Path) -> None:
    assert StackConfig.from_env(tmp_path, {}).gateway_workers == machine_cores()
    assert StackConfig(data_dir=tmp_path).gateway_workers == machine_cores()
    assert StackConfig.from_env(tmp_path, {"GATEWAY_WORKERS": "3"}).gateway_workers == 3
    with pytest.raises(SettingsError, match="GATEWAY_WORKERS must be at least 1"):
        StackConfig.from_env(tmp_path, {"GATEWAY_WORKERS": "0"})
