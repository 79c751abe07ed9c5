"""A deployment names each runtime role's DSN, and a service uses it exactly as given.

No DSN is rebuilt and no password defaulted: a service without its ``<SERVICE>_DATABASE_URL``
refuses to start in one line naming it, and one given a wrong password says so in one line
instead of logging in with a dev password. Migrating (the Job's ``python -m services.<name>
migrate``) takes the owner's DSN from ``MIGRATION_DATABASE_URL`` and gives the runtime role
the password of its own DSN. Run against a PostgreSQL server of the module's own that, unlike
the dev stack's, asks the runtime roles for their passwords.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from deploy.local.dsn import dsn_with_user
from deploy.local.postgres import start_postgres, stop_postgres
from deploy.local.tokens import ensure_keys
from services.runtime.settings import SettingsError, load, migration_target

from .conftest import OUTPUT
from .support import free_port

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "sites-deployed-" + uuid.uuid4().hex[:8]
#: pg_hba.conf's first lines: the owner trusted on loopback, every other role asked its password.
PASSWORDS_ASKED = "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"


def _service_env(data_dir: Path, **values: str) -> dict[str, str]:
    """The process environment without any database variable, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k and k != "APP_DB_PASSWORD"}
    return {
        **env,
        "DATA_DIR": str(data_dir),
        "SITES_PORT": str(free_port()),
        "SITES_METRICS_PORT": "0",
        "PYTHONUNBUFFERED": "1",
        **values,
    }


def run_sites(data_dir: Path, *args: str, **values: str) -> subprocess.CompletedProcess[str]:
    """``python -m services.sites [args]`` until it exits."""
    ensure_keys(data_dir / "keys")
    return subprocess.run(
        [sys.executable, "-m", "services.sites", *args],
        cwd=REPO,
        env=_service_env(data_dir, **values),
        capture_output=True,
        text=True,
        timeout=60,
    )


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused start wrote (exit 2, no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "sites refused to start" in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def password_postgres() -> Iterator[str]:
    """A PostgreSQL server whose runtime roles log in with a password (the owner is trusted); its owner DSN."""
    folder = OUTPUT / f".dsn-pg-{uuid.uuid4().hex[:8]}"
    data_dir = folder / "pg"
    try:
        owner_dsn = start_postgres(data_dir, free_port(), fast=True).superuser_dsn()
        hba = data_dir / "pg_hba.conf"
        hba.write_text(PASSWORDS_ASKED + hba.read_text())  # the first matching line wins
        asyncio.run(_admin(owner_dsn, "SELECT pg_reload_conf()"))
        yield owner_dsn
    finally:
        stop_postgres(data_dir)
        shutil.rmtree(folder, ignore_errors=True)


async def _admin(dsn: str, statement: str) -> Any:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def migrated(password_postgres: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The sites schema migrated by ``python -m services.sites migrate``, as the migration Job runs it."""
    runtime = dsn_with_user(password_postgres, "sites_app", PASSWORD)
    result = run_sites(
        tmp_path_factory.mktemp("migrate"),
        "migrate",
        MIGRATION_DATABASE_URL=password_postgres,
        SITES_DATABASE_URL=runtime,
    )
    assert result.returncode == 0, result.stderr
    return runtime


def test_a_service_without_its_runtime_dsn_refuses_in_one_line_naming_it(tmp_path: Path) -> None:
    line = refusal(run_sites(tmp_path))
    assert "SITES_DATABASE_URL is not set" in line


def test_an_old_style_database_url_is_not_turned_into_a_runtime_dsn(tmp_path: Path) -> None:
    # What the old manifests gave a pod: the services used to rebuild a DSN from it with a dev password.
    line = refusal(run_sites(tmp_path, DATABASE_URL="postgresql://sites_app@127.0.0.1:1/towerco"))
    assert "SITES_DATABASE_URL is not set" in line


def test_migrating_without_the_owner_dsn_refuses_in_one_line_naming_it(tmp_path: Path) -> None:
    line = refusal(run_sites(tmp_path, "migrate", SITES_DATABASE_URL="postgresql://sites_app:pw@127.0.0.1:1/x"))
    assert "MIGRATION_DATABASE_URL is not set" in line


def test_migrate_on_start_without_the_owner_dsn_refuses_in_one_line(tmp_path: Path) -> None:
    line = refusal(
        run_sites(tmp_path, MIGRATE_ON_START="true", SITES_DATABASE_URL="postgresql://sites_app:pw@127.0.0.1:1/x")
    )
    assert "MIGRATION_DATABASE_URL is not set" in line


def test_the_migration_job_gives_the_runtime_role_the_password_of_its_dsn(migrated: str) -> None:
    async def login(dsn: str) -> str:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
        try:
            return str(await conn.fetchval("SELECT current_user"))
        finally:
            await conn.close()

    assert asyncio.run(login(migrated)) == "sites_app"
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(login(dsn_with_user(migrated, "sites_app", "towerco-dev-only")))


def test_a_wrong_password_is_refused_in_one_line_not_replaced(migrated: str, tmp_path: Path) -> None:
    # The dev stack's password, as the old default would have slipped in.
    wrong = dsn_with_user(migrated, "sites_app", "towerco-dev-only")
    line = refusal(run_sites(tmp_path, SITES_DATABASE_URL=wrong))
    assert 'password authentication failed for user "sites_app"' in line


def test_migrating_refuses_a_runtime_dsn_of_another_role(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("not read")
    settings = load(
        "sites",
        {
            "DATA_DIR": str(tmp_path),
            "PAGE_TOKEN_SECRET": "x",
            "SERVICE_JWKS_FILE": str(key),
            "SERVICE_KEY_FILE": str(key),
            "MIGRATION_DATABASE_URL": "postgresql://owner@db/towerco",
            "SITES_DATABASE_URL": "postgresql://tenant_app:pw@db/towerco",
        },
    )
    with pytest.raises(SettingsError, match="SITES_DATABASE_URL logs in as 'tenant_app', not 'sites_app'"):
        migration_target(settings)
