"""The ServerApp `flwr run .` loads (`[tool.flwr.app.components]`): securefpt on Flower's own runtime.

The run config names the experiment (`experiment`, `overrides`, `out-dir`). On Flower's
local simulation, every virtual node is an institution's node on this machine: before
the first message this app does what `securefpt run` does before its engine starts
(every node's files, data, labels and model checked; trial nodes written for a local
experiment) and writes the list of node files that the virtual nodes read by partition
id (securefpt/node/config.py). It then checks that Flower started one virtual node per
institution, runs the experiment and prints the result table and the run directory.
On the deployment engine the SuperNodes name their own node.yaml and none of this runs.

`flwr run` exits 0 whatever its ServerApp does (Flower 1.41), and prints a traceback for
an exception; so a run that cannot start or go on ends with its one-line reason instead
(`error: ...`), as `securefpt run` does.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from securefpt.config import load_config
from securefpt.coordinator.app import FederatedPromptAveraging
from securefpt.engines.report import print_summary
from securefpt.engines.simulation import preflight
from securefpt.errors import FederationError, SecureFPTError
from securefpt.node.config import PARTITIONS

app = ServerApp()


def _simulated(grid: Grid) -> bool:
    return type(grid).__name__ == "InMemoryGrid"  # Flower's simulation runtime; deployment uses HttpGrid


def _enough_nodes(grid: Grid, expected: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    started = len(list(grid.get_node_ids()))
    if started < expected:
        raise FederationError(f"Flower's simulation started {started} virtual nodes and this experiment has "
                              f"{expected}: flwr run . --federation-config \"num-supernodes={expected}\"")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from rich.console import Console

    console = Console()
    try:
        overrides = shlex.split(str(context.run_config.get("overrides", "")))
        cfg = load_config(str(context.run_config["experiment"]), overrides)
        out = Path(str(context.run_config.get("out-dir", "runs/flwr")))
        if _simulated(grid):
            cfg, nodes = preflight(cfg, out, None)
            (out / "nodes").mkdir(parents=True, exist_ok=True)
            (out / "nodes" / PARTITIONS).write_text(json.dumps([str(p.resolve()) for p in nodes]), encoding="utf-8")
            _enough_nodes(grid, len(nodes))
        summary = FederatedPromptAveraging(cfg, out, grid, context, show_progress=True).run()
    except SecureFPTError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return
    print_summary(summary, out.resolve(), console)
