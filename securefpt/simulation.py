"""Flower's simulation engine, in-process: the embedded default for one machine.

Why `run_simulation` (deprecated in Flower 1.41) and not `flwr run`: `flwr run .`
starts a detached SuperLink plus SuperExec that rebuild the app's environment with
`uv sync` (pulling a multi-GB CUDA torch on this offline CPU machine), runs the
ServerApp in another process (so no progress bars or exceptions reach the caller),
and leaves the SuperLink running afterwards. `run_simulation` drives the same
simulation engine (Ray backend, virtual SuperNodes, per-node Context state) inside
this process. This module is the only place that calls it; the ServerApp and
ClientApp are the same objects that `flwr run .` loads from `[tool.flwr.app]`
(see docs/engines.md).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

from securefpt.checkpoint import load_checkpoint
from securefpt.config import ExperimentConfig
from securefpt.secure_aggregation import resolve_settings
from securefpt.eligibility import participants
from securefpt.errors import FederationError
from securefpt.server_app import build_server_app


def _hide_known_deprecation(record: logging.LogRecord) -> bool:
    """Drop the `run_simulation` deprecation notice: the choice is deliberate (see above)."""
    return "run_simulation" not in record.getMessage()


def run_federated_simulation(cfg: ExperimentConfig, out_dir: Path, show_progress: bool = True,
                             verbose: bool = False, on_receive=None) -> dict:
    """Run a federated experiment with one virtual SuperNode per language.

    `on_receive`, if given, is called with every message the server receives.
    """
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.simulation import run_simulation

    from securefpt.client_app import NODE_STATE_ENV, app as client_app

    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    failure: list[BaseException] = []
    # a finished run directory, a checkpoint of another experiment, bad secagg.* settings,
    # or a policy that admits nobody: fail before the engine starts
    load_checkpoint(out_dir, cfg)
    admitted = sum(p.decision.included for p in participants(cfg).values())
    if cfg.secagg.enabled:
        resolve_settings(cfg, admitted)
    server_app = build_server_app(cfg, out_dir, show_progress, on_error=failure.append, on_receive=on_receive)

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
    # the virtual nodes keep their privacy ledgers in the run directory, so a resumed run continues them
    previous = os.environ.get(NODE_STATE_ENV)
    os.environ[NODE_STATE_ENV] = str(out_dir.resolve() / "nodes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=len(cfg.data.languages),
                backend_config=backend_config,
                verbose_logging=verbose,
            )
    finally:  # this run's folder is not the next caller's
        if previous is None:
            os.environ.pop(NODE_STATE_ENV, None)
        else:
            os.environ[NODE_STATE_ENV] = previous
    if failure:
        raise failure[0]
    if not summary_path.exists():
        raise FederationError("the federated run stopped before writing summary.json (see the log above)")
    return json.loads(summary_path.read_text(encoding="utf-8"))
