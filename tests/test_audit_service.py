"""AuditLogService over real gRPC: append-only, tamper-evident, one chain per tenant.

Every call goes through the running audit service (interceptor chain, PostgreSQL with
RLS). Events are written as the platform's services write them, with a service token;
tenants read them with their own tokens. What the database holds, and what it refuses,
is checked with direct connections as the superuser, the owner and the runtime role.
Each test works in fresh tenants, so tests never see each other's events.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2
from towerco.audit.v1 import audit_log_service_pb2 as pb
from towerco.audit.v1 import audit_log_service_pb2_grpc as pb_grpc

from deploy.local.stack import Stack
from services.audit.hash_chain import canonical_json

from .support import RichError, bearer, expect_error
from .support.errors import expect_refusal
from .support.metadata import Metadata

DOMAIN = "towerco.audit.v1.AuditLogService"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
#: Retention tests date their old events in 2001; no other test writes events that old.
OLD = datetime(2001, 3, 1, tzinfo=UTC)


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def event(tenant: str, action: str = "sites.create", resource: str = "sites/TWR-1", **fields: Any) -> pb.AuditEvent:
    """A valid event of ``tenant`` with a fresh event_id; ``fields`` override or add."""
    details = fields.pop("details", None)
    message = pb.AuditEvent(
        event_id=str(uuid.uuid4()), tenant_id=tenant, user_id="user-1", action=action, resource=resource,
        ip_address="192.0.2.10", request_id="req-1", outcome="OK",
    )  # fmt: skip
    for name, value in fields.items():
        if isinstance(value, timestamp_pb2.Timestamp):
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    if details is not None:
        message.details.update(details)
    return message


@dataclass
class Writer:
    """WriteEvents as the platform's services call it: with a service token."""

    stub: pb_grpc.AuditLogServiceStub
    md: Metadata

    def write(self, events: Iterable[pb.AuditEvent]) -> int:
        return self.stub.WriteEvents(pb.WriteEventsRequest(events=list(events)), metadata=self.md, timeout=10).written

    def fails(self, events: Iterable[pb.AuditEvent], code: grpc.StatusCode, reason: str) -> RichError:
        request = pb.WriteEventsRequest(events=list(events))
        return expect_refusal(self.stub.WriteEvents, request, self.md, code, reason, DOMAIN)


@dataclass
class Reader:
    """One caller's view of ListEvents and VerifyChain."""

    stub: pb_grpc.AuditLogServiceStub
    md: Metadata

    def page(self, page_size: int = 0, page_token: str = "", **filters: Any) -> pb.ListEventsResponse:
        request = pb.ListEventsRequest(page_size=page_size, page_token=page_token)
        for name, value in filters.items():
            if isinstance(value, datetime):
                getattr(request, name).CopyFrom(ts(value))
            else:
                setattr(request, name, value)
        return self.stub.ListEvents(request, metadata=self.md, timeout=10)

    def all(self, page_size: int = 500, **filters: Any) -> list[pb.AuditEvent]:
        """Every matching event, following next_page_token to the end."""
        events: list[pb.AuditEvent] = []
        token = ""
        while True:
            response = self.page(page_size, token, **filters)
            events.extend(response.events)
            token = response.next_page_token
            if not token:
                return events

    def sequences(self, **filters: Any) -> list[int]:
        return [e.sequence for e in self.all(**filters)]

    def verify(self, tenant: str = "") -> pb.VerifyChainResponse:
        return self.stub.VerifyChain(pb.VerifyChainRequest(tenant_id=tenant), metadata=self.md, timeout=30)

    def fails(self, method: str, request: Any, code: grpc.StatusCode, reason: str) -> RichError:
        return expect_refusal(getattr(self.stub, method), request, self.md, code, reason, DOMAIN)


@pytest.fixture
def writer(audit: pb_grpc.AuditLogServiceStub, service_token: Callable[..., str]) -> Writer:
    return Writer(audit, bearer(service_token(service="sites")))


@pytest.fixture
def reader(audit: pb_grpc.AuditLogServiceStub, token: Callable[..., str]) -> Callable[..., Reader]:
    """``reader(tenant, role="admin")``: that tenant's user (admins hold audit.read)."""

    def make(tenant: str, role: str = "admin", header: str | None = None) -> Reader:
        return Reader(audit, bearer(token(tenant, role=role), header))

    return make


@pytest.fixture
def platform_reader(audit: pb_grpc.AuditLogServiceStub, platform_token: str) -> Reader:
    return Reader(audit, bearer(platform_token))


@pytest.fixture
async def audit_app(stack: Stack) -> AsyncIterator[asyncpg.Connection[Any]]:
    """A raw connection as the audit service's runtime role."""
    dsn = stack.runtime_dsn("audit")
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT current_user") == "audit_app"
        yield conn
    finally:
        await conn.close()


