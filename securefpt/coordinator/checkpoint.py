"""The server's state between rounds, checkpointed so a restarted coordinator resumes.

After every completed round the ServerApp writes `checkpoint/` in its run directory:
the global encoder (and the best one so far), the completed rounds' records, and the
selection RNG. A restarted coordinator given the same experiment and run directory
continues with the next round, so no completed round is lost or repeated. The audit
log continues its chain (audit.py) and the clients' privacy ledgers stay on the
clients (privacy.py), so nothing here can reset a budget.

Writes are atomic: arrays go to files named by round, then `state.json` is replaced
in one step; a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from securefpt.protocol.experiment import ExperimentConfig
from securefpt.errors import FederationError
from securefpt.coordinator.run_dir import RoundRecord
from securefpt.learning.artifacts import load_arrays, save_arrays

FOLDER = "checkpoint"


@dataclass
class RunState:
    """What the server carries from one round to the next."""

    global_arrays: "OrderedDict[str, np.ndarray]"
    completed: int = 0  # the last completed round
    rounds: list[RoundRecord] = field(default_factory=list)
    secure_rounds: list[dict] = field(default_factory=list)
    latest_privacy: dict[str, dict] = field(default_factory=dict)
    best_round: Optional[int] = None
    best_arrays: Optional["OrderedDict[str, np.ndarray]"] = None
    stale: int = 0  # rounds since the best one (early stopping)
    stopped: bool = False  # early stopping ended the run
    rng_state: dict[str, Any] = field(default_factory=dict)

    def best_record(self) -> Optional[RoundRecord]:
        return next((r for r in self.rounds if r.round == self.best_round), None)

    def observe(self, record: RoundRecord, arrays, patience: Optional[int]) -> bool:
        """Track the best round so far (by average accuracy); True when early stopping ends the run:
        `patience` rounds in a row without improving on the best."""
        best = self.best_record()
        if best is None or record.avg() > best.avg():
            self.best_round, self.best_arrays, self.stale = record.round, OrderedDict(arrays), 0
        else:
            self.stale += 1
        return patience is not None and self.stale >= patience


def _round_record(d: dict) -> RoundRecord:
    accuracy = {k: v for k, v in d["accuracy"].items() if k != "avg"}
    return RoundRecord(**{**d, "accuracy": accuracy})


def save_checkpoint(out_dir: Path, cfg: ExperimentConfig, state: RunState) -> Path:
    folder = Path(out_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"round-{state.completed:04d}"
    save_arrays(folder / f"{stem}.global.safetensors", state.global_arrays)
    if state.best_arrays is not None:
        save_arrays(folder / f"{stem}.best.safetensors", state.best_arrays)
    meta = {
        "config_sha256": cfg.sha256(), "completed": state.completed, "stem": stem,
        "rounds": [asdict(r) for r in state.rounds], "secure_rounds": state.secure_rounds,
        "latest_privacy": state.latest_privacy, "best_round": state.best_round, "stale": state.stale,
        "stopped": state.stopped, "rng_state": state.rng_state,
    }
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(meta, default=str), encoding="utf-8")
    os.replace(tmp, folder / "state.json")
    for old in folder.glob("round-*.safetensors"):  # earlier rounds' arrays are superseded
        if not old.name.startswith(stem + "."):
            old.unlink()
    return folder / "state.json"


def load_checkpoint(out_dir: Path, cfg: ExperimentConfig, check_experiment: bool = True) -> Optional[RunState]:
    """The state to resume from, None for a fresh run; refuses a run directory that is
    complete or (with `check_experiment`) that belongs to another experiment."""
    out_dir = Path(out_dir)
    if (out_dir / "summary.json").is_file():
        raise FederationError(f"{out_dir} holds a finished run (summary.json); choose another run directory")
    path = out_dir / FOLDER / "state.json"
    if not path.is_file() or not check_experiment:
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FederationError(f"{path}: unreadable checkpoint ({exc})") from None
    if meta["config_sha256"] != cfg.sha256():
        raise FederationError(f"{out_dir} holds a checkpoint of a different experiment; "
                              "resume with the same experiment and overrides, or choose another run directory")
    folder = out_dir / FOLDER
    best = folder / f"{meta['stem']}.best.safetensors"
    return RunState(
        global_arrays=OrderedDict(load_arrays(folder / f"{meta['stem']}.global.safetensors")),
        completed=int(meta["completed"]),
        rounds=[_round_record(r) for r in meta["rounds"]],
        secure_rounds=meta["secure_rounds"],
        latest_privacy=meta["latest_privacy"],
        best_round=meta["best_round"],
        best_arrays=OrderedDict(load_arrays(best)) if best.is_file() else None,
        stale=int(meta["stale"]),
        stopped=bool(meta["stopped"]),
        rng_state=meta["rng_state"],
    )
