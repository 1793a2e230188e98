"""Flower's simulation engine, in-process: the embedded default for one machine.

Why `run_simulation` (deprecated in Flower 1.41) and not `flwr run`: see
docs/engines.md. This module is the only place that calls it; the ServerApp and
ClientApp are the same objects that `flwr run .` loads from `[tool.flwr.app]`.

Each virtual node is an institution's node and reads its own configuration file, as on
the deployment engine: the institutions of the experiment's federation
(`clients/<id>/node.yaml`) or, for a local trial, nodes written from the experiment's
data section (engines/trial_nodes.py). The engine tells each virtual node which file is
its own (by partition id, through the process environment) and where nodes without a
`state_dir` keep their state: the run directory's `nodes/`. Before the engine starts,
every node's configuration, data, labels and model are checked (engines/preflight.py), so
a mistake is one line naming the file, not a failure inside a node.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from securefpt.coordinator.interrupts import STOP
from securefpt.engines.preflight import preflight
from securefpt.errors import FederationError, SecureFPTError
from securefpt.experiment.config import ExperimentConfig
from securefpt.node.config import SIM_NODES_ENV, STATE_ENV


def _hide_known_deprecation(record: logging.LogRecord) -> bool:
    """Drop the `run_simulation` deprecation notice: the choice is deliberate (see above)."""
    return "run_simulation" not in record.getMessage()


@contextmanager
def node_environment(nodes: list[Path], state_base: Path):
    """Tell the virtual nodes (Ray workers inherit this process's environment) which file is
    their own and where to keep state; restore the environment afterwards."""
    saved = {k: os.environ.get(k) for k in (SIM_NODES_ENV, STATE_ENV)}
    os.environ[SIM_NODES_ENV] = json.dumps([str(p.resolve()) for p in nodes])
    os.environ[STATE_ENV] = str(state_base.resolve())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def operator_interrupts():
    """Ctrl-C stops the run at its next message exchange (the checkpoint of the last completed round
    stays, so the same command resumes); a second Ctrl-C quits at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if STOP.is_set():
            print("stopped", file=sys.stderr, flush=True)
            os._exit(130)
        STOP.set()
        print("stopping at the next message exchange (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        STOP.clear()


def run_federated_simulation(cfg: ExperimentConfig, out_dir: Path, show_progress: bool = True,
                             verbose: bool = False, on_receive=None, server_app=None, client_app=None,
                             nodes: Optional[list[Path]] = None, on_aggregate=None) -> dict:
    """Run a federated experiment with one virtual node per institution (or trial node).

    `on_receive`, if given, is called with every message the coordinator receives, `on_aggregate`
    with each round's unmasked aggregate (the privacy audit's view of the coordinator). For
    attack drills: `server_app` replaces securefpt's ServerApp (a hostile coordinator),
    `client_app` its ClientApp (a misbehaving node), `nodes` the virtual nodes' files.
    """
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.simulation import run_simulation

    from securefpt.coordinator.app import build_server_app
    from securefpt.node.app import app as node_app

    out_dir = Path(out_dir)
    failure: list[BaseException] = []
    fresh = not out_dir.exists()
    try:  # every mistake fails here, in seconds, before the engine starts; a new run directory is removed
        plan, nodes = preflight(cfg, out_dir, nodes)
    except SecureFPTError:
        if fresh:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    custom_server = server_app is not None
    if server_app is None:
        server_app = build_server_app(plan, show_progress, on_error=failure.append, on_receive=on_receive,
                                      on_aggregate=on_aggregate)

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        FLOWER_LOGGER.setLevel(logging.WARNING)
        FLOWER_LOGGER.addFilter(_hide_known_deprecation)
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "error",
                      "log_to_driver": verbose},
    }
    with node_environment(nodes, out_dir / "nodes"), operator_interrupts(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server_app, client_app=client_app or node_app, num_supernodes=len(nodes),
                       backend_config=backend_config, verbose_logging=verbose)
    if failure:
        raise failure[0]
    summary_path = out_dir / "summary.json"
    if custom_server:  # it keeps its own records
        return {}
    if not summary_path.exists():
        raise FederationError("the federated run stopped before writing summary.json (see the log above)")
    return json.loads(summary_path.read_text(encoding="utf-8"))
