"""The tenant export file: one tenant's rows of every service, and its audit chain, in one file.

**Format (``towerco.tenant-export``, version 1): JSON lines, UTF-8.**

1. A header: ``{"format": "towerco.tenant-export", "version": 1, "tenant_id": ..., "export_time": ...,
   "schema_versions": {service: newest applied migration}, "tables": {"schema.table": row count},
   "audit_chain": {"events": n, "head_sequence": s, "head_hash": h}}``.
2. One line per row: ``{"table": "schema.table", "row": {column: value}}``, tables in the order
   an import writes them (parents first), each table's rows in key order; a row is its
   database row as PostgreSQL's ``to_jsonb`` gives it (timestamps in RFC 3339 with their
   offset, jsonb columns as JSON, generated columns included: the import recomputes them).
   ``audit.events`` rows, in ``sequence`` order, are the tenant's hash chain as stored.
3. A trailer: ``{"end": true, "rows": n, "sha256": digest}``, the SHA-256 of every byte
   before the trailer line.

What it proves: the trailer's digest finds a truncated or corrupted file; the audit chain
(``services/audit/hash_chain.py``) finds an edited, removed or reordered event even when
the digest was recomputed, since each event's hash covers its predecessor's. A digest is not
a signature: whoever edits a site row and recomputes the digest is not found out, nor
is whoever drops the newest events and edits the header to match (see the README).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.audit.hash_chain import ChainCheck, ChainedEvent
from services.runtime.context import is_valid_tenant_id

FORMAT = "towerco.tenant-export"
VERSION = 1
#: The table holding the hash chain, checked on every read of a file.
AUDIT_EVENTS = "audit.events"


class ArchiveError(ValueError):
    """A file that is not a complete, intact tenant export; the message says what is wrong."""


@dataclass
class TenantArchive:
    """One tenant's export: its header facts and rows per table, in file order."""

    tenant_id: str
    export_time: str
    schema_versions: dict[str, int]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: SHA-256 of the file's bytes before the trailer (set when written or read).
    sha256: str = ""

    @property
    def row_count(self) -> int:
        return sum(len(rows) for rows in self.tables.values())

    def events(self) -> list[dict[str, Any]]:
        return self.tables.get(AUDIT_EVENTS, [])


def chained(row: Mapping[str, Any], tenant_id: str | None = None, prev_hash: str | None = None) -> ChainedEvent:
    """An ``audit.events`` row of a file as the chain sees it (optionally under another tenant and predecessor)."""
    return ChainedEvent(
        tenant_id=tenant_id or row["tenant_id"], sequence=row["sequence"], event_id=row["event_id"],
        user_id=row["user_id"], action=row["action"], resource=row["resource"], details=row["details"],
        ip_address=row["ip_address"], request_id=row["request_id"], outcome=row["outcome"],
        create_time=datetime.fromisoformat(row["create_time"]),
        prev_hash=row["prev_hash"] if prev_hash is None else prev_hash, hash=row["hash"],
    )  # fmt: skip


def check_chain(events: Sequence[Mapping[str, Any]]) -> ChainCheck:
    """The chain of ``events`` as they stand in the file, in file order."""
    check = ChainCheck()
    check.feed([chained(row) for row in events])
    return check