async def stored(admin: asyncpg.Connection[Any], tenant: str) -> list[dict[str, Any]]:
    """Every stored event of ``tenant`` in sequence order (read as the superuser)."""
    rows = await admin.fetch("SELECT * FROM audit.events WHERE tenant_id = $1 ORDER BY sequence", tenant)
    return [dict(row) for row in rows]


def unregistered() -> str:
    """A tenant id the registry does not know: its log holds only what the test writes there."""
    return f"tx_{uuid.uuid4().hex[:10]}"


async def settle(admin: asyncpg.Connection[Any], *tenants: str) -> list[int]:
    """Wait until the platform's own events about ``tenants`` (their provisioning, refusals)
    have left every outbox for the audit log; return how many events each log holds."""
    deadline = time.monotonic() + 30
    while True:
        pending = [
            await admin.fetchval(f"SELECT count(*) FROM {schema}.audit_outbox WHERE tenant_id = ANY($1)", list(tenants))
            for schema in ("tenant", "sites", "audit")
        ]
        if not any(pending):
            break
        assert time.monotonic() < deadline, f"audit outboxes not drained: {pending}"
        await asyncio.sleep(0.05)
    return [await admin.fetchval("SELECT count(*) FROM audit.events WHERE tenant_id = $1", t) for t in tenants]


@dataclass
class Log:
    """A fresh, provisioned tenant whose log holds ``base`` events (its provisioning) and no more to come."""

    tenant: str
    base: int


@pytest.fixture
async def logs(tenant_pair: tuple[str, str], admin: asyncpg.Connection[Any]) -> tuple[Log, Log]:
    counts = await settle(admin, *tenant_pair)
    assert all(count >= 1 for count in counts)  # CreateTenant is itself audited
    return Log(tenant_pair[0], counts[0]), Log(tenant_pair[1], counts[1])


async def tamper(admin: asyncpg.Connection[Any], sql: str, *args: Any) -> None:
    """Change stored events behind the service's back, as a superuser who turns the guard off."""
    async with admin.transaction():
        await admin.execute("ALTER TABLE audit.events DISABLE TRIGGER events_append_only")
        await admin.execute(sql, *args)
        await admin.execute("ALTER TABLE audit.events ENABLE ALWAYS TRIGGER events_append_only")


async def become(admin: asyncpg.Connection[Any], role: str, tenant: str) -> None:
    """In ``admin``'s transaction: act as ``role`` (if any) with ``tenant`` bound, so RLS shows its rows."""
    if role:
        await admin.execute(f"SET LOCAL ROLE {role}")
    await admin.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant)
    assert await admin.fetchval("SELECT count(*) FROM audit.events WHERE tenant_id = $1", tenant) > 0


def documented_hash(e: pb.AuditEvent) -> str:
    """The hash as the proto and hash_chain.py document it, computed independently of the service.

    For details without integral numbers, RFC 8785 bytes are exactly what ``json.dumps``
    writes with sorted keys, no spaces and UTF-8 text.
    """
    members = {
        "action": e.action,
        "create_time": e.create_time.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "details": json_format.MessageToDict(e.details),
        "event_id": e.event_id,
        "ip_address": e.ip_address,
        "outcome": e.outcome,
        "prev_hash": e.prev_hash,
        "request_id": e.request_id,
        "resource": e.resource,
        "sequence": e.sequence,
        "tenant_id": e.tenant_id,
        "user_id": e.user_id,
    }
    encoded = json.dumps(members, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode("utf-8")).hexdigest()


# --- Writing and reading -----------------------------------------------------------------


DETAILS = {"name": "Soweto Monopole", "fields": ["name", "location"], "power": {"kw": 12.5}, "ok": True}


@dataclass(frozen=True)
class WrittenPair:
    """Two events written in one call to a fresh tenant's log, as ListEvents gives them back."""

    sent: pb.AuditEvent  # every field set, output-only ones too
    written: int
    base: int  # the tenant's events before (its provisioning)
    oldest: pb.AuditEvent  # the full event, read back
    newest: pb.AuditEvent  # the least an event needs, read back
    earlier: list[pb.AuditEvent]
    before: datetime
    after: datetime


