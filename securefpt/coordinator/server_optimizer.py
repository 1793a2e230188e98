"""Server optimizers on the round's average change: FedAvg, FedAvgM, FedAdam, FedYogi.

Under SecAgg+ the coordinator sees nothing but the weighted average change
Delta_t = sum_k w_k (h_k - h_g) / sum_k w_k, so every server optimizer here is a rule
on Delta_t alone (Reddi et al. 2021, "Adaptive Federated Optimization"). The update
rules are those of Flower's `FedAvgM`, `FedAdam` and `FedYogi` strategies (which take
the nodes' replies, not an unmasked sum, and so cannot sit behind SecAgg+ as they are);
tests/test_server_optimizer.py checks them against Flower's, round for round.
Their state (momentum, first and second moments) is checkpointed with the run.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np

from securefpt.experiment.config import ServerOptimizerConfig

Arrays = Mapping[str, np.ndarray]


class ServerOptimizer:
    """x_{t+1} = x_t + step(Delta_t); `state` holds what carries over between rounds."""

    def __init__(self, cfg: ServerOptimizerConfig) -> None:
        self.cfg = cfg
        self.state: dict[str, "OrderedDict[str, np.ndarray]"] = {}  # "momentum" | "m" | "v" -> arrays

    def step(self, server_round: int, current: Arrays, average_change: Arrays) -> "OrderedDict[str, np.ndarray]":
        """The new global parameters from the current ones and the round's average change."""
        c, names = self.cfg, list(current)
        delta = {k: np.asarray(average_change[k], dtype=np.float64) for k in names}
        if c.name == "fedavg":
            move = {k: c.lr * delta[k] for k in names}
        elif c.name == "fedavgm":  # SGD with momentum on the pseudo-gradient -Delta (torch convention)
            mom = self.state.get("momentum")
            mom = OrderedDict((k, delta[k] if mom is None else c.momentum * mom[k] + delta[k]) for k in names)
            self.state["momentum"] = mom
            move = {k: c.lr * mom[k] for k in names}
        else:
            m = self.state.get("m") or {k: np.zeros_like(delta[k]) for k in names}
            m = OrderedDict((k, c.beta_1 * m[k] + (1 - c.beta_1) * delta[k]) for k in names)
            v = self.state.get("v") or {k: np.zeros_like(delta[k]) for k in names}
            if c.name == "fedadam":
                v = OrderedDict((k, c.beta_2 * v[k] + (1 - c.beta_2) * delta[k] ** 2) for k in names)
                eta = c.lr * np.sqrt(1 - c.beta_2 ** (server_round + 1.0)) / (1 - c.beta_1 ** (server_round + 1.0))
            else:  # fedyogi
                v = OrderedDict((k, v[k] - (1 - c.beta_2) * delta[k] ** 2 * np.sign(v[k] - delta[k] ** 2))
                                for k in names)
                eta = c.lr
            self.state["m"], self.state["v"] = m, v
            move = {k: eta * m[k] / (np.sqrt(v[k]) + c.tau) for k in names}
        return OrderedDict((k, (np.asarray(current[k], dtype=np.float64) + move[k]).astype(np.float32))
                           for k in names)

    def flat_state(self) -> dict[str, np.ndarray]:
        """The state as one flat mapping (`<slot>/<name>`), for the checkpoint."""
        return {f"{slot}/{k}": v for slot, arrays in self.state.items() for k, v in arrays.items()}

    def load_flat_state(self, flat: Mapping[str, np.ndarray]) -> None:
        self.state = {}
        for key, value in flat.items():
            slot, name = key.split("/", 1)
            self.state.setdefault(slot, OrderedDict())[name] = np.asarray(value, dtype=np.float64)
