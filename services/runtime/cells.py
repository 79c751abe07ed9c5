"""Database cells: which PostgreSQL database holds a tenant's rows.

A cell is one PostgreSQL database with every service's schemas, roles, migrations and RLS.
``CELLS`` lists them, the first being the *home* cell: it holds the tenant registry (the
directory of tenants with their hosts, users and settings) and the platform's global tables,
and every tenant the registry has placed nowhere else. The sites, features and audit
services keep each tenant's rows in the tenant's cell, reached through one pool per cell
(``<SERVICE>_DATABASE_URL`` for the home cell, ``<SERVICE>_CELL_DATABASE_URLS`` for the
others). A *dedicated* cell takes only tenants placed in it explicitly, and only of a plan
that may have one (``plans.toml``: ``dedicated_cell``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from .environment import Setting, SettingsError
from .ids import CELL_NAME
from .plans import Plans

#: The one cell of a platform that configures none.
DEFAULT_CELL = "cell1"
#: The services whose tenant rows live in the tenant's cell (the registry lives in the home cell).
CELL_SERVICES = ("sites", "features", "audit")


@dataclass(frozen=True)
class Cell:
    name: str
    #: Takes only tenants placed in it explicitly (of a plan whose ``dedicated_cell`` is ``may``).
    dedicated: bool = False


def parse_cells(name: str, raw: str) -> tuple[Cell, ...]:
    """``cell1,cell2,big1:dedicated``: the cells, the home cell first (it must be shared); ``2``: cell1, cell2."""
    if raw.isdigit():
        if int(raw) < 1:
            raise SettingsError(f"{name}: at least one cell")
        return tuple(Cell(f"cell{i}") for i in range(1, int(raw) + 1))
    cells: list[Cell] = []
    for item in (part.strip() for part in raw.split(",")):
        cell_name, _, kind = item.partition(":")
        if not CELL_NAME.matches(cell_name):
            raise SettingsError(f"{name}: cell name {cell_name!r} must match {CELL_NAME.pattern}")
        if kind not in ("", "shared", "dedicated"):
            raise SettingsError(f"{name}: cell {cell_name!r} is `shared` or `dedicated`, not {kind!r}")
        if any(c.name == cell_name for c in cells):
            raise SettingsError(f"{name}: cell {cell_name!r} is listed twice")
        cells.append(Cell(cell_name, kind == "dedicated"))
    if cells[0].dedicated:
        raise SettingsError(f"{name}: the first cell is the home cell (the registry's); it cannot be dedicated")
    return tuple(cells)


def parse_cell_dsns(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """``cell2=postgresql://... cell3=postgresql://...`` (separated by spaces): each cell's DSN."""
    pairs: list[tuple[str, str]] = []
    for item in raw.split():
        cell_name, sep, dsn = item.partition("=")
        if not sep or not dsn or not CELL_NAME.matches(cell_name):
            raise SettingsError(f"{name}: each entry is `<cell>=<DSN>`, separated by spaces; got {item[:20]!r}...")
        if any(c == cell_name for c, _ in pairs):
            raise SettingsError(f"{name}: cell {cell_name!r} is given twice")
        pairs.append((cell_name, dsn))
    return tuple(pairs)


CELLS: Setting[tuple[Cell, ...]] = Setting(
    "CELLS",
    (Cell(DEFAULT_CELL),),
    "the database cells, comma-separated `name[:dedicated]`, or a count `N` for the shared cells `cell1`..`cellN`; "
    "the first is the home cell (the tenant registry and platform tables). New tenants go to the shared cell "
    "holding fewest tenants; a `dedicated` cell takes only tenants placed in it (README: Cells). `make run` "
    "starts an embedded PostgreSQL for each cell",
    parse_cells,
    "`name[:dedicated],...`",
    shown=f"`{DEFAULT_CELL}`: one cell, `<SERVICE>_DATABASE_URL`'s",
)


def cell_dsns(name: str, doc: str) -> Setting[tuple[tuple[str, str], ...]]:
    """A variable giving a DSN for each cell but the home one (``cell=DSN ...``)."""
    return Setting(name, (), doc, parse_cell_dsns, "`cell=DSN ...`", shown="none (`make run` with `CELLS=2` sets it)")


CELL_DATABASE_URLS = {
    service: cell_dsns(
        f"{service.upper()}_CELL_DATABASE_URLS",
        "every cell but the home one: `cell=DSN` pairs separated by spaces, each the cell's database as the "
        "service's runtime role (the home cell's is `<SERVICE>_DATABASE_URL`)",
    )
    for service in CELL_SERVICES
}


def check_cell_dsns(cells: Sequence[Cell], dsns: Mapping[str, str], variable: str) -> None:
    """SettingsError unless ``dsns`` names exactly the cells but the home one."""
    wanted = {c.name for c in cells[1:]}
    if set(dsns) != wanted:
        missing, unknown = sorted(wanted - set(dsns)), sorted(set(dsns) - wanted)
        raise SettingsError(
            f"{variable} must give a DSN for each cell of CELLS but the first (missing: {missing or 'none'}, "
            f"not in CELLS: {unknown or 'none'})"
        )


def roomiest(cells: Sequence[Cell], tenants_in: Mapping[str, int]) -> str:
    """The shared cell with the most room: the one holding fewest tenants (the earlier on a tie)."""
    shared = [c.name for c in cells if not c.dedicated]
    return min(shared, key=lambda name: (tenants_in.get(name, 0), shared.index(name)))


def placement_problem(cells: Sequence[Cell], name: str, plan: str, plans: Plans) -> str | None:
    """Why a tenant of ``plan`` cannot be placed in cell ``name``, or None: it must be one of
    ``cells``, and a dedicated one only for a plan that may have one (an unknown plan is
    left to the plan's own check)."""
    cell = next((c for c in cells if c.name == name), None)
    if cell is None:
        return f"must be one of the platform's cells: {', '.join(c.name for c in cells)}"
    found = plans.get(plan)
    if cell.dedicated and found is not None and not found.dedicated_cell:
        allowed = [p.name for p in plans.ordered if p.dedicated_cell]
        may = ", ".join(allowed) or "none"
        return f"{cell.name!r} is a dedicated cell; plan {plan!r} never has one (plans that may: {may})"
    return None


#: The cell a platform path works on (:func:`on_cell`); None: the call's tenant's.
_CELL: ContextVar[str | None] = ContextVar("towerco_cell", default=None)


@contextmanager
def on_cell(name: str) -> Iterator[None]:
    """Within: transactions open on cell ``name``, whatever tenant they bind (platform paths run per cell)."""
    token = _CELL.set(name)
    try:
        yield
    finally:
        _CELL.reset(token)


def chosen_cell() -> str | None:
    """The cell :func:`on_cell` chose, if any."""
    return _CELL.get()
