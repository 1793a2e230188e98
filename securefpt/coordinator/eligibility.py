"""Where eligibility is decided: the coordinator's reading of the residency policy.

Before the run (and again every round: attestations expire) the coordinator applies
its copy of the policy to every registered institution and records each decision in
the audit log. This is the coordinator's view only: every node checks the same rules
against the request with its own copy (securefpt.node.guards) and refuses on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from securefpt.errors import ConfigError, FederationError
from securefpt.experiment.config import ExperimentConfig
from securefpt.protocol.attestation import check_attestation
from securefpt.protocol.policy import ClientManifest, Policy, load_manifests, load_policy
from securefpt.protocol.rules import rule_violations


@dataclass(frozen=True)
class Decision:
    included: bool
    reason: str


def decide_eligibility(policy: Policy, cfg: ExperimentConfig, manifests: dict[str, ClientManifest],
                       now: Optional[datetime] = None) -> dict[str, Decision]:
    """Each institution's inclusion in this experiment, with the reason."""
    now = now or datetime.now(timezone.utc)
    authorities = policy.authorities()
    decisions: dict[str, Decision] = {}
    for client_id, m in manifests.items():
        if m.language not in cfg.data.languages:
            decisions[client_id] = Decision(False, f"language '{m.language}' is not in this experiment")
            continue
        rule = policy.regions.get(m.region)
        if rule is None:
            decisions[client_id] = Decision(False, f"region '{m.region}' is not in the policy")
            continue
        why = check_attestation(m.attestation, client_id, m.region, authorities[m.region], now, m.language)
        if why is None:
            violations = rule_violations(rule, f"region '{m.region}'", cfg.secagg.enabled, cfg.dp,
                                         policy.server.region, cfg.paradigm)
            why = "; ".join(v.text for v in violations) if violations else None
        decisions[client_id] = Decision(why is None, why or "eligible")
    return cohort_minimums(policy, decisions, {c: m.region for c, m in manifests.items()}, cfg.fl.fraction_fit)


def cohort_minimums(policy: Policy, decisions: dict[str, Decision], regions: dict[str, str],
                    fraction: float = 1.0, why: str = "") -> dict[str, Decision]:
    """Drop, until none is left to drop, every included institution whose region's minimum cohort
    the cohort of the included ones (C x K of them) cannot meet."""
    decisions = dict(decisions)
    while True:
        included = [c for c, d in decisions.items() if d.included]
        cohort = max(int(fraction * len(included)), 1) if included else 0
        short = [c for c in included if policy.regions[regions[c]].min_cohort > cohort]
        if not short:
            return decisions
        for c in short:
            minimum = policy.regions[regions[c]].min_cohort
            decisions[c] = Decision(False, f"cohort of {cohort} below region '{regions[c]}' minimum {minimum}{why}")


@dataclass(frozen=True)
class Participant:
    """A language's institution in this experiment, and the coordinator's decision about it."""

    client_id: str
    region: Optional[str]
    decision: Decision
    manifest: Optional[ClientManifest] = None  # its registered manifest (what its node must prove)


def participants(cfg: ExperimentConfig, policy: Optional[Policy] = None,
                 now: Optional[datetime] = None) -> dict[str, Participant]:
    """The coordinator's decision per language (under `policy`, or cfg.policy read now); raises when no
    valid cohort can be formed."""
    if cfg.policy is None:
        return {lang: Participant(lang, None, Decision(True, "eligible (no residency policy)"))
                for lang in cfg.data.languages}
    policy = policy or load_policy(cfg.policy)
    if policy.server.region not in policy.server.artifact_regions:  # the run's result could not be kept
        raise FederationError(f"{cfg.policy}: the policy forbids storing the artifact in the coordinator's region "
                              f"'{policy.server.region}' (server.artifact_regions)")
    manifests = load_manifests(cfg.clients)
    decisions = decide_eligibility(policy, cfg, manifests, now)
    out: dict[str, Participant] = {}
    for client_id, m in manifests.items():
        if m.language in cfg.data.languages:
            if m.language in out:
                raise ConfigError(f"{cfg.clients}: two institutions serve language '{m.language}'")
            out[m.language] = Participant(client_id, m.region, decisions[client_id], m)
    for lang in cfg.data.languages:
        out.setdefault(lang, Participant(lang, None, Decision(False, "no institution manifest for this language")))
    if not any(p.decision.included for p in out.values()):
        reasons = "; ".join(f"{p.client_id}: {p.decision.reason}" for p in out.values())
        raise FederationError(f"no institution may take part under {cfg.policy.name}: {reasons}")
    return {lang: out[lang] for lang in cfg.data.languages}
