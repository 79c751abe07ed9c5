"""Reading a failed call's rich error details, each ErrorInfo held to the error catalogue."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.runtime import error_catalogue


@dataclass
class RichError:
    """A failed call's status code and its google.rpc details."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo | None
    bad_request: error_details_pb2.BadRequest | None
    retry: error_details_pb2.RetryInfo | None

    @property
    def reason(self) -> str:
        return self.info.reason if self.info else ""

    @property
    def fields(self) -> list[str]:
        return [v.field for v in self.bad_request.field_violations] if self.bad_request else []


def rich_error(error: grpc.RpcError) -> RichError:
    call: Any = error
    status = rpc_status.from_call(call)
    if status is not None:
        assert_catalogued(status)
    info = bad = retry = None
    for detail in status.details if status else ():
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                if isinstance(message, error_details_pb2.ErrorInfo):
                    info = message
                elif isinstance(message, error_details_pb2.BadRequest):
                    bad = message
                else:
                    retry = message
    return RichError(call.code(), call.details() or "", info, bad, retry)


def assert_catalogued(status: status_pb2.Status) -> None:
    """Fails the test that received ``status`` if its ErrorInfo reason is not in the error
    catalogue (ErrorReason), or came with another code, metadata keys or RetryInfo than the
    catalogue's entry says."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            code = next(c for c in grpc.StatusCode if c.value[0] == status.code)
            retry = any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
            error_catalogue.check(info.reason, code, info.metadata.keys(), retry)


def expect_error(fn: Any, request: Any, **kwargs: Any) -> RichError:
    """Call ``fn`` and return its rich error; fail the test if it succeeds."""
    try:
        fn(request, timeout=10, **kwargs)
    except grpc.RpcError as error:
        return rich_error(error)
    raise AssertionError(f"{fn} succeeded but an error was expected")


def expect_refusal(fn: Any, request: Any, metadata: Any, code: grpc.StatusCode, reason: str, domain: str) -> RichError:
    """Call ``fn``, which must fail with ``code`` and an ErrorInfo of ``reason`` from ``domain``."""
    err = expect_error(fn, request, metadata=metadata)
    assert err.code == code, err
    assert err.reason == reason, err
    assert err.info is not None and err.info.domain == domain, err
    return err