@pytest.fixture(scope="module")
def written_pair(audit, service_token, token, admin_dsn) -> WrittenPair:
    """Written once for the tests of what a written event lists back as (each reads one part)."""
    tenant = f"ta_{uuid.uuid4().hex[:10]}"
    md = bearer(token(tenant))  # provisions the tenant

    async def settled() -> int:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(admin_dsn)
        try:
            (count,) = await settle(conn, tenant)
        finally:
            await conn.close()
        return count

    base = asyncio.run(settled())
    assert base >= 1  # CreateTenant is itself audited
    first = event(
        tenant, user_id="user-17", action="sites.update", resource="sites/TWR-A-0100", details=DETAILS,
        ip_address="2001:db8:0:0:0:0:0:1", request_id="0b7c-1", outcome="FAILED_PRECONDITION",
        create_time=timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=123_456_789),
        # Output only: ignored on input.
        sequence=99, prev_hash="f" * 64, hash="e" * 64,
    )  # fmt: skip
    # The least an event needs: no event_id, no create_time, no user or resource.
    second = pb.AuditEvent(tenant_id=tenant, action="/towerco.sites.v1.SiteService/DeleteSite", outcome="NOT_FOUND")
    before = datetime.now(UTC) - timedelta(seconds=1)
    count = Writer(audit, bearer(service_token(service="sites"))).write([first, second])
    after = datetime.now(UTC) + timedelta(seconds=1)
    newest, oldest, *earlier = Reader(audit, md).all()  # newest first
    return WrittenPair(first, count, base, oldest, newest, earlier, before, after)


def test_written_events_are_counted_and_listed_after_the_tenants_earlier_ones(written_pair):
    assert written_pair.written == 2
    assert len(written_pair.earlier) == written_pair.base


def test_a_written_event_lists_back_with_every_field_it_was_sent(written_pair):
    oldest = written_pair.oldest
    assert oldest.event_id == written_pair.sent.event_id
    assert oldest.tenant_id == written_pair.sent.tenant_id
    assert (oldest.user_id, oldest.action, oldest.resource) == ("user-17", "sites.update", "sites/TWR-A-0100")
    assert json_format.MessageToDict(oldest.details) == DETAILS
    assert (oldest.request_id, oldest.outcome) == ("0b7c-1", "FAILED_PRECONDITION")


def test_a_written_ip_address_is_stored_in_its_normalized_form(written_pair):
    assert written_pair.oldest.ip_address == "2001:db8::1"


def test_a_written_create_time_is_the_callers_to_the_microsecond(written_pair):
    # When the change happened is the caller's time, to the microsecond the database keeps.
    oldest = written_pair.oldest
    assert (oldest.create_time.seconds, oldest.create_time.nanos) == (1_700_000_000, 123_456_000)


def test_output_only_chain_fields_sent_are_ignored_and_the_event_is_chained_to_the_last(written_pair):
    oldest = written_pair.oldest
    assert (oldest.sequence, oldest.prev_hash) == (written_pair.base + 1, written_pair.earlier[0].hash)
    assert oldest.hash == documented_hash(oldest)


def test_an_event_without_id_time_user_or_resource_gets_an_id_and_the_time_it_was_received(written_pair):
    newest = written_pair.newest
    assert str(uuid.UUID(newest.event_id)) == newest.event_id  # assigned by the service
    assert (newest.user_id, newest.resource, newest.ip_address, newest.request_id) == ("", "", "", "")
    assert newest.action == "/towerco.sites.v1.SiteService/DeleteSite"
    assert not newest.details.fields
    # unset: when it was received
    assert written_pair.before <= newest.create_time.ToDatetime(tzinfo=UTC) <= written_pair.after


def test_the_second_event_of_a_write_is_chained_to_the_first(written_pair):
    newest, oldest = written_pair.newest, written_pair.oldest
    assert (newest.sequence, newest.prev_hash) == (written_pair.base + 2, oldest.hash)
    assert newest.hash == documented_hash(newest)
    assert newest.hash != oldest.hash


async def test_a_tenants_first_event_starts_its_chain(writer, admin):
    tenant = unregistered()
    assert writer.write([event(tenant, resource=f"sites/S-{i}") for i in range(3)]) == 3
    rows = await stored(admin, tenant)
    assert [(r["sequence"], r["prev_hash"]) for r in rows] == [
        (1, ""), (2, rows[0]["hash"]), (3, rows[1]["hash"]),
    ]  # fmt: skip
    assert len({r["hash"] for r in rows}) == 3


async def test_rewriting_stored_event_ids_writes_nothing_new(writer, reader, admin, logs):
    tenant, base = logs[0].tenant, logs[0].base
    batch = [event(tenant, resource=f"sites/S-{i}") for i in range(3)]
    assert writer.write(batch) == 3
    assert writer.write(batch) == 0  # a retried delivery
    fresh = event(tenant, resource="sites/S-new")
    # One already stored, one new, and the new one twice in the same batch: the first counts.
    assert writer.write([batch[1], fresh, fresh]) == 1
    mine = reader(tenant).all(action="sites.create")
    assert [e.sequence for e in mine] == [base + 4, base + 3, base + 2, base + 1]
    assert [e.event_id for e in mine] == [fresh.event_id, *(e.event_id for e in reversed(batch))]
    assert reader(tenant).verify() == pb.VerifyChainResponse(valid=True, events_checked=base + 4)
    # Idempotency is per tenant: the same event_id in another tenant's log is another event.
    other = unregistered()
    assert writer.write([event(other, event_id=batch[0].event_id)]) == 1
    assert [str(r["event_id"]) for r in await stored(admin, other)] == [batch[0].event_id]


