"""Communication accounting: a Grid that measures every message it carries, serialized.

Sizes are the protobuf wire size of each Message (what the deployment engine sends),
not an estimate from parameter counts.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from flwr.app import Message
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid

from securefpt.coordinator.interrupts import check_stop


def message_bytes(msg: Message) -> int:
    return message_to_proto(msg).ByteSize()


class GridProxy(Grid):
    """A Grid that hands everything to the engine's Grid (subclasses watch or amend the traffic)."""

    def __init__(self, inner: Grid) -> None:
        self._inner = inner

    def set_run(self, run) -> None:  # type: ignore[override]
        self._inner.set_run(run)

    @property
    def run(self):  # type: ignore[override]
        return self._inner.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[override]
        return self._inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self._inner.send_and_receive(messages, timeout=timeout)


@dataclass(frozen=True)
class Traffic:
    """What went through the Grid so far: bytes up (pulled) and down (pushed), and exchanges (pushes of
    one or more messages: each costs a deployed node one SuperNode pull, whatever it carries)."""

    up: int = 0
    down: int = 0
    exchanges: int = 0
    exchange_seconds: tuple[float, ...] = ()  # each exchange's push to its last reply (or last poll)

    def since(self, start: "Traffic") -> "Traffic":
        return Traffic(self.up - start.up, self.down - start.down, self.exchanges - start.exchanges,
                       self.exchange_seconds[len(start.exchange_seconds):])


class MeteredGrid(GridProxy):
    """Counts bytes down (pushed) and up (pulled) through the engine's Grid, and the exchanges."""

    def __init__(self, inner: Grid, on_receive: Optional[Callable[[Message], None]] = None) -> None:
        super().__init__(inner)
        self.on_receive = on_receive
        self.bytes_down = 0
        self.bytes_up = 0
        self.per_node_up: dict[int, int] = defaultdict(int)
        self.per_node_down: dict[int, int] = defaultdict(int)
        self.exchanges = 0
        self._pushed_at: list[float] = []  # per exchange: when it was pushed, and its last reply so far
        self._replied_at: list[float] = []
        self._exchange_of: dict[str, int] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            size = message_bytes(msg)
            self.bytes_down += size
            self.per_node_down[msg.metadata.dst_node_id] += size
        ids = list(self._inner.push_messages(messages))
        if messages:
            now = time.monotonic()
            self._exchange_of.update((mid, self.exchanges) for mid in ids if mid)
            self._pushed_at.append(now)
            self._replied_at.append(now)
            self.exchanges += 1
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        replies = list(self._inner.pull_messages(message_ids))
        now = time.monotonic()
        for mid in message_ids:  # an exchange lasts until its last reply, or its last poll for a silent node
            index = self._exchange_of.get(mid)
            if index is not None:
                self._replied_at[index] = now
        for msg in replies:
            self._exchange_of.pop(msg.metadata.reply_to_message_id, None)
            size = message_bytes(msg)
            self.bytes_up += size
            self.per_node_up[msg.metadata.src_node_id] += size
            if self.on_receive is not None:
                self.on_receive(msg)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return collect(self, list(messages), timeout=timeout)

    def snapshot(self) -> Traffic:
        return Traffic(self.bytes_up, self.bytes_down, self.exchanges,
                       tuple(r - p for p, r in zip(self._pushed_at, self._replied_at)))


def exchange(
    grid: Grid,
    messages: list[Message],
    timeout: Optional[float] = None,
    on_reply: Optional[Callable[[Message], None]] = None,
    poll: float = 0.05,
    stoppable: bool = True,
) -> list[tuple[int, Message]]:
    """Push messages and pull replies until all arrive or `timeout` passes.

    Each reply comes with the node its message went to: an error reply that the
    SuperLink makes for a node it considers offline carries the SuperLink as sender.
    `stoppable`: the operator's Ctrl-C stops it (the run's last exchange, once its results
    are written, is not: a second Ctrl-C still quits at once).
    """

    stop = check_stop if stoppable else (lambda: None)
    stop()
    ids = list(grid.push_messages(messages))
    destination = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages) if mid}
    pending = set(destination)
    replies: list[tuple[int, Message]] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            replies.append((destination.get(mid, reply.metadata.src_node_id), reply))
            if on_reply is not None:
                on_reply(reply)
        if not pending or (deadline is not None and time.monotonic() > deadline):
            break
        stop()
        time.sleep(poll)
    return replies


def collect(grid: Grid, messages: list[Message], timeout: Optional[float] = None,
            on_reply: Optional[Callable[[Message], None]] = None) -> list[Message]:
    """The replies of `exchange`, without their nodes."""
    return [reply for _, reply in exchange(grid, messages, timeout, on_reply)]
