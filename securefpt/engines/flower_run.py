"""The ServerApp `flwr run .` loads (`[tool.flwr.app.components]`): securefpt on Flower's own runtime.

The run config names the experiment (`experiment`, `overrides`, `out-dir`); `experiment =
"demo"` (the default) is what `securefpt demo` runs: the embedded default under the demo
federation's residency policy (engines/demo.py). On Flower's
local simulation, every virtual node is an institution's node on this machine: before
the first message this app does what `securefpt run` does before its engine starts
(every node's files, data, labels and model checked; trial nodes written for a local
experiment) and writes the list of node files that the virtual nodes read by partition
id (securefpt/node/config.py). It then checks that Flower started one virtual node per
institution (one line naming the `--federation-config` to use when not), runs the
experiment and prints the result table and the run directory, quiet as `securefpt run`
is: Flower's per-round log lines and library warnings only with `verbose = true`.
On the deployment engine the SuperNodes name their own node.yaml and none of this runs.

`flwr run` exits 0 whatever its ServerApp does (Flower 1.41), and prints a traceback for
an exception; so a run that cannot start or go on ends with its one-line reason instead
(`error: ...`), as `securefpt run` does.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from securefpt.coordinator.app import FederatedPromptAveraging
from securefpt.coordinator.run_plan import resolve_run
from securefpt.engines.demo import DEMO, demo_config, demo_overrides
from securefpt.engines.dp_planning import with_planned_noise
from securefpt.engines.preflight import preflight
from securefpt.engines.report import print_summary
from securefpt.errors import ConfigError, FederationError, SecureFPTError
from securefpt.experiment.loading import load_config
from securefpt.node.config import FLWR_SIM_ENV, PARTITIONS

app = ServerApp()


def _simulated(grid: Grid) -> bool:
    return type(grid).__name__ == "InMemoryGrid"  # Flower's simulation runtime; deployment uses HttpGrid


NODES_START_S = 60.0  # how long Flower's simulation may take to register its virtual nodes


def _one_node_per_institution(grid: Grid, expected: int) -> None:
    deadline = time.monotonic() + NODES_START_S
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(min(1.0, NODES_START_S))  # a spare node registering just after the last expected one
    started = len(list(grid.get_node_ids()))
    if started != expected:  # a spare node would only fail to find its files
        raise FederationError(f"Flower's simulation started {started} virtual nodes and this experiment has "
                              f"{expected} institutions: flwr run . --federation-config \"num-supernodes={expected}\"")


def _experiment(context: Context):
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    experiment = str(context.run_config.get("experiment", DEMO))
    if experiment == DEMO:
        return load_config(demo_config(), demo_overrides(print) + overrides)
    return load_config(experiment, overrides)


def _prepare(grid: Grid, context: Context, out: Path):
    """What `securefpt run` checks before its engine starts; a run directory made here for a run
    that cannot start is removed."""
    fresh = not out.exists()
    try:
        cfg = _experiment(context)
        if not _simulated(grid):  # the SuperNodes hold the data: the label space is declared
            return resolve_run(with_planned_noise(cfg), out)
        if os.environ.get(FLWR_SIM_ENV) != "1":
            raise ConfigError(f"the virtual nodes would not find their files ({FLWR_SIM_ENV} is not set): "
                              ". .venv/bin/activate (scripts/setup.sh prepares it), then flwr run .")
        plan, nodes = preflight(cfg, out, None)
        _one_node_per_institution(grid, len(nodes))
    except SecureFPTError:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise
    (out / "nodes").mkdir(parents=True, exist_ok=True)
    (out / "nodes" / PARTITIONS).write_text(json.dumps([str(p.resolve()) for p in nodes]), encoding="utf-8")
    return plan


@app.main()
def main(grid: Grid, context: Context) -> None:
    from flwr.common.logger import FLOWER_LOGGER
    from rich.console import Console

    console = Console()
    if not bool(context.run_config.get("verbose", False)):
        FLOWER_LOGGER.setLevel(logging.WARNING)  # Flower's per-round INFO lines; the coordinator prints its own
        warnings.simplefilter("ignore")
    out = Path(str(context.run_config.get("out-dir", "runs/flwr")))
    try:
        plan = _prepare(grid, context, out)
        summary = FederatedPromptAveraging(plan, grid, context, show_progress=True).run()
    except SecureFPTError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return
    print_summary(summary, out.resolve(), console)
    if summary.get("stopped_by_refusals"):
        print(f"error: the run stopped before its last round: {summary['stopped_before_the_last_round']}",
              file=sys.stderr, flush=True)