async def test_a_batch_with_one_invalid_event_writes_nothing(writer, admin):
    tenant_a, tenant_b = unregistered(), unregistered()
    batch = [
        event(tenant_a),
        event(tenant_b),
        event(tenant_a),
        event(tenant_a, outcome="DENIED"),  # not a gRPC status code name
        event(tenant_b, ip_address="999.0.0.1"),
    ]
    err = writer.fails(batch, INVALID, "INVALID_ARGUMENT")
    assert err.fields == ["events[3].outcome", "events[4].ip_address"]
    assert await stored(admin, tenant_a) == []
    assert await stored(admin, tenant_b) == []
    # The same batch without the bad events is written whole, to both tenants, in order.
    assert writer.write(batch[:3]) == 3
    assert [str(r["event_id"]) for r in await stored(admin, tenant_a)] == [batch[0].event_id, batch[2].event_id]
    assert [str(r["event_id"]) for r in await stored(admin, tenant_b)] == [batch[1].event_id]


BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("event_id", {"event_id": "not-a-uuid"}),
    ("tenant_id", {"tenant_id": ""}),
    ("tenant_id", {"tenant_id": "Tenant A"}),
    ("user_id", {"user_id": "u" * 129}),
    ("action", {"action": ""}),
    ("action", {"action": "DROP TABLE events"}),
    ("action", {"action": "sites." + "x" * 251}),
    ("resource", {"resource": "r" * 257}),
    ("resource", {"resource": "sites/one\nsites/two"}),
    ("details", {"details": {"blob": "x" * (16 * 1024)}}),
    ("details", {"details": {"bad": "nul\x00inside"}}),
    ("ip_address", {"ip_address": "localhost"}),
    ("request_id", {"request_id": "q" * 129}),
    ("outcome", {"outcome": ""}),
    ("outcome", {"outcome": "ok"}),
    ("create_time", {"create_time": timestamp_pb2.Timestamp(seconds=253_402_300_800)}),
]


@pytest.mark.parametrize(("field", "change"), BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_FIELDS)])
async def test_each_broken_rule_is_named_with_its_event(writer, admin, field, change):
    tenant = unregistered()
    batch = [event(tenant), event(tenant), event(tenant, **change)]
    err = writer.fails(batch, INVALID, "INVALID_ARGUMENT")
    assert err.fields == [f"events[2].{field}"]
    assert await stored(admin, tenant) == []


def test_a_batch_needs_one_to_five_hundred_events(writer):
    tenant = unregistered()
    assert writer.fails([], INVALID, "INVALID_ARGUMENT").fields == ["events"]
    assert writer.fails([event(tenant) for _ in range(501)], INVALID, "INVALID_ARGUMENT").fields == ["events"]
    # Every event of a full batch broken: the first violations are named, the rest counted.
    err = writer.fails(
        [event(tenant, outcome="DENIED", ip_address="x") for _ in range(500)], INVALID, "INVALID_ARGUMENT"
    )
    assert err.fields == [f"events[{i // 2}].{('ip_address', 'outcome')[i % 2]}" for i in range(20)] + ["events"]
    assert writer.write([event(tenant, resource=f"sites/S-{i}") for i in range(500)]) == 500


async def test_end_user_tokens_cannot_write_events(audit, token, platform_token, admin, tenant_pair):
    tenant = unregistered()
    batch = pb.WriteEventsRequest(events=[event(tenant)])
    for md in (bearer(token(tenant_pair[0], role="admin")), bearer(platform_token)):
        err = expect_error(audit.WriteEvents, batch, metadata=md)
        assert (err.code, err.reason) == (DENIED, "SERVICE_IDENTITY_REQUIRED"), err
    err = expect_error(audit.WriteEvents, batch)
    assert err.code == grpc.StatusCode.UNAUTHENTICATED, err
    assert await stored(admin, tenant) == []


# --- Reading: own tenant only, filtered, paginated ------------------------------------


def test_tenant_b_cannot_list_or_find_tenant_a_events(writer, reader, logs):
    tenant_a, tenant_b = logs[0].tenant, logs[1].tenant
    secret = {"action": "sites.delete", "resource": "sites/A-SECRET", "user_id": "alice"}
    writer.write([event(tenant_a, **secret) for _ in range(3)] + [event(tenant_b, resource="sites/B-1")])
    a, b = reader(tenant_a), reader(tenant_b)
    assert len(a.all(**secret)) == 3  # so the filters below would find them if they leaked

    own = b.all()
    assert len(own) == logs[1].base + 1
    assert {e.tenant_id for e in own} == {tenant_b}
    assert "sites/B-1" in {e.resource for e in own}
    for name, value in secret.items():
        assert b.all(**{name: value}) == []
    assert b.all(**secret) == []
    # Naming tenant_a in the header is a cross-tenant attempt, refused.
    reader(tenant_b, header=tenant_a).fails("ListEvents", pb.ListEventsRequest(), DENIED, "CROSS_TENANT_DENIED")
    # A page token of tenant_a's grants tenant_b nothing.
    page = a.page(1, **secret)
    assert page.next_page_token
    b.fails(
        "ListEvents",
        pb.ListEventsRequest(
            page_size=1, page_token=page.next_page_token, action="sites.delete", resource="sites/A-SECRET",
            user_id="alice",
        ),
        INVALID,
        "INVALID_PAGE_TOKEN",
    )  # fmt: skip


