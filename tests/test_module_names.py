"""One name, one meaning: no two modules share a file name unless they hold the same thing.

Two ``chain.py`` (the audit hash chain, the interceptor chain), three ``tenant_data.py`` and
``tenant/migration.py`` beside the schema ``migrations/`` once made a reader open the wrong
file. Allowed: a name every service folder uses for the same part of itself (``servicer.py``,
``queries.py``, ...), and an interceptor named after its link's class
(``EntitlementsInterceptor`` in ``interceptors/entitlements.py``, beside the
``entitlements.py`` it enforces). No server is needed.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE = ("services", "gateway", "deploy")
SERVICES = REPO / "services"
INTERCEPTORS = SERVICES / "runtime" / "interceptors"
#: Every package has these; they are named by Python, not by what they hold.
PYTHON_NAMES = frozenset({"__init__.py", "__main__.py"})


def _modules() -> list[Path]:
    return sorted(p for top in CODE for p in (REPO / top).rglob("*.py") if "node_modules" not in p.parts)


def _in_a_service_folder(path: Path) -> bool:
    """``services/<service>/x.py`` of a service (a folder with its own ``__main__``)."""
    return path.parent.parent == SERVICES and (path.parent / "__main__.py").exists()


def _named_after_its_interceptor(path: Path) -> bool:
    """``interceptors/x.py`` defining ``XInterceptor`` (``x`` in snake case)."""
    if path.parent != INTERCEPTORS:
        return False
    classes = [n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)]
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", c.removesuffix("Interceptor")).lower() for c in classes}
    return path.stem in snake


def _same_meaning(paths: list[Path]) -> bool:
    """One part in each service folder, or a runtime module and the interceptor enforcing it."""
    if all(_in_a_service_folder(p) for p in paths):
        return True
    link = [p for p in paths if _named_after_its_interceptor(p)]
    return len(paths) == 2 and len(link) == 1 and {p.parent for p in paths} == {SERVICES / "runtime", INTERCEPTORS}


def _shared_names() -> dict[str, list[Path]]:
    by_name: dict[str, list[Path]] = defaultdict(list)
    for path in _modules():
        if path.name not in PYTHON_NAMES:
            by_name[path.name].append(path)
    return {name: paths for name, paths in by_name.items() if len(paths) > 1}


def test_no_two_modules_share_a_name_unless_they_hold_the_same_thing() -> None:
    colliding = {
        name: [str(p.relative_to(REPO)) for p in paths]
        for name, paths in _shared_names().items()
        if not _same_meaning(paths)
    }
    assert not colliding, f"modules that share a name but not a meaning; name each after what it holds: {colliding}"


def test_no_module_is_named_like_a_folder_beside_it() -> None:
    """``tenant/migration.py`` beside ``tenant/migrations/`` (schema migrations) said neither."""
    clashes = [
        str(path.relative_to(REPO))
        for path in _modules()
        for folder in path.parent.iterdir()
        if folder.is_dir() and folder.name.rstrip("s") == path.stem.rstrip("s")
    ]
    assert not clashes, f"modules named like the folder beside them: {clashes}"
