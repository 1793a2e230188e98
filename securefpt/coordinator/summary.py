"""`summary.json`: what a finished run reports, typed. Other tools read these keys (the design's
interface: final and per-round accuracy, parameter counts, traffic, privacy, secure aggregation,
the institutions and the audit log), so the coordinator writes them through this model only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FinalFigures(_Section):
    """The last evaluated global encoder's accuracy per language (null where a node withholds it) and
    `avg`; personalized runs add each node's own model's (`personalized_accuracy`)."""

    round: int
    accuracy: dict[str, Optional[float]]
    personalized_accuracy: Optional[dict[str, Optional[float]]] = None


class Communication(_Section):
    bytes_up: int
    bytes_down: int
    measured_from: str = "serialized Flower messages (protobuf)"


class RunSummary(_Section):
    """One run's report (coordinator/run_dir.py writes it; `securefpt run` prints it)."""

    name: str
    paradigm: str
    peft_method: str
    model: str
    backbone: dict[str, Any]
    labels: list[str]
    final: FinalFigures
    rounds: list[dict[str, Any]]  # RoundRecord.to_dict() of every round
    trainable_params: int
    total_params: int
    communication: Communication
    privacy: dict[str, Any]  # run_dir.privacy_summary: null where DP is off or a node does not release it
    secure_aggregation: dict[str, Any]
    clients: dict[str, dict[str, Any]]  # client -> region, language, included, reason
    audit_log: str
    audit_public_key: str
    artifact: Optional[str]
    audit_head: Optional[str] = None
    stopped_before_the_last_round: Optional[str] = None  # why the run ended early (None: it did not)
    stopped_by_refusals: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump(mode="json")
        if self.final.personalized_accuracy is None:  # only personalized runs carry the key
            del out["final"]["personalized_accuracy"]
        return out

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> "RunSummary":
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