def test_listing_needs_audit_read(reader, tenant_pair):
    tenant, _ = tenant_pair
    reader(tenant, role="viewer").fails("ListEvents", pb.ListEventsRequest(), DENIED, "PERMISSION_MISSING")
    reader(tenant, role="viewer").fails("VerifyChain", pb.VerifyChainRequest(), DENIED, "PERMISSION_MISSING")


def test_filters_and_pages_go_newest_first_without_gaps_or_repeats(writer, reader, logs):
    tenant, base = logs[0].tenant, logs[0].base
    start = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    actions = ("sites.create", "sites.update", "sites.delete")
    writer.write(
        event(
            tenant,
            action=actions[i % 3],
            resource=f"sites/S-{i % 5}",
            user_id=f"user-{i % 4}",
            create_time=ts(start + timedelta(minutes=i)),
        )
        for i in range(30)
    )

    def seq(i: int) -> int:  # the sequence of the i-th event written above
        return int(base) + i + 1

    api = reader(tenant)
    pages: list[list[int]] = []
    token = ""
    while True:
        response = api.page(7, token)
        pages.append([e.sequence for e in response.events])
        if len(pages) == 2:
            # Events appended while paging are newer than the cursor: no page shows them.
            writer.write([event(tenant) for _ in range(3)])
        token = response.next_page_token
        if not token:
            break
    assert [s for p in pages for s in p] == list(range(seq(29), 0, -1))
    assert all(len(p) == 7 for p in pages[:-1]) and 1 <= len(pages[-1]) <= 7
    assert api.page().events[0].sequence == seq(32)  # page_size 0: the default, 50

    def expected(keep: Callable[[int], bool]) -> list[int]:
        return [seq(i) for i in reversed(range(30)) if keep(i)]

    assert api.sequences(action="sites.update") == expected(lambda i: i % 3 == 1)
    assert [e.sequence for e in api.all(page_size=2, action="sites.update")] == expected(lambda i: i % 3 == 1)
    assert api.sequences(resource="sites/S-2", user_id="user-2") == expected(lambda i: i % 5 == 2 and i % 4 == 2)
    assert api.sequences(user_id="user-3", action="sites.create") == expected(lambda i: i % 4 == 3 and i % 3 == 0)
    window = {"start_time": start + timedelta(minutes=10), "end_time": start + timedelta(minutes=20)}
    assert api.sequences(**window) == expected(lambda i: 10 <= i < 20)  # start inclusive, end exclusive
    # From minute 25 on: those events, the three written since (now), and the tenant's provisioning (now).
    assert api.sequences(start_time=start + timedelta(minutes=25)) == [
        seq(32), seq(31), seq(30), *expected(lambda i: i >= 25), *range(base, 0, -1)
    ]  # fmt: skip
    assert api.sequences(end_time=start + timedelta(minutes=2)) == [seq(1), seq(0)]
    assert api.sequences(action="sites.none") == []

    # A token only continues the query it was issued for.
    token = api.page(2, action="sites.update").next_page_token
    api.fails(
        "ListEvents", pb.ListEventsRequest(page_size=2, page_token=token, action="sites.create"),
        INVALID, "INVALID_PAGE_TOKEN",
    )  # fmt: skip
    api.fails("ListEvents", pb.ListEventsRequest(page_token=token + "x"), INVALID, "INVALID_PAGE_TOKEN")
    negative = pb.ListEventsRequest(page_size=-1)
    assert api.fails("ListEvents", negative, INVALID, "INVALID_ARGUMENT").fields == ["page_size"]
    empty_range = pb.ListEventsRequest(start_time=ts(start), end_time=ts(start))
    assert api.fails("ListEvents", empty_range, INVALID, "INVALID_ARGUMENT").fields == ["end_time"]


# --- Append-only in the database ---------------------------------------------------------


