"""Which tests are stack tests: the ones that start a server or a process, by themselves or
through a fixture (the session ``stack`` fixture is one: it starts PostgreSQL, Redis and
the services). The rest are unit tests, which ``make test-unit`` runs in seconds.

A test is read, not declared: its function and each fixture it uses (pytest's closure, so
``gateway``, ``registry`` and every fixture built on ``stack`` count) are parsed, and so,
transitively, are the functions and classes of the repository they call. One of them
naming a starter below (``subprocess.run``, ``asyncio.create_subprocess_exec``, ...; so
``Stack``, ``start_redis`` and Envoy's ``validate`` too) makes the test a stack test. A
test file added tomorrow is classified the same way without its author doing anything;
``pytest.mark.stack`` by hand is still honoured.

In a unit run, ``no_servers`` makes a test the reading missed fail at once, naming what it
tried, instead of starting PostgreSQL or waiting on a server that is not there.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import multiprocessing
import os
import socket
import subprocess
import textwrap
import types
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

# What starts a process (every server a test can start is one). Calls into the repository's
# own code (tests, deploy, gateway, services) are followed to these.
STARTERS: frozenset[object] = frozenset(
    {
        subprocess.Popen,
        subprocess.run,
        subprocess.call,
        subprocess.check_call,
        subprocess.check_output,
        asyncio.create_subprocess_exec,
        asyncio.create_subprocess_shell,
        os.fork,
        os.system,
        multiprocessing.Process,
    }
)
FOLLOWED = ("tests", "deploy", "gateway", "services", "conftest")


def _own(obj: object) -> bool:
    """A function or class of this repository (followed), not of a library."""
    module = getattr(obj, "__module__", None) or ""
    if module == __name__:  # the guard below names the starters, it does not call them
        return False
    return module.split(".")[0] in FOLLOWED


def _source_tree(obj: object) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(obj)))  # type: ignore[arg-type]
    except (OSError, TypeError, SyntaxError):
        return None


def _referenced(tree: ast.AST, namespace: dict[str, Any]) -> Iterable[object]:
    """The objects ``tree`` names: ``name`` and ``module.attr`` resolved in ``namespace``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in namespace:
            yield namespace[node.id]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner = namespace.get(node.value.id)
            if isinstance(owner, types.ModuleType | type):
                yield getattr(owner, node.attr, None)


class StarterFinder:
    """Answers, once per function, whether calling it may start a server or a process."""

    def __init__(self) -> None:
        self._known: dict[int, bool] = {}

    def starts(self, obj: object) -> bool:
        obj = inspect.unwrap(obj) if callable(obj) else obj
        if obj in STARTERS:
            return True
        if not _own(obj) or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            return False
        key = id(obj)
        if key not in self._known:
            self._known[key] = False  # a cycle (recursion, a class naming itself) adds nothing
            self._known[key] = self._search(obj)
        return self._known[key]

    def _search(self, obj: types.FunctionType | type) -> bool:
        tree = _source_tree(obj)
        if tree is None:
            return False
        module = inspect.getmodule(obj)
        namespace = dict(vars(module)) if module else {}
        if inspect.isfunction(obj):
            namespace.update(inspect.getclosurevars(obj).nonlocals)
        return any(self.starts(target) for target in _referenced(tree, namespace) if _hashable(target))


def _hashable(obj: object) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def needs_servers(item: Any, finder: StarterFinder) -> bool:
    """``item`` (a pytest Function) starts something: its test function or one of its fixtures does."""
    functions: list[Callable[..., Any]] = [item.function] if hasattr(item, "function") else []
    info = getattr(item, "_fixtureinfo", None)
    for name in item.fixturenames:
        definitions = info.name2fixturedefs.get(name, ()) if info else ()
        functions.extend(definition.func for definition in definitions)
    return any(finder.starts(function) for function in functions)


class UnitTestReachedServerError(AssertionError):
    """A test run as a unit test started a process or opened a connection."""


def _refuse(what: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise UnitTestReachedServerError(
            f"a unit test {what} ({args[1:]!r}): mark it pytest.mark.stack, or take the server from "
            "a fixture (stack, gateway, private_redis, ...) so that tests/conftest.py marks it"
        )

    return refuse


@contextmanager
def no_servers() -> Iterator[None]:
    """Within: starting a process or connecting a socket raises UnitTestReachedServerError."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", _refuse("started a process"))
        patch.setattr(socket.socket, "connect", _refuse("connected to a server"))
        patch.setattr(socket.socket, "connect_ex", _refuse("connected to a server"))
        yield
