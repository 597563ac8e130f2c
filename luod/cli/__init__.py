"""luoctl: drive and inspect luod from a shell.

luoctl is a client like any other: it talks to luod only through
luod.client (and sd_notify, for handback), never to luod's insides.
Modules: main (the parser and main(), the `luoctl` entry point),
common (reaching luod, exit statuses, output formatting), and one module
per group of commands: custody, status, update, handback.
"""

from __future__ import annotations

from luod.cli.main import main

__all__ = ["main"]