async def test_runtime_role_cannot_update_delete_or_truncate_events(writer, audit_app, admin):
    tenant = unregistered()
    writer.write([event(tenant), event(tenant)])
    before = await stored(admin, tenant)
    async with audit_app.transaction():
        await audit_app.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant)
        assert await audit_app.fetchval("SELECT count(*) FROM audit.events") == 2  # it reads its tenant's rows
    for sql in (
        "UPDATE audit.events SET outcome = 'OK' WHERE tenant_id = $1",
        "DELETE FROM audit.events WHERE tenant_id = $1",
    ):
        async with audit_app.transaction():
            await audit_app.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for table events"):
                await audit_app.execute(sql, tenant)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for table events"):
        await audit_app.execute("TRUNCATE audit.events")
    # Nor can it become the retention role or call the purge.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await audit_app.execute("SET ROLE audit_retention")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for function purge_events"):
        await audit_app.fetchval("SELECT audit.purge_events(now(), $1)", tenant)
    assert await stored(admin, tenant) == before


async def test_owner_and_superuser_cannot_update_delete_or_truncate_events(writer, reader, admin, logs):
    tenant, base = logs[0].tenant, logs[0].base
    writer.write([event(tenant) for _ in range(3)])
    before = await stored(admin, tenant)
    refusals = {
        "UPDATE audit.events SET details = '{\"x\": 1}' WHERE tenant_id = $1 AND sequence = $2": "UPDATE",
        "DELETE FROM audit.events WHERE tenant_id = $1 AND sequence = $2": "DELETE",
    }
    for role in ("", "audit_owner"):  # the superuser itself, then the owner of the table
        for sql, op in refusals.items():
            async with admin.transaction():
                await become(admin, role, tenant)
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match=f"append-only: {op}"):
                    await admin.execute(sql, tenant, base + 2)
        async with admin.transaction():
            await become(admin, role, tenant)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only: TRUNCATE"):
                await admin.execute("TRUNCATE audit.events")
    # The guard fires in replication mode too (ENABLE ALWAYS), where ordinary triggers do not.
    async with admin.transaction():
        await admin.execute("SET LOCAL session_replication_role = replica")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only: DELETE"):
            await admin.execute("DELETE FROM audit.events WHERE tenant_id = $1", tenant)
    assert await stored(admin, tenant) == before
    assert reader(tenant).verify() == pb.VerifyChainResponse(valid=True, events_checked=base + 3)


async def test_retention_purge_works_only_as_the_retention_role(writer, reader, admin, provision):
    # Old events first, then the tenant is provisioned (its CreateTenant event comes after them).
    tenant = f"tr_{uuid.uuid4().hex[:10]}"
    writer.write([*(event(tenant, create_time=ts(OLD + timedelta(days=i))) for i in range(3)), event(tenant)])
    provision(tenant)
    assert await settle(admin, tenant) == [5]
    all_old = unregistered()
    writer.write([event(all_old, create_time=ts(OLD)) for _ in range(3)])
    cutoff = OLD + timedelta(days=30)
    purge = "SELECT audit.purge_events($1, $2)"

    for role in ("", "audit_owner"):  # the superuser and the owner are refused like anyone
        async with admin.transaction():
            await become(admin, role, tenant)
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only: DELETE"):
                await admin.fetchval(purge, cutoff, tenant)
    assert [r["sequence"] for r in await stored(admin, tenant)] == [1, 2, 3, 4, 5]

    async with admin.transaction():
        await admin.execute("SET LOCAL ROLE audit_retention")
        assert await admin.fetchval(purge, cutoff, tenant) == 3
        assert await admin.fetchval(purge, cutoff, all_old) == 2  # the newest event always stays
    async with admin.transaction():  # the retention role deletes, and nothing else
        await admin.execute("SET LOCAL ROLE audit_retention")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for table events"):
            await admin.execute("UPDATE audit.events SET outcome = 'OK' WHERE tenant_id = $1", tenant)
    assert [r["sequence"] for r in await stored(admin, tenant)] == [4, 5]
    assert [r["sequence"] for r in await stored(admin, all_old)] == [3]

    # The rest of the chain still verifies, from the first remaining event, and grows on.
    assert reader(tenant).verify() == pb.VerifyChainResponse(valid=True, events_checked=2)
    writer.write([event(tenant)])
    writer.write([event(all_old)])
    assert reader(tenant).sequences() == [6, 5, 4]
    assert reader(tenant).verify() == pb.VerifyChainResponse(valid=True, events_checked=3)
    assert [r["sequence"] for r in await stored(admin, all_old)] == [3, 4]

    # A purge that leaves a hole in the chain is found out.
    async with admin.transaction():
        await admin.execute("SET LOCAL ROLE audit_retention")
        await admin.execute("DELETE FROM audit.events WHERE tenant_id = $1 AND sequence = 5", tenant)
    assert reader(tenant).verify() == pb.VerifyChainResponse(valid=False, events_checked=2, first_invalid_sequence=6)


# --- Tamper evidence ------------------------------------------------------------------


