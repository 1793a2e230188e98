"""How a coordinator's run stops early: the operator's Ctrl-C, and drills that press it on purpose.

`STOP` is set by the engine on Ctrl-C; `check_stop` raises `RunInterrupted` at the next
message exchange, so nothing is half-sent. A run's state is checkpointed twice a round
(coordinator/checkpoint.py): once the aggregate is formed, and once the round is
evaluated; the same command then resumes without repeating any node's training.

`drill` plays the operator (`sigint`: Ctrl-C) or a crash (`sigkill`: the process dies at
once, nothing cleaned up) at a chosen point, for tests and fault drills:
SECUREFPT_FAULTS="coordinator@EVENT:sigint|sigkill", where EVENT is
- `setup`: before the nodes are asked to set up (a run's start, or its resumption);
- `round-N:train`: before round N's training reaches the nodes;
- `round-N:STAGE`: before round N's SecAgg+ stage STAGE reaches the nodes
  (setup, share_keys, collect_masked_vectors, unmask);
- `round-N:aggregated`: round N's aggregate is checkpointed, before its evaluation;
- `round-N:evaluate`: before round N's aggregate reaches the nodes to evaluate;
- `round-N:checkpoint`: inside the write of round N's evaluated checkpoint (its arrays written,
  its state.json not yet replaced);
- `round-N`: round N is complete and checkpointed;
- `witness`: the summary written, before the nodes witness the final audit head.
bench/resume_matrix.py plays every event with both signals and resumes each run.
"""

from __future__ import annotations

import os
import signal
import threading

from securefpt.errors import RunInterrupted

STOP = threading.Event()  # set by the engine when the operator stops the run (Ctrl-C)


def check_stop() -> None:
    """Stop at a message exchange once the operator asked to (nothing half-sent is counted)."""
    if STOP.is_set():
        raise RunInterrupted("stopped by the operator")


def drill(event: str) -> None:
    """Press Ctrl-C at `event` when SECUREFPT_FAULTS asks for it. The ServerApp may run in another
    thread than the one Python delivers signals to: the drill waits until the handler has run, so
    the press lands before the next exchange, as the drill means."""
    for item in os.environ.get("SECUREFPT_FAULTS", "").split(","):
        if item.strip() == f"coordinator@{event}:sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if item.strip() == f"coordinator@{event}:sigint":
            os.kill(os.getpid(), signal.SIGINT)
            STOP.wait(timeout=10.0)
