"""``python -m katydid`` is the ``katydid`` command."""

from __future__ import annotations

import sys

from katydid.cli import main

sys.exit(main())