async def test_verify_chain_reports_the_first_altered_sequence(writer, reader, admin, provision):
    edited, rehashed, removed = (f"tv_{uuid.uuid4().hex[:10]}" for _ in range(3))
    for tenant in (edited, rehashed, removed):
        writer.write([event(tenant, resource=f"sites/S-{i}", details={"n": f"{i}"}) for i in range(6)])
        provision(tenant)  # its CreateTenant event becomes sequence 7
    assert await settle(admin, edited, rehashed, removed) == [7, 7, 7]
    for tenant in (edited, rehashed, removed):
        assert reader(tenant).verify() == pb.VerifyChainResponse(valid=True, events_checked=7)

    # A detail changed, its hash left as it was: that event's hash no longer matches.
    changed = 'UPDATE audit.events SET details = \'{"n": "999"}\' WHERE tenant_id = $1 AND sequence = 3'
    await tamper(admin, changed, edited)
    assert reader(edited).verify() == pb.VerifyChainResponse(valid=False, events_checked=3, first_invalid_sequence=3)

    # A resource changed and the event re-hashed to match: the next event's prev_hash gives it away.
    (forged,) = reader(rehashed).all(resource="sites/S-3")
    assert forged.sequence == 4
    forged.resource = "sites/S-innocent"
    await tamper(
        admin,
        "UPDATE audit.events SET resource = $2, hash = $3 WHERE tenant_id = $1 AND sequence = 4",
        rehashed,
        forged.resource,
        documented_hash(forged),
    )
    assert reader(rehashed).all(resource="sites/S-innocent")[0].hash == documented_hash(forged)
    assert reader(rehashed).verify() == pb.VerifyChainResponse(valid=False, events_checked=5, first_invalid_sequence=5)

    # An event removed: the sequence has a gap where it was.
    await tamper(admin, "DELETE FROM audit.events WHERE tenant_id = $1 AND sequence = 2", removed)
    assert reader(removed).verify() == pb.VerifyChainResponse(valid=False, events_checked=2, first_invalid_sequence=3)


