"""Wall time of a SecAgg+ round against the same round in plaintext, in one run.

No training: each virtual client answers with a fixed random update of D floats, so
the figure is the cost of the protocol itself (key agreement, Shamir shares, masking,
unmasking) on Flower's simulation engine, with securefpt's client guard mod. Sizes: the
MiniLM prompt-tuning update (8 x 384 prompt + 384 x 7 + 7 head = 5,767 floats) and a
1.2M-float update (the paper's XLM-R prompt encoder + head).

    python bench/secagg_scaling.py [--clients 5 10 20 50] [--sizes 5767 1200000]

SecAgg+ uses a sparse share graph: each client shares with num_shares - 1 neighbours,
num_shares = the smallest odd number >= 2 log2(n) + 1 (all clients when that is more).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from collections import OrderedDict

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import FLOWER_LOGGER
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from securefpt.aggregation import weighted_average
from securefpt.metering import collect
from securefpt.mods import hardened_secaggplus_mod
from securefpt.secure_aggregation import SecAggSettings, secure_fit_round

RESULTS: dict = {}


def make_client_app(size: int) -> ClientApp:
    app = ClientApp(mods=[hardened_secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        update = np.random.default_rng(pid).uniform(-0.01, 0.01, size).astype(np.float32)
        fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters([update]), 10 + pid, {})
        return Message(compat.fitres_to_recorddict(fitres, False), reply_to=msg)

    return app


def make_server_app(n: int, size: int, repeats: int) -> ServerApp:
    app = ServerApp()
    shares = min(n, max(3, 2 * math.ceil(math.log2(n)) + 1) | 1)
    settings = SecAggSettings(num_shares=shares, reconstruction_threshold=max(2, shares // 2 + 1),
                              clipping_range=1.0, quantization_range=2**22, modulus_range=2**32,
                              max_weight=10 + n, timeout=None, min_cohort=2)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes: list[int] = []
        while len(nodes) < n:
            nodes = sorted(grid.get_node_ids())
            time.sleep(0.05)
        global_arrays = OrderedDict(w=np.zeros(size, dtype=np.float32))
        params = ndarrays_to_parameters([global_arrays["w"]])
        plain, secure = [], []
        for _ in range(repeats + 1):  # first pair warms the actors up
            start = time.perf_counter()
            msgs = [Message(compat.fitins_to_recorddict(FitIns(params, {}), True), dst_node_id=node,
                            message_type="train") for node in nodes]
            replies = collect(grid, msgs)
            fitres = [compat.recorddict_to_fitres(r.content, False) for r in replies]
            weighted_average([({"w": parameters_to_ndarrays(f.parameters)[0]}, f.num_examples) for f in fitres])
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            outcome = secure_fit_round(grid, context, settings, 1, nodes, global_arrays, {})
            secure.append(time.perf_counter() - start)
            assert not outcome.aborted
        RESULTS[(n, size)] = (float(np.median(plain[1:])), float(np.median(secure[1:])), shares)

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
    print("| clients | floats | num_shares | plaintext round s | SecAgg+ round s | ratio |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for n in args.clients:
            run_simulation(make_server_app(n, size, args.repeats), make_client_app(size), num_supernodes=n,
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                           "init_args": {"num_cpus": os.cpu_count() or 1,
                                                         "include_dashboard": False, "log_to_driver": False}})
            plain, secure, shares = RESULTS[(n, size)]
            print(f"| {n} | {size:,} | {shares} | {plain:.2f} | {secure:.2f} | {secure / plain:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
