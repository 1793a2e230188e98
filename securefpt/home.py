"""The operator's own folder: keys, demo federations and converted models (never inside a run directory)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "SECUREFPT_HOME"


def securefpt_home() -> Path:
    """`$SECUREFPT_HOME`, else `~/.securefpt`."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".securefpt")