def test_only_a_platform_admin_verifies_another_tenants_chain(writer, reader, platform_reader, logs):
    (a, a_base), (b, b_base) = (logs[0].tenant, logs[0].base), (logs[1].tenant, logs[1].base)
    writer.write([event(a) for _ in range(4)])
    assert platform_reader.verify(a) == pb.VerifyChainResponse(valid=True, events_checked=a_base + 4)
    assert reader(a).verify(a) == pb.VerifyChainResponse(valid=True, events_checked=a_base + 4)
    assert reader(b).verify() == pb.VerifyChainResponse(valid=True, events_checked=b_base)
    reader(b).fails("VerifyChain", pb.VerifyChainRequest(tenant_id=a), DENIED, "CROSS_TENANT_DENIED")
    unknown = pb.VerifyChainRequest(tenant_id=unregistered())
    platform_reader.fails("VerifyChain", unknown, grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")
    platform_reader.fails("VerifyChain", pb.VerifyChainRequest(tenant_id="Not A Tenant"), INVALID, "INVALID_ARGUMENT")


async def test_a_refused_cross_tenant_call_is_in_the_targets_log(audit, token, reader, admin, logs):
    target, caller = logs[0].tenant, logs[1].tenant
    request_id = f"cross-{uuid.uuid4().hex[:12]}"
    md = bearer(token(caller, sub="mallory@b.example"), None, **{"x-request-id": request_id})
    err = expect_error(audit.VerifyChain, pb.VerifyChainRequest(tenant_id=target), metadata=md)
    assert (err.code, err.reason) == (DENIED, "CROSS_TENANT_DENIED")
    # Tallied for one refusal window, recorded through the audit service's own outbox, then
    # appended like any service's event.
    deadline = time.monotonic() + 15
    while not await admin.fetchval("SELECT count(*) FROM audit.events WHERE request_id = $1", request_id):
        assert time.monotonic() < deadline, "the refusal never reached the audit log"
        await asyncio.sleep(0.05)
    assert await settle(admin, target, caller) == [logs[0].base + 1, logs[1].base]
    rows = await admin.fetch("SELECT * FROM audit.events WHERE request_id = $1", request_id)
    assert [(r["tenant_id"], r["action"], r["outcome"], r["user_id"]) for r in rows] == [
        (target, "security.cross_tenant_denied", "PERMISSION_DENIED", "mallory@b.example")
    ]
    assert caller in json.dumps(rows[0]["details"])
    assert reader(target).verify() == pb.VerifyChainResponse(valid=True, events_checked=logs[0].base + 1)


# --- Concurrency --------------------------------------------------------------------------


async def test_concurrent_writers_for_one_tenant_leave_one_unbroken_chain(
    audit_target, service_token, reader, admin, logs
):
    tenant, base = logs[0].tenant, logs[0].base
    batches = [[event(tenant, resource=f"sites/W{w}-{i}") for i in range(25)] for w in range(8)]
    async with grpc.aio.insecure_channel(audit_target) as channel:
        stub = pb_grpc.AuditLogServiceStub(channel)
        md = bearer(service_token(service="sites"))
        replies = await asyncio.gather(
            *(stub.WriteEvents(pb.WriteEventsRequest(events=b), metadata=md, timeout=30) for b in batches)
        )
    assert [r.written for r in replies] == [25] * 8
    rows = await stored(admin, tenant)
    assert [r["sequence"] for r in rows] == list(range(1, base + 201))
    assert all(row["prev_hash"] == prev["hash"] for prev, row in itertools.pairwise(rows))
    # Each batch went in whole, in its own order: one writer at a time per chain.
    by_id = {str(r["event_id"]): r["sequence"] for r in rows}
    for batch in batches:
        sequences = [by_id[e.event_id] for e in batch]
        assert sequences == list(range(sequences[0], sequences[0] + 25))
    assert reader(tenant).verify() == pb.VerifyChainResponse(valid=True, events_checked=base + 200)


async def test_concurrent_batches_spanning_tenants_do_not_deadlock(audit_target, service_token, reader, logs):
    tenants = (logs[0].tenant, logs[1].tenant)
    # Half the batches name tenant_b first: locking in request order would deadlock them.
    batches = [[event(tenants[(i + w) % 2], resource=f"sites/X{w}-{i}") for i in range(10)] for w in range(8)]
    async with grpc.aio.insecure_channel(audit_target) as channel:
        stub = pb_grpc.AuditLogServiceStub(channel)
        md = bearer(service_token())
        replies = await asyncio.gather(
            *(stub.WriteEvents(pb.WriteEventsRequest(events=b), metadata=md, timeout=30) for b in batches)
        )
    assert sum(r.written for r in replies) == 80
    for log in logs:
        assert reader(log.tenant).sequences() == list(range(log.base + 40, 0, -1))
        assert reader(log.tenant).verify() == pb.VerifyChainResponse(valid=True, events_checked=log.base + 40)


# --- Schema and encoding ------------------------------------------------------------------


async def test_audit_schema_keeps_the_isolation_rules(admin):
    tables = await admin.fetch(
        """SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'audit' AND c.relkind IN ('r', 'p', 'm', 'f', 'v')"""
    )
    assert {t["relname"] for t in tables} == {"events", "audit_outbox"}
    assert all(t["relrowsecurity"] and t["relforcerowsecurity"] for t in tables)
    first_columns = await admin.fetch(
        """SELECT i.indexrelid::regclass::text AS index, a.attname AS first_column
           FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = t.relnamespace
           LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
           WHERE n.nspname = 'audit'"""
    )
    assert len(first_columns) >= 7
    assert {r["index"]: r["first_column"] for r in first_columns} == {r["index"]: "tenant_id" for r in first_columns}
    privileges = await admin.fetch(
        """SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) p
           WHERE has_table_privilege('audit_app', 'audit.events', p)"""
    )
    assert sorted(r["p"] for r in privileges) == ["INSERT", "SELECT"]
    role = await admin.fetchrow("SELECT rolcanlogin, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1",
                                "audit_retention")  # fmt: skip
    assert role is not None and not any(role.values())


def test_canonical_encoding_is_rfc8785():
    # The examples of RFC 8785 (sections 3.2.2 and 3.2.3, appendix B).
    numbers = [333333333.33333329, 1e30, 4.50, 2e-3, 0.000000000000000000000000001, 1e21, 1e20, 1e-7, -0.0, 5e-324]
    assert canonical_json(numbers) == (
        "[333333333.3333333,1e+30,4.5,0.002,1e-27,1e+21,100000000000000000000,1e-7,0,5e-324]"
    )
    keys = {"\u20ac": 1, "\r": 2, "\ufb33": 3, "1": 4, "\U0001f600": 5, "\x80": 6, "\xf6": 7}
    assert canonical_json(keys) == '{"\\r":2,"1":4,"\x80":6,"\xf6":7,"\u20ac":1,"\U0001f600":5,"\ufb33":3}'
    assert canonical_json({"s": '€$\x0f\nA\'B"\\\\"/', "t": True, "n": None}) == (
        '{"n":null,"s":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/","t":true}'
    )


def test_integral_doubles_beyond_2_53_still_verify(writer, reader, logs):
    # PostgreSQL gives 1e21 and 2^60 back as integers, which RFC 8785 refuses beyond 2^53:
    # the chain hashes them as the doubles they were written as.
    tenant = logs[0].tenant
    details = {"big": 1e21, "pow": float(2**60), "neg": -(2.0**70), "small": 1e-7}
    assert writer.write([event(tenant, resource="sites/BIG-1", details=details)]) == 1
    (stored_event,) = reader(tenant).all(resource="sites/BIG-1")
    assert json_format.MessageToDict(stored_event.details) == details
    assert reader(tenant).verify() == pb.VerifyChainResponse(valid=True, events_checked=logs[0].base + 1)
