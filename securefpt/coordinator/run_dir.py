"""A run directory: summary.json, per-round CSV, accuracy plot, trainable parameters.

Layout (the interface other tools rely on, see DESIGN):
    summary.json                  figures of the run
    metrics.csv                   one row per round
    accuracy.png                  accuracy per language over rounds
    prompt_encoder.safetensors    final trainable parameters, keyed by name
    adapter_config.json,          the same as a standard PEFT adapter (PeftModel.from_pretrained)
      adapter_model.safetensors
    classifier_head.safetensors,  the head and its labels (securefpt.load_classifier)
      classifier.json
    README.md                     the adapter's model card: task, languages, base model, DP, decisions
    languages/<language>/         the same, per language, for a monolingual run
    config.yaml, labels.json      the experiment and its label space
    request.json                  what the nodes were asked (the classifier is built from it)
    audit.jsonl                   the run's decisions, hash-chained, signed with the coordinator's key
    checkpoint/                   the state after the last aggregate or completed round (resume)
    nodes/                        the simulation engine's node state (and trial nodes' files)
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from securefpt.coordinator.audit_key import coordinator_key
from securefpt.coordinator.audit_log import AuditLog
from securefpt.coordinator.model_card import write_model_card
from securefpt.coordinator.summary import Communication, FinalFigures, RunSummary
from securefpt.errors import ConfigError
from securefpt.experiment.config import ExperimentConfig
from securefpt.learning.adapter import save_classifier
from securefpt.learning.artifacts import ARTIFACT, save_arrays
from securefpt.learning.builtin_models import model_facts
from securefpt.protocol.audit import file_sha256
from securefpt.protocol.policy import Policy
from securefpt.protocol.request import REQUEST_FILE, ExperimentRequest


@dataclass
class RoundRecord:
    round: int
    accuracy: dict[str, float]
    seconds: float
    train_seconds: Optional[float] = None  # the training (and aggregation) part of `seconds`
    participants: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    train_loss: Optional[float] = None
    bytes_up: int = 0
    bytes_down: int = 0
    exchanges: int = 0  # message exchanges with the nodes (pushes), training and evaluation together
    exchange_seconds: list[float] = field(default_factory=list)  # each exchange's push to last reply
    aborted: bool = False
    declined: dict[str, str] = field(default_factory=dict)  # client -> why it sat this round out
    epsilon: Optional[dict[str, float]] = None  # cumulative, per client, after this round

    def avg(self) -> float:
        return float(np.mean(list(self.accuracy.values()))) if self.accuracy else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["accuracy"] = {**self.accuracy, "avg": self.avg()}
        return out


class Tracker:
    """TensorBoard scalars of every round, where the experiment asks for them (`tensorboard: true`)."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard: true needs TensorBoard: pip install 'securefpt[tracking]'") from None
        self.writer = SummaryWriter(str(folder))

    def add_round(self, record: RoundRecord) -> None:
        for language, value in {**record.accuracy, "avg": record.avg()}.items():
            self.writer.add_scalar(f"accuracy/{language}", value, record.round)
        for language, value in (record.epsilon or {}).items():
            self.writer.add_scalar(f"epsilon/{language}", value, record.round)
        self.writer.add_scalar("bytes/up", record.bytes_up, record.round)
        self.writer.add_scalar("bytes/down", record.bytes_down, record.round)
        self.writer.flush()


@dataclass
class ClientRecord:
    region: Optional[str]
    language: str
    included: bool
    reason: str


