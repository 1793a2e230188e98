"""The embedded default under its demo federation: what `securefpt demo` and `flwr run .` both run.

The packaged experiment (securefpt/configs/demo.yaml) names no federation; the demo adds
the `policy`, `clients` and `server_key` of a demo federation made once with `securefpt
keys demo` in $SECUREFPT_HOME/demo-federation, so the demo's residency policy binds both
ways of starting it (Hausa's DP rules, Yoruba's region excluded).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable, Optional

DEMO = "demo"  # the run config's `experiment` for the embedded default (pyproject.toml)


def demo_config() -> Path:
    return Path(str(resources.files("securefpt") / "configs" / "demo.yaml"))


def demo_overrides(announce: Optional[Callable[[str], None]] = None) -> list[str]:
    """The demo federation's `--set` overrides; the federation is made on first use."""
    from securefpt.home import securefpt_home
    from securefpt.operators.keys import make_federation

    federation = securefpt_home() / "demo-federation"
    if not (federation / "coordinator" / "audit.key").is_file():
        make_federation(federation)
        if announce is not None:
            announce(f"made the demo federation in {federation} (securefpt keys demo)")
    return [f"policy={federation / 'policies' / 'masakhanews.yaml'}", f"clients={federation / 'clients'}",
            f"server_key={federation / 'coordinator' / 'audit.key'}"]