def _chain_summary(events: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    head = events[-1] if events else None
    return {
        "events": len(events),
        "head_sequence": head["sequence"] if head else 0,
        "head_hash": head["hash"] if head else "",
    }


def _line(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8") + b"\n"


def dump(archive: TenantArchive) -> bytes:
    """The file's bytes; sets ``archive.sha256``."""
    header = {
        "format": FORMAT,
        "version": VERSION,
        "tenant_id": archive.tenant_id,
        "export_time": archive.export_time,
        "schema_versions": archive.schema_versions,
        "tables": {table: len(rows) for table, rows in archive.tables.items()},
        "audit_chain": _chain_summary(archive.events()),
    }
    body = bytearray(_line(header))
    for table, rows in archive.tables.items():
        for row in rows:
            body += _line({"table": table, "row": row})
    archive.sha256 = hashlib.sha256(body).hexdigest()
    return bytes(body + _line({"end": True, "rows": archive.row_count, "sha256": archive.sha256}))


def load(data: bytes) -> TenantArchive:
    """Read and check a file: its digest, its counts and its audit chain; ArchiveError naming the first problem."""
    lines = data.splitlines(keepends=True)
    if len(lines) < 2 or not lines[-1].endswith(b"\n"):
        raise ArchiveError("the file is not a whole tenant export: it ends before its trailer line")
    header, trailer = _object(lines[0], 1), _object(lines[-1], len(lines))
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ArchiveError(f"not a {FORMAT} file of version {VERSION} (its first line says otherwise)")
    if trailer.get("end") is not True:
        raise ArchiveError("the file is not a whole tenant export: its last line is not the trailer")
    digest = hashlib.sha256(b"".join(lines[:-1])).hexdigest()
    if trailer.get("sha256") != digest:
        raise ArchiveError("the file was changed or damaged after export: its SHA-256 does not match its trailer")
    tenant_id = header.get("tenant_id")
    if not isinstance(tenant_id, str) or not is_valid_tenant_id(tenant_id):
        raise ArchiveError(f"the header names no valid tenant id ({tenant_id!r})")
    archive = TenantArchive(
        tenant_id=tenant_id,
        export_time=str(header.get("export_time", "")),
        schema_versions=dict(header.get("schema_versions") or {}),
        tables={table: [] for table in header.get("tables") or {}},
        sha256=digest,
    )
    for number, raw in enumerate(lines[1:-1], start=2):
        entry = _object(raw, number)
        rows = archive.tables.get(entry.get("table", ""))
        row = entry.get("row")
        if rows is None or not isinstance(row, dict):
            raise ArchiveError(f"line {number} is not a row of a table the header lists")
        if row.get("tenant_id") != tenant_id:
            raise ArchiveError(f"line {number} is a row of tenant {row.get('tenant_id')!r}, not of {tenant_id!r}")
        rows.append(row)
    counts = {table: len(rows) for table, rows in archive.tables.items()}
    if counts != header.get("tables") or trailer.get("rows") != archive.row_count:
        raise ArchiveError(f"the file's rows {counts} are not the counts its header lists {header.get('tables')}")
    _verify_chain(archive.events(), header.get("audit_chain") or {})
    return archive


def _verify_chain(events: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
    try:
        check = check_chain(events)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArchiveError(f"an audit event of the file is malformed ({exc})") from None
    if not check.valid:
        raise ArchiveError(
            f"the audit chain does not verify: event {check.first_invalid} (the {check.checked}th in the file) was "
            "changed, or an event before it was removed or moved; the file is refused"
        )
    if summary != _chain_summary(events):
        raise ArchiveError(f"the audit chain ends elsewhere than the header says ({dict(summary)})")


def _object(raw: bytes, number: int) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArchiveError(f"line {number} is not JSON") from None
    if not isinstance(value, dict):
        raise ArchiveError(f"line {number} is not a JSON object")
    return value


def rechain(events: Iterable[Mapping[str, Any]], tenant_id: str) -> list[dict[str, Any]]:
    """``events`` (a verified chain) as ``tenant_id``'s: same sequences and fields, hashes recomputed.

    The hash covers the tenant id, so another tenant's events verify only re-linked; the
    first event keeps its ``prev_hash`` (empty, or the trusted start after a retention
    purge). Under the same tenant id every hash comes out as it was.
    """
    out: list[dict[str, Any]] = []
    prev: str | None = None
    for row in events:
        event = chained(row, tenant_id, prev)
        prev = event.compute_hash()
        out.append({**row, "tenant_id": tenant_id, "prev_hash": event.prev_hash, "hash": prev})
    return out
