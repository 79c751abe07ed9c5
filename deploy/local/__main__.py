"""``python -m deploy.local``: see :mod:`deploy.local.cli`."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