class RunRecorder:
    """Collects a run's rounds and writes the run directory."""

    def __init__(self, out_dir: Path, cfg: ExperimentConfig, request: ExperimentRequest,
                 resumed: Optional[list[RoundRecord]] = None, policy: Optional[Policy] = None) -> None:
        """`request`: what the nodes are asked (its labels are the run's); `resumed`: the rounds a restarted
        run already completed (checkpoint.py); `policy`: the run's (None: cfg.policy, read here)."""
        labels = request.labels
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.labels = labels
        self.rounds: list[RoundRecord] = list(resumed or [])
        self.tracker = Tracker(self.out_dir / "tensorboard") if cfg.tensorboard else None
        self.key, self.audit_public_key = coordinator_key(cfg, self.out_dir, policy)
        self.audit = AuditLog(self.out_dir / "audit.jsonl", self.key)
        digest = cfg.sha256()
        if resumed is not None:
            self.audit.append("run_resumed", after_round=self.rounds[-1].round if self.rounds else 0,
                              config_sha256=digest)
        else:
            self.audit.append(
                "run_start", name=cfg.name, paradigm=cfg.paradigm, config_sha256=digest,
                policy=str(cfg.policy) if cfg.policy else None,
                policy_sha256=file_sha256(cfg.policy) if cfg.policy and cfg.policy.is_file() else None,
                config=json.loads(cfg.to_json()),
            )
        (self.out_dir / "config.yaml").write_text(
            yaml.safe_dump(json.loads(cfg.to_json()), sort_keys=False), encoding="utf-8"
        )
        (self.out_dir / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
        (self.out_dir / REQUEST_FILE).write_text(request.to_json(), encoding="utf-8")

    def add_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        self.audit.append("round", **record.to_dict())
        self._write_csv()
        if self.tracker is not None:
            self.tracker.add_round(record)

    def _write_csv(self) -> None:
        languages = self.cfg.data.languages
        with (self.out_dir / "metrics.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["round", *languages, "avg", "seconds", "bytes_up", "bytes_down", "aborted"])
            for r in self.rounds:
                writer.writerow(
                    [r.round, *[r.accuracy.get(lang, "") for lang in languages], r.avg(),
                     round(r.seconds, 3), r.bytes_up, r.bytes_down, r.aborted]
                )

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        xs = [r.round for r in self.rounds]
        for lang in self.cfg.data.languages:
            if any(lang in r.accuracy for r in self.rounds):  # excluded clients have no curve
                ax.plot(xs, [r.accuracy.get(lang, np.nan) for r in self.rounds], marker="o", label=lang)
        ax.plot(xs, [r.avg() for r in self.rounds], "k--", linewidth=2, label="average")
        ax.set_xlabel("round" if self.cfg.paradigm == "federated" else "round (local epochs block)")
        ax.set_ylabel("accuracy (held-out)")
        ax.set_ylim(0, 1)
        ax.set_title(f"{self.cfg.name}: {self.cfg.paradigm} {self.cfg.peft.method}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", ncol=3, fontsize=8)
        fig.tight_layout()
        path = self.out_dir / "accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def write_summary(
        self,
        final: RoundRecord,
        trainable_params: int,
        total_params: int,
        clients: dict[str, ClientRecord],
        privacy: Optional[dict[str, Any]] = None,
        secure_aggregation: Optional[dict[str, Any]] = None,
        personalized: Optional[dict[str, Optional[float]]] = None,
        stopped: Optional[str] = None,
        stopped_by_refusals: bool = False,
    ) -> dict[str, Any]:
        """`summary.json` (coordinator/summary.py: RunSummary); `personalized`: the nodes' released accuracies
        of their personalized models; `stopped`: why the run ended before its last round."""
        languages = self.cfg.data.languages
        if personalized is not None:
            values = [v for v in personalized.values() if v is not None]
            personalized = {**personalized, "avg": sum(values) / len(values) if values else None}
        summary = RunSummary(
            name=self.cfg.name, paradigm=self.cfg.paradigm, peft_method=self.cfg.peft.method,
            model=self.cfg.model.name, backbone=backbone_facts(self.cfg.model.name, languages), labels=self.labels,
            final=FinalFigures(round=final.round, accuracy={**final.accuracy, "avg": final.avg()},
                               personalized_accuracy=personalized),
            rounds=[r.to_dict() for r in self.rounds], trainable_params=trainable_params, total_params=total_params,
            communication=Communication(bytes_up=int(sum(r.bytes_up for r in self.rounds)),
                                        bytes_down=int(sum(r.bytes_down for r in self.rounds))),
            privacy=privacy or {"epsilon": {lang: None for lang in languages}, "delta": None,
                                "noise_multiplier": None, "sample_rate": None,
                                "steps": {lang: None for lang in languages}, "accountant": None},
            secure_aggregation=secure_aggregation or {"enabled": False},
            clients={k: asdict(v) for k, v in clients.items()}, audit_log=str(self.audit.path),
            audit_public_key=str(self.audit_public_key),
            artifact=str(self.out_dir / ARTIFACT) if (self.out_dir / ARTIFACT).exists() else None,
            stopped_before_the_last_round=stopped, stopped_by_refusals=stopped_by_refusals,
        )
        self.plot()
        summary = summary.model_copy(update={"audit_head": self.audit.append("run_end", final_avg=final.avg(),
                                                                             rounds=len(self.rounds))})
        summary.write(self.out_dir / "summary.json")
        written = summary.to_dict()
        for folder in [self.out_dir, *sorted((self.out_dir / "languages").glob("*/"))]:
            if (folder / "classifier.json").is_file():  # the adapter's card (PEFT's own is an empty template)
                write_model_card(folder, written)
        return written

    def save_artifact(self, arrays: "dict[str, np.ndarray]", language: Optional[str] = None,
                      region: Optional[str] = None) -> Path:
        """The final trainable parameters (securefpt's file, keyed by name) and the same as a PEFT adapter
        with its head (learning/adapter.py): in the run directory, or `languages/<language>/` for one
        language of a monolingual run."""
        folder = self.out_dir if language is None else self.out_dir / "languages" / language
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ARTIFACT
        save_arrays(path, arrays, metadata={"peft_method": self.cfg.peft.method, "model": self.cfg.model.name})
        save_classifier(folder, self.cfg.model, self.cfg.peft, arrays, self.labels, self.cfg.seed)
        adapter = folder / "adapter_model.safetensors"
        self.audit.append("artifact", path=str(path), sha256=file_sha256(path), storage_region=region,
                          adapter_sha256=file_sha256(adapter) if adapter.is_file() else None)
        return path


def backbone_facts(name: str, languages: list[str]) -> dict[str, Any]:
    """What the summary says of the frozen model: its origin, its weights (a 4-bit origin where so) and
    which of the run's languages its pretraining did not cover (None where unknown)."""
    facts = model_facts(name)
    outside = None if facts.pretraining_languages is None else \
        [lang for lang in languages if lang not in facts.pretraining_languages]
    return {"name": name, "origin": facts.origin, "weights": facts.weights,
            "languages_outside_pretraining": outside}


def privacy_summary(cfg: ExperimentConfig, reports: dict[str, dict]) -> dict:
    """`summary.json` privacy section from the nodes' latest released reports (null where not released)."""
    langs = cfg.data.languages
    get = lambda key: {lang: reports.get(lang, {}).get(key) for lang in langs}  # noqa: E731
    return {
        "enabled": cfg.dp.enabled,
        "mode": cfg.dp.mode if cfg.dp.enabled else None,
        "epsilon": get("epsilon"),
        # distributed mode: each node's guarantee from its own noise share alone (full collusion)
        "epsilon_alone": get("epsilon-alone") if cfg.dp.distributed else None,
        "sum_noise_multiplier": cfg.dp.noise_multiplier if cfg.dp.distributed else None,
        "delta": cfg.dp.delta if cfg.dp.enabled else None,
        "noise_multiplier": get("noise-multiplier") if cfg.dp.enabled else None,
        "sample_rate": get("sample-rate") if cfg.dp.enabled else None,
        "steps": get("steps"),
        "accountant": "rdp (Skellam)" if cfg.dp.distributed else cfg.dp.accountant if cfg.dp.enabled else None,
        "target_epsilon": cfg.dp.target_epsilon if cfg.dp.enabled else None,
        "max_grad_norm": cfg.dp.max_grad_norm if cfg.dp.enabled else None,
    }
