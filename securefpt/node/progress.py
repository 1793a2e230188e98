"""What a node shows its own operator during a long step: a line every few seconds on its own log.

Training a round on a large dataset, or under DP-SGD, can take minutes; the SuperNode's
operator sees how far it is (steps done of planned, time). None of it is sent: the step
count follows the node's row count, which the coordinator must not learn (docs/threat-model.md).
Logged at INFO on `securefpt.node`: a deployment's SuperNode shows it on stderr (node/app.py
configures the handler), `securefpt run --verbose` shows the virtual nodes' lines.
"""

from __future__ import annotations

import logging
import sys
import time

LOG = logging.getLogger("securefpt.node")
EVERY_S = 10.0  # at most one line this often, and one at the end of a step that took longer


def show_progress() -> None:
    """Send the node's INFO lines to its process's stderr (once), as a SuperNode's own log."""
    if not LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s securefpt node %(message)s", "%H:%M:%S"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False


class StepProgress:
    """Counts a step's optimizer steps and logs how far it is, at most every EVERY_S seconds."""

    def __init__(self, who: str, what: str, total: int) -> None:
        self.who, self.what, self.total = who, what, total
        self.done, self.start = 0, time.monotonic()
        self.last = self.start

    def __call__(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= EVERY_S:
            self.last = now
            LOG.info("%s: %s: step %d of %d (%.0f s)", self.who, self.what, self.done, self.total, now - self.start)

    def close(self) -> None:
        seconds = time.monotonic() - self.start
        if seconds >= EVERY_S:
            LOG.info("%s: %s: %d steps done in %.0f s", self.who, self.what, self.done, seconds)
