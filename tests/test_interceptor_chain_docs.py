"""The README's list of the interceptor chain is the chain: same links, same order (no server needed)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from services.runtime.interceptors.chain import server_chain
from services.runtime.policy import PolicyTable

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- interceptor chain: in the order of server_chain() in services/runtime/interceptors/chain.py -->"
END = "<!-- interceptor chain: end -->"
#: ``7. **cross-tenant** (`CrossTenantInterceptor`): ...``
ITEM = re.compile(r"^(\d+)\. \*\*[^*\n]+\*\* \(`(\w+)`\)", re.MULTILINE)


def _documented() -> list[str]:
    """The classes the README's numbered list names, in its order (numbered 1, 2, ... without a gap)."""
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"README.md must hold the chain between {BEGIN} and {END}"
    section = text[text.index(BEGIN) : text.index(END)]
    items = ITEM.findall(section)
    assert [int(number) for number, _ in items] == list(range(1, len(items) + 1)), "README's chain is misnumbered"
    return [name for _, name in items]


def _chained() -> list[str]:
    """The classes of the links ``server_chain()`` builds, outermost first."""
    required = [p for p in inspect.signature(server_chain).parameters.values() if p.default is p.empty]
    # Only the policies are looked at while the links are made; the other collaborators are held.
    args: dict[str, Any] = {p.name: None for p in required}
    args["policies"] = PolicyTable([])
    return [type(link).__name__ for link in server_chain(**args)]


def test_readme_lists_every_link_of_the_interceptor_chain_in_its_order() -> None:
    assert _documented() == _chained()
