"""A Grid that delivers each message to securefpt's ClientApp in this process, at once: a federated
run without an engine (no Ray, no SuperLink), so a round's behaviour is tested in a second.

Each message crosses the same serialization as on the wire (Flower's protobuf), every node keeps
its own Context between messages (SecAgg+ keeps its stage state there), and a handler that raises
answers with an error reply, as Flower's engines do.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1  # Flower's SuperLink sends as node 1


class LocalGrid(Grid):
    def __init__(self, client_app, partitions: int, run_id: int = 7) -> None:
        self.client_app = client_app
        self.node_ids = [1000 + i for i in range(partitions)]
        self.contexts = {node: Context(run_id, node, {"partition-id": i, "num-partitions": partitions},
                                       RecordDict(), {}) for i, node in enumerate(self.node_ids)}
        self.run_id = run_id
        self.replies: dict[str, Message] = {}
        self.delivered: list[Message] = []  # every message a node received, as it received it
        self._ids = itertools.count(1)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SERVER_NODE_ID, 1  # as an engine sets

    def set_run(self, run) -> None:
        pass

    @property
    def run(self) -> Run:
        return Run.create_empty(self.run_id)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: Optional[float] = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_run_id"] = self.run_id
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
            received = message_from_proto(message_to_proto(msg))  # what the node gets is a copy, as on the wire
            self.delivered.append(received)
            try:
                reply = self.client_app(received, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001  (an engine answers a raising handler with an error reply)
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
            self.replies[mid] = message_from_proto(message_to_proto(reply))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(cfg, out_dir, client_app=None) -> tuple[dict, LocalGrid]:
    """Resolve `cfg` as `securefpt run` does and run it over a LocalGrid: (its summary, the grid)."""
    from securefpt.coordinator.app import FederatedPromptAveraging
    from securefpt.engines.preflight import preflight
    from securefpt.engines.simulation import node_environment
    from securefpt.node.app import app as node_app

    plan, nodes = preflight(cfg, out_dir, None)
    grid = LocalGrid(client_app or node_app, len(nodes))
    with node_environment(nodes, out_dir / "nodes"):
        summary = FederatedPromptAveraging(plan, grid, Context(grid.run_id, 0, {}, RecordDict(), {}),
                                           show_progress=False).run()
    return summary, grid
