"""`python -m luod.cli`: luoctl without an installed script."""

from __future__ import annotations

import sys

from luod.cli.main import main

sys.exit(main())
