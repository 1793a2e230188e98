"""Wall time of a secure round: plaintext, Flower's SecAgg+, and securefpt's authenticated SecAgg+, in one run.

No training: each virtual node answers with a fixed random update of D floats, so the
figures are the cost of the protocols (key agreement, Shamir shares, masking,
unmasking) on Flower's simulation engine. Three rounds are timed per cohort:
- plaintext: the updates in the clear, averaged;
- Flower's SecAgg+: `SecAggPlusWorkflow` with Flower's `secaggplus_mod` (honest-but-curious);
- authenticated: securefpt's workflow and node mod (signed key advertisements checked
  against each node's trust store, the survivors' consistency exchange, the node's checks).
Sizes: the MiniLM prompt-tuning update (8 x 384 prompt + 384 x 7 + 7 head = 5,767
floats) and a 1.2M-float update (the paper's XLM-R prompt encoder + head).

    python bench/secagg_scaling.py [--clients 5 10 20 50] [--sizes 5767 1200000]

SecAgg+ uses a sparse share graph: each node shares with num_shares - 1 neighbours,
num_shares = the smallest odd number >= 2 log2(n) + 1 (all nodes when that is more); the
threshold is the smallest above 2/3 of the shares, for both protocols.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import FLOWER_LOGGER
from flwr.compat.common import recorddict_compat as compat
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

import securefpt.coordinator.secure_aggregation as secure_aggregation
from securefpt.coordinator.aggregation import weighted_average
from securefpt.coordinator.metering import GridProxy, collect
from securefpt.coordinator.secure_aggregation import SecAggSettings, active_threshold, secure_fit_round
from securefpt.engines.simulation import node_environment
from securefpt.engines.trial_nodes import write_trial_nodes
from securefpt.experiment.loading import load_config
from securefpt.node.config import this_node
from securefpt.node.secagg import secure_aggregation_mod
from securefpt.node.state import NodeState

RESULTS: dict = {}
PLAIN_ROUNDS = 1000  # rounds numbered from here run Flower's own SecAgg+ client


def make_client_app(size: int, request_json: str) -> ClientApp:
    def protocol(msg: Message, context: Context, call_next):
        plain = msg.metadata.group_id.isdigit() and int(msg.metadata.group_id) >= PLAIN_ROUNDS
        return (secaggplus_mod if plain else secure_aggregation_mod)(msg, context, call_next)

    app = ClientApp(mods=[protocol])

    @app.query()
    def accept(msg: Message, context: Context) -> Message:  # the experiment's setup, without data
        NodeState(this_node(context).state_dir).run(context.run_id).accept(request_json)
        return Message(RecordDict(), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        update = np.random.default_rng(pid).uniform(-0.01, 0.01, size).astype(np.float32)
        fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([update]), 10 + pid, {})
        return Message(compat.fitres_to_recorddict(fitres, False), reply_to=msg)

    return app


class _PassThrough(GridProxy):
    errors: dict = {}

    def __init__(self, inner: Grid, shapes=None) -> None:
        super().__init__(inner)


def timed(plain_secagg: bool, *args) -> tuple[float, bool]:
    """One secure round; with `plain_secagg`, Flower's workflow without securefpt's relay."""
    saved = secure_aggregation.AuthenticatedSecAggPlus, secure_aggregation.Relay
    if plain_secagg:
        secure_aggregation.AuthenticatedSecAggPlus, secure_aggregation.Relay = SecAggPlusWorkflow, _PassThrough
    try:
        start = time.perf_counter()
        outcome = secure_fit_round(*args)
        return time.perf_counter() - start, outcome.aborted
    finally:
        secure_aggregation.AuthenticatedSecAggPlus, secure_aggregation.Relay = saved


def make_server_app(n: int, size: int, repeats: int) -> ServerApp:
    app = ServerApp()
    shares = min(n, max(3, 2 * math.ceil(math.log2(n)) + 1) | 1)
    settings = SecAggSettings(num_shares=shares, reconstruction_threshold=active_threshold(shares),
                              clipping_range=1.0, quantization_range=2**22, modulus_range=2**32,
                              max_weight=10 + n, timeout=None, min_cohort=2, threshold_given=False)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes: list[int] = []
        while len(nodes) < n:
            nodes = sorted(grid.get_node_ids())
            time.sleep(0.05)
        collect(grid, [Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes])
        global_arrays = OrderedDict(w=np.zeros(size, dtype=np.float32))
        params = ndarrays_to_parameters([global_arrays["w"]])
        plain, flower, ours = [], [], []
        for k in range(repeats + 1):  # the first repeat warms the actors up
            start = time.perf_counter()
            msgs = [Message(compat.fitins_to_recorddict(FitIns(params, {}), True), dst_node_id=node,
                            message_type="train") for node in nodes]
            fitres = [compat.recorddict_to_fitres(r.content, False) for r in collect(grid, msgs)]
            weighted_average([({"w": parameters_to_ndarrays(f.parameters)[0]}, f.num_examples) for f in fitres])
            plain.append(time.perf_counter() - start)
            seconds, aborted = timed(True, grid, context, settings, PLAIN_ROUNDS + k, nodes, global_arrays, {})
            flower.append(seconds)
            assert not aborted
            seconds, aborted = timed(False, grid, context, settings, k + 1, nodes, global_arrays, {})
            ours.append(seconds)
            assert not aborted
        RESULTS[(n, size)] = tuple(float(np.median(x[1:])) for x in (plain, flower, ours)) + (shares,)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5767, 1_200_000])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    FLOWER_LOGGER.setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    print("| nodes | floats | num_shares | plaintext s | Flower SecAgg+ s | authenticated s | authenticated / Flower |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for n in args.clients:
            with tempfile.TemporaryDirectory() as tmp:
                languages = [f"l{i:02d}" for i in range(n)]
                cfg = load_config(None, [f"data.languages=[{', '.join(languages)}]", f"fl.rounds={args.repeats + 1}"])
                nodes = write_trial_nodes(cfg, Path(tmp) / "nodes")
                request = cfg.request(["a", "b"]).to_json()
                with node_environment(nodes, Path(tmp) / "nodes"):
                    run_simulation(make_server_app(n, size, args.repeats), make_client_app(size, request),
                                   num_supernodes=n,
                                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                                   "init_args": {"num_cpus": os.cpu_count() or 1,
                                                                 "include_dashboard": False,
                                                                 "log_to_driver": False}})
            plain, flower, ours, shares = RESULTS[(n, size)]
            print(f"| {n} | {size:,} | {shares} | {plain:.2f} | {flower:.2f} | {ours:.2f} | {ours / flower:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
