"""Helpers the tests share, one module per topic; the names are re-exported here so that
``from .support import bearer`` reads the same wherever a test needs one."""

from __future__ import annotations

from .errors import RichError, assert_catalogued, expect_error, expect_refusal, rich_error
from .metadata import bearer
from .ports import free_port

__all__ = ["RichError", "assert_catalogued", "bearer", "expect_error", "expect_refusal", "free_port", "rich_error"]
