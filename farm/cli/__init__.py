"""`farm`: the command line. ``farm.cli:main`` is the console script; ``python -m farm.cli`` runs it too.

The top layer of farm: each subcommand module parses its flags and calls the orchestration, work, plan
and core layers below it (docs/architecture.md); none of those imports anything from here.
"""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
