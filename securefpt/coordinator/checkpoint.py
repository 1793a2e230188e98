"""The coordinator's state between rounds, checkpointed so a restarted coordinator resumes.

Twice a round the ServerApp writes `checkpoint/` in its run directory: once the round's
aggregate is formed (the round is then `pending`: trained and aggregated, not yet
evaluated) and once it is evaluated. A checkpoint holds the global encoder (and the best
one so far), the server optimizer's state, the completed rounds' records, the pending
round's record, and the selection RNG, signed with the coordinator's audit key together
with the SHA-256 of each array file. A checkpoint whose signature, file names or files do
not hold is refused before any engine starts. A restarted coordinator given the same
experiment and run directory evaluates a pending round, then continues with the next, so
no completed round is lost or repeated and no node is asked to train on an encoder again
once its update was aggregated. The audit log continues its chain (audit_log.py) and the nodes' privacy
ledgers stay on the nodes (node/budget.py), so nothing here can reset a budget.

Writes are atomic: arrays go to files named by round, then `state.json` is replaced
in one step; a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefpt.coordinator.audit_key import coordinator_key
from securefpt.coordinator.interrupts import drill
from securefpt.coordinator.run_dir import RoundRecord
from securefpt.errors import FederationError
from securefpt.experiment.config import ExperimentConfig
from securefpt.learning.artifacts import load_arrays, save_arrays
from securefpt.protocol.attestation import b64, canonical, load_public, unb64, verify
from securefpt.protocol.audit import file_sha256
from securefpt.protocol.policy import Policy

FOLDER = "checkpoint"


@dataclass
class RunState:
    """What the server carries from one round to the next."""

    global_arrays: "OrderedDict[str, np.ndarray]"
    completed: int = 0  # the last completed round
    pending: Optional[RoundRecord] = None  # a round aggregated (global_arrays) but not yet evaluated
    rounds: list[RoundRecord] = field(default_factory=list)
    secure_rounds: list[dict] = field(default_factory=list)
    latest_privacy: dict[str, dict] = field(default_factory=dict)
    best_round: Optional[int] = None
    best_arrays: Optional["OrderedDict[str, np.ndarray]"] = None
    stale: int = 0  # rounds since the best one (early stopping)
    stopped: bool = False  # early stopping ended the run
    rng_state: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)  # the server optimizer's moments

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


def save_checkpoint(out_dir: Path, cfg: ExperimentConfig, state: RunState, key: Ed25519PrivateKey) -> Path:
    """Write the state after a round's aggregate or its evaluation, signed with the coordinator's audit key."""
    folder = Path(out_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    # the aggregate's files and the evaluated round's have different names: a crash while one is
    # written leaves the other's state.json with intact files
    stem = f"round-{state.completed:04d}" if state.pending is None else f"round-{state.pending.round:04d}-aggregated"
    files = {"global": f"{stem}.global.safetensors"}
    save_arrays(folder / files["global"], state.global_arrays)
    if state.best_arrays is not None:
        files["best"] = f"{stem}.best.safetensors"
        save_arrays(folder / files["best"], state.best_arrays)
    if state.optimizer_state:
        files["optimizer"] = f"{stem}.optimizer.safetensors"
        save_arrays(folder / files["optimizer"], state.optimizer_state)
    meta = json.loads(json.dumps({
        "config_sha256": cfg.sha256(), "completed": state.completed,
        "pending": asdict(state.pending) if state.pending is not None else None,
        "files": {role: {"name": name, "sha256": file_sha256(folder / name)} for role, name in files.items()},
        "rounds": [asdict(r) for r in state.rounds], "secure_rounds": state.secure_rounds,
        "latest_privacy": state.latest_privacy, "best_round": state.best_round, "stale": state.stale,
        "stopped": state.stopped, "rng_state": state.rng_state,
    }, default=str))
    meta["signature"] = b64(key.sign(canonical(meta)))
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(meta), encoding="utf-8")
    if state.pending is None:
        drill(f"round-{state.completed}:checkpoint")
    os.replace(tmp, folder / "state.json")
    for old in folder.glob("round-*.safetensors"):  # earlier rounds' arrays are superseded
        if old.name not in files.values():
            old.unlink()
    return folder / "state.json"


def _verified(folder: Path, meta: dict, public) -> str:
    """Why this checkpoint must not be trusted, or "" when its signature, paths and files hold."""
    try:
        signature = unb64(str(meta.pop("signature")))
    except (KeyError, ValueError):
        return "it is not signed"
    if not verify(public, signature, canonical(meta)):
        return "its signature does not verify with the coordinator's audit key (edited or swapped)"
    for role, entry in meta["files"].items():
        name = str(entry["name"])
        if not re.fullmatch(r"round-\d{4}(-aggregated)?\.(global|best|optimizer)\.safetensors", name) or \
                not (folder / name).resolve().is_relative_to(folder.resolve()):
            return f"its {role} file {name!r} is not a checkpoint file name"
        if not (folder / name).is_file() or file_sha256(folder / name) != entry["sha256"]:
            return f"its {role} file {name} is missing or was altered"
    return ""


def _check_log_of(out_dir: Path, cfg: ExperimentConfig) -> None:
    """A run directory with a log but no checkpoint: a run that failed before its first round. Only
    the same experiment may start again there (its log goes on); another one is refused."""
    log = out_dir / "audit.jsonl"
    if not log.is_file():
        return
    try:
        first = json.loads(log.read_text(encoding="utf-8").splitlines()[0])
    except (IndexError, json.JSONDecodeError):
        return  # an empty or torn log: the audit log writer repairs or refuses it
    if first.get("config_sha256") not in (None, cfg.sha256()):
        raise FederationError(f"{out_dir} holds the log of another experiment that stopped before its first "
                              "round; choose another run directory")


def load_checkpoint(out_dir: Path, cfg: ExperimentConfig, check_experiment: bool = True,
                    policy: Optional[Policy] = None) -> Optional[RunState]:
    """The state to resume from, None for a fresh run; refuses a run directory that is complete,
    and (with `check_experiment`) a checkpoint of another experiment or one that does not verify."""
    out_dir = Path(out_dir)
    if (out_dir / "summary.json").is_file():
        raise FederationError(f"{out_dir} holds a finished run (summary.json); choose another run directory")
    path = out_dir / FOLDER / "state.json"
    if not check_experiment:
        return None
    if not path.is_file():
        _check_log_of(out_dir, cfg)
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        _, public_path = coordinator_key(cfg, out_dir, policy)
        why = _verified(out_dir / FOLDER, meta, load_public(public_path))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        why = f"it cannot be read ({type(exc).__name__})"
    if why:
        raise FederationError(f"{path}: checkpoint refused: {why}")
    if meta["config_sha256"] != cfg.sha256():
        raise FederationError(f"{out_dir} holds a checkpoint of a different experiment; "
                              "resume with the same experiment and overrides, or choose another run directory")
    folder = out_dir / FOLDER
    files = meta["files"]
    return RunState(
        global_arrays=OrderedDict(load_arrays(folder / files["global"]["name"])),
        completed=int(meta["completed"]),
        pending=RoundRecord(**meta["pending"]) if meta.get("pending") else None,
        rounds=[_round_record(r) for r in meta["rounds"]],
        secure_rounds=meta["secure_rounds"],
        latest_privacy=meta["latest_privacy"],
        best_round=meta["best_round"],
        best_arrays=OrderedDict(load_arrays(folder / files["best"]["name"])) if "best" in files else None,
        stale=int(meta["stale"]),
        stopped=bool(meta["stopped"]),
        rng_state=meta["rng_state"],
        optimizer_state=load_arrays(folder / files["optimizer"]["name"]) if "optimizer" in files else {},
    )
