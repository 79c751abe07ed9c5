"""The identifier rules several places obey, each defined once.

A rule is a first character, the characters after it and a length range; from that come
the regex the services check with, the text their errors and the protos quote, and the
Lua pattern the gateway renders (``gateway/config.py``). The SQL CHECK constraints of
migrations already shipped cannot be rendered, so ``tests/test_rules_once.py`` checks
them, the proto comments and the README against these definitions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class IdRule:
    """An identifier: one character of ``first``, then characters of ``rest``.

    ``first`` and ``rest`` are the bodies of regex character classes (``a-z0-9_-``);
    the lengths count the whole identifier.
    """

    first: str
    rest: str
    min_length: int
    max_length: int
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))

    @property
    def pattern(self) -> str:
        """The regex text, as errors, protos, SQL CHECKs and the README quote it."""
        if self.first == self.rest:
            return f"^[{self.rest}]{{{self.min_length},{self.max_length}}}$"
        return f"^[{self.first}][{self.rest}]{{{self.min_length - 1},{self.max_length - 1}}}$"

    @property
    def problem(self) -> str:
        """What a field violation says of a value that breaks the rule."""
        return f"must match {self.pattern}"

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None


#: Tenant ids are slugs, also the tenant's sub-domain; validated before any use (header,
#: token claim, request field, gateway Host).
TENANT_ID = IdRule(first="a-z", rest="a-z0-9_-", min_length=3, max_length=50)

#: A database cell's name (``CELLS``), stored on each tenant's registry record.
CELL_NAME = IdRule(first="a-z", rest="a-z0-9_-", min_length=1, max_length=32)

#: A client's request id: ``x-request-id`` (kept when it matches, by the services and the
#: gateway) and the idempotency key ``request_id`` of creates.
REQUEST_ID = IdRule(first="A-Za-z0-9._:-", rest="A-Za-z0-9._:-", min_length=1, max_length=64)

#: A tenant's custom role (UserService.CreateRole), never a built-in role's name.
ROLE_ID = IdRule(first="a-z", rest="a-z0-9_-", min_length=3, max_length=32)
