"""Unit and stack tests are told apart by reading them (tests/support/stack_marking.py):
``make test-unit`` must leave out every test that starts a server or a process, and keep
the rest.

The functions looked at here are named by strings (``_function``), not by reference: a test
that names ``subprocess.run`` is itself read as starting a process, and these are unit tests.
"""

from __future__ import annotations

import importlib
import socket
from typing import Any

import pytest

from .support.stack_marking import StarterFinder, UnitTestReachedServerError, no_servers


def _function(module: str, name: str) -> Any:
    """``module.name``, a fixture unwrapped to the function pytest calls."""
    found = getattr(importlib.import_module(module), name)
    unwrap = getattr(found, "_get_wrapped_function", None)
    return unwrap() if unwrap else found


def _runs_a_process() -> None:
    _function("subprocess", "run")(["true"], check=True)


def _computes() -> int:
    return sum(range(3))


@pytest.fixture
def finder() -> StarterFinder:
    return StarterFinder()


@pytest.mark.parametrize("fixture", ["stack", "private_redis", "extra_sites", "gateway", "registry", "admin"])
def test_a_fixture_that_starts_servers_or_is_built_on_one_that_does_is_found(finder, fixture):
    assert finder.starts(_function("tests.conftest", fixture))


def test_code_that_starts_nothing_is_a_unit_test(finder):
    assert not finder.starts(_computes)
    assert not finder.starts(_function("tests.conftest", "eventually"))
    assert not finder.starts(_function("tests.test_supervisor", "test_nothing_is_restarted_once_ctrl_c_is_pressed"))


@pytest.mark.parametrize(
    ("module", "name"),
    [
        # validate() runs `envoy --mode validate` from gateway/envoy.py, outside tests/.
        ("tests.test_gateway_config", "test_envoy_validates_the_rendering_without_deprecation_warnings"),
        # start_sites() in the test module runs `python -m services.sites`.
        ("tests.test_startup_errors", "test_a_port_in_use_is_refused_in_one_line_naming_it"),
        # A fixture of the test module that runs the whole dev stack.
        ("tests.test_supervisor", "dev_stack"),
    ],
)
def test_a_process_started_through_helpers_or_the_code_under_test_is_found(finder, module, name):
    assert finder.starts(_function(module, name))


def test_a_unit_test_that_starts_a_process_fails_at_once():
    with no_servers(), pytest.raises(UnitTestReachedServerError, match="started a process"):
        _runs_a_process()


def test_a_unit_test_that_connects_to_a_server_fails_at_once():
    with no_servers(), pytest.raises(UnitTestReachedServerError, match="connected to a server"):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


def test_the_unit_run_guards_every_unit_test(request):
    # make test-unit deselects with "not stack"; the autouse fixture then refuses processes.
    assert "_unit_tests_reach_no_server" in request.fixturenames
