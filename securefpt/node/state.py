"""A node's memory, in its own state folder: what it accepted, offered, trained on and witnessed.

Files (each replaced atomically, so a crash leaves the previous version):
- `runs/<run id>.json`: the experiment accepted in that run, the encoder offered for each
  round, the rounds trained, evaluated and unmasked, the encoders evaluated, the survivor
  sets signed, whether it personalized;
- `encoders.json`: every global encoder this node's update on which may have reached the
  coordinator (lifetime, by hash): in the clear at once, under SecAgg+ once the node
  revealed its unmask shares for that round;
- `held.json`: encoders trained on under SecAgg+ whose round never reached the unmask stage
  here (a coordinator interrupted before it): the same round may be trained again on them,
  in another run, at most `MAX_ATTEMPTS` times (coordinator/checkpoint.py resumes so);
- `ledger-<dataset>.json`: the privacy ledger (node/budget.py);
- `witness.jsonl`: the signed audit heads it witnessed (node/witness.py);
- `personal/<experiment>/`: its local head and personalized model, for the newest
  `keep_personalized` experiments only (node/personal.py);
- `sketches.json`, `sketch.key`: sketches of the encoders it trained on, where its rules refuse
  near copies (node/sketches.py);
- `node.log`: details of refusals and failures, which never leave the node.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


class RunRecord:
    """What this node did in one Flower run (one experiment per run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = read_json(path, {"request": None, "offered": {}, "trained": [], "evaluated": [],
                                                     "signed": {}, "unmasked": []})

    def save(self) -> None:
        write_json(self.path, self.data)

    @property
    def request_json(self) -> Optional[str]:
        return self.data["request"]

    def accept(self, request_json: str) -> None:
        self.data["request"] = request_json
        self.save()

    def offered(self, server_round: int) -> Optional[str]:
        return self.data["offered"].get(str(server_round))

    def offer(self, server_round: int, encoder: str) -> None:
        self.data["offered"][str(server_round)] = encoder
        self.save()

    def done(self, kind: str, server_round: int) -> bool:
        return server_round in self.data.get(kind, [])

    def mark(self, kind: str, server_round: int) -> None:
        self.data.setdefault(kind, []).append(server_round)
        self.save()

    def evaluated_encoder(self, encoder: str) -> bool:
        """Whether this node evaluated `encoder` in this run (the only encoders it personalizes)."""
        return encoder in self.data.get("evaluated-encoders", [])

    def note_evaluated(self, encoder: str) -> None:
        self.data.setdefault("evaluated-encoders", []).append(encoder)
        self.save()

    def signed(self, server_round: int) -> Optional[list[int]]:
        return self.data["signed"].get(str(server_round))

    def sign(self, server_round: int, survivors: list[int]) -> None:
        self.data["signed"][str(server_round)] = survivors
        self.save()

    def trained_encoder(self, server_round: int) -> Optional[str]:
        return self.data.get("trained-encoders", {}).get(str(server_round))

    def note_trained(self, server_round: int, encoder: str) -> None:
        self.data.setdefault("trained-encoders", {})[str(server_round)] = encoder
        self.mark("trained", server_round)


MAX_ATTEMPTS = 3  # trainings of one round on one held encoder (each in its own run)


@lru_cache(maxsize=8)
def _spent(path: str, mtime_ns: int, size: int) -> frozenset:
    """encoders.json as a set, read again only when the file changes (it grows with every round)."""
    return frozenset(read_json(Path(path), []))


class NodeState:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def run(self, run_id: int) -> RunRecord:
        return RunRecord(self.folder / "runs" / f"{int(run_id)}.json")

    def trained_on(self, encoder: str) -> bool:
        """Whether an update of this node on `encoder` may have reached the coordinator."""
        path = self.folder / "encoders.json"
        if not path.is_file():
            return False
        stat = path.stat()
        return encoder in _spent(str(path), stat.st_mtime_ns, stat.st_size)

    def record_encoder(self, encoder: str) -> None:
        path = self.folder / "encoders.json"
        write_json(path, [*read_json(path, []), encoder])
        held = read_json(self.folder / "held.json", {})
        if held.pop(encoder, None) is not None:
            write_json(self.folder / "held.json", held)

    def may_train(self, encoder: str, server_round: int) -> bool:
        """Never on a spent encoder; on a held one only for its own round, a bounded number of times."""
        if self.trained_on(encoder):
            return False
        held = read_json(self.folder / "held.json", {}).get(encoder)
        return held is None or (held["round"] == server_round and held["attempts"] < MAX_ATTEMPTS)

    def hold_encoder(self, encoder: str, server_round: int) -> None:
        """A secure round trains on `encoder`: held until the node reveals its unmask shares."""
        path = self.folder / "held.json"
        held = read_json(path, {})
        attempts = held.get(encoder, {}).get("attempts", 0)
        held[encoder] = {"round": server_round, "attempts": attempts + 1}
        write_json(path, held)

    def release_metric(self, dataset: str, cap: Optional[int]) -> bool:
        """Count one released evaluation figure against the dataset's lifetime cap (False: none left)."""
        path = self.folder / f"releases-{dataset}.json"
        count = int(read_json(path, {"metrics": 0})["metrics"])
        if cap is not None and count >= cap:
            return False
        write_json(path, {"metrics": count + 1})
        return True

    def log(self, event: str, **details: Any) -> None:
        """Append to the node's own log (never sent anywhere)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / "node.log").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": time.time(), "event": event, **details}, default=str) + "\n")
