"""The server optimizers are Flower's update rules, applied to the average change alone (what SecAgg+ reveals)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from securefpt.coordinator.server_optimizer import ServerOptimizer
from securefpt.experiment.config import ServerOptimizerConfig


class _Grid:
    """The two methods of a Grid that a strategy's `configure_train` calls."""

    def get_node_ids(self):
        return [1, 2]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)


def _reply(arrays: dict, weight: int) -> Message:
    request = Message(RecordDict(), dst_node_id=1, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": weight})})
    return Message(content, reply_to=request)


FLOWER = {
    "fedavgm": lambda c: FedAvgM(server_learning_rate=c.lr, server_momentum=c.momentum),
    "fedadam": lambda c: FedAdam(eta=c.lr, beta_1=c.beta_1, beta_2=c.beta_2, tau=c.tau),
    "fedyogi": lambda c: FedYogi(eta=c.lr, beta_1=c.beta_1, beta_2=c.beta_2, tau=c.tau),
}


@pytest.fixture
def in_a_run(monkeypatch):
    """Flower's messages need the identity of the run they belong to (a ServerApp has one)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)


@pytest.mark.parametrize("name", sorted(FLOWER))
def test_each_optimizer_moves_the_encoder_as_flowers_strategy_does(name, in_a_run):
    cfg = ServerOptimizerConfig(name=name, lr=0.05 if name != "fedavgm" else 0.7, momentum=0.8)
    rng = np.random.default_rng(3)
    current = OrderedDict((k, rng.normal(size=s).astype(np.float32)) for k, s in (("prompt", (4, 3)), ("head.w", (2,))))
    ours, flower = ServerOptimizer(cfg), FLOWER[name](cfg)
    mine = OrderedDict(current)
    for server_round in range(1, 5):
        arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
        flower.configure_train(server_round, arrays, ConfigRecord(), _Grid())
        h1 = {k: v + rng.normal(scale=0.3, size=v.shape) for k, v in current.items()}
        h2 = {k: v + rng.normal(scale=0.3, size=v.shape) for k, v in current.items()}
        theirs, _ = flower.aggregate_train(server_round, [_reply(h1, 30), _reply(h2, 10)])
        theirs = OrderedDict((k, theirs[k].numpy()) for k in current)
        # the coordinator sees only the weighted average change
        change = {k: (30 * h1[k].astype(np.float32) + 10 * h2[k].astype(np.float32)) / 40 - mine[k] for k in mine}
        mine = ours.step(server_round, mine, change)
        for k in current:
            np.testing.assert_allclose(mine[k], theirs[k], rtol=2e-5, atol=2e-6)
        assert not np.allclose(mine["prompt"], current["prompt"])  # it moved
        current = theirs


def test_fedavg_at_lr_1_is_the_plain_average_and_the_state_survives_a_checkpoint():
    rng = np.random.default_rng(0)
    current = OrderedDict(w=rng.normal(size=(5,)).astype(np.float32))
    change = {"w": rng.normal(size=(5,))}
    stepped = ServerOptimizer(ServerOptimizerConfig()).step(1, current, change)
    np.testing.assert_array_equal(stepped["w"], (current["w"] + change["w"]).astype(np.float32))

    cfg = ServerOptimizerConfig(name="fedadam", lr=0.1)
    straight, resumed = ServerOptimizer(cfg), ServerOptimizer(cfg)
    a = straight.step(1, current, change)
    resumed.step(1, current, change)
    copy = ServerOptimizer(cfg)
    copy.load_flat_state({k: v.astype(np.float64) for k, v in resumed.flat_state().items()})
    b = straight.step(2, a, change)
    np.testing.assert_array_equal(copy.step(2, a, change)["w"], b["w"])
    assert not np.array_equal(ServerOptimizer(cfg).step(2, a, change)["w"], b["w"])  # the state matters
