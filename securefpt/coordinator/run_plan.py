"""A federated run resolved once, before its first message, for both engines.

`resolve_run` reads what a run depends on from the operator's files: the experiment (with
its label space), the residency policy and its decisions about each institution, the request
every node will receive, and the checkpoint a restarted coordinator goes on from. The
simulation engine resolves it in its preflight (engines/preflight.py), `flwr run .` in its
ServerApp (engines/flower_run.py); the round loop (coordinator/app.py) only reads it.

One thing is decided again on purpose: before every round after the first, admission
re-reads the policy file and the manifests (`Admission.recheck_policy`), so an attestation
that expired or a region whose rules changed during the run drops out of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from securefpt.coordinator.checkpoint import RunState, load_checkpoint
from securefpt.coordinator.eligibility import Participant, participants
from securefpt.experiment.config import ExperimentConfig
from securefpt.experiment.trial_data import label_space
from securefpt.protocol.policy import Policy, load_policy
from securefpt.protocol.request import ExperimentRequest


@dataclass(frozen=True)
class RunPlan:
    """Everything a federated run reads before its first message."""

    cfg: ExperimentConfig  # with its label space filled in
    out_dir: Path
    policy: Optional[Policy]  # as at the start of the run
    participants: dict[str, Participant]  # language -> institution and the policy's decision
    request: ExperimentRequest  # what every node is asked
    resumed: Optional[RunState]  # the checkpoint a restarted coordinator goes on from; None: a fresh run

    @property
    def labels(self) -> list[str]:
        return self.request.labels


def resolve_run(cfg: ExperimentConfig, out_dir: Path) -> RunPlan:
    """Resolve `cfg` into `out_dir` (ConfigError, FederationError: the run cannot start)."""
    labels = list(cfg.data.labels) if cfg.data.labels else label_space(cfg.data)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": labels})})
    policy = load_policy(cfg.policy) if cfg.policy is not None else None
    return RunPlan(cfg=cfg, out_dir=Path(out_dir), policy=policy, participants=participants(cfg, policy),
                   request=cfg.request(labels), resumed=load_checkpoint(out_dir, cfg, policy=policy))
