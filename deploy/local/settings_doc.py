"""``python -m deploy.local.settings_doc``: the README's configuration and metrics tables, from the declarations.

Every environment variable is declared once, in the table of each kind of process that reads
it (:data:`services.runtime.settings.SERVICE_SETTINGS`, :data:`gateway.config.GATEWAY_SETTINGS`,
:data:`deploy.local.stack.DEV_STACK_SETTINGS`). This writes them as one Markdown table
between the markers in README.md (``make settings-doc``); ``--check`` only says whether the
README is current, and a test fails when it is not. The metrics table is made the same way
from the metrics declared in :mod:`services.runtime.metrics`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config import GATEWAY_SETTINGS
from services.runtime import metrics
from services.runtime.environment import SettingsTable, markdown_table, with_table
from services.runtime.settings import SERVICE_SETTINGS

from .stack import DEV_STACK_SETTINGS

README = Path(__file__).resolve().parents[2] / "README.md"
#: Every kind of process, in the order of the README's "read by" column.
PROCESS_SETTINGS: tuple[SettingsTable, ...] = (SERVICE_SETTINGS, GATEWAY_SETTINGS, DEV_STACK_SETTINGS)


def current_readme(readme: str) -> str:
    """``readme`` with its configuration and metrics tables made from the declarations."""
    return metrics.with_table(with_table(readme, markdown_table(PROCESS_SETTINGS)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.settings_doc", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if README.md is not current; change nothing")
    args = parser.parse_args(argv)
    text = README.read_text()
    wanted = current_readme(text)
    if wanted == text:
        return 0
    if args.check:
        print("README.md's configuration or metrics table is out of date: run `make settings-doc`", file=sys.stderr)
        return 1
    README.write_text(wanted)
    print("README.md: configuration and metrics tables rewritten from the declarations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
