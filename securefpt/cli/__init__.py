"""Command line: `securefpt run | demo | predict | study` (cli/runs.py), the operators' and institutions'
subcommands (cli/federation.py: keys, certs, policy, node) and `securefpt audit` (cli/audit.py).

Bad input exits non-zero with a one-line reason on stderr (never a traceback).
"""

from __future__ import annotations

import sys

from securefpt.cli.common import app, err

# each module registers its commands on `app`, in the order `securefpt --help` lists them
# isort: split
from securefpt.cli import runs  # noqa: F401, E402

# isort: split
from securefpt.cli import federation  # noqa: F401, E402

# isort: split
from securefpt.cli import audit  # noqa: F401, E402

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
