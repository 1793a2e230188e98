"""Who may take part: the residency policy applied to an experiment and its clients.

The same rule check runs on both sides: the server decides eligibility before the run
(and records every decision in the audit log); each client re-checks its own region's
rules against what the server asks of it (defence in depth, see client_app and mods).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

from securefpt.attestation import check_attestation, load_public
from securefpt.config import ExperimentConfig
from securefpt.errors import ConfigError, FederationError
from securefpt.policy import ClientManifest, Policy, RegionRule, load_manifests, load_policy


@dataclass(frozen=True)
class Decision:
    included: bool
    reason: str


def rule_violations(rule: RegionRule, region: str, cfg: ExperimentConfig, server_region: str) -> list[str]:
    """What in this experiment a region's rules forbid (empty: compliant)."""
    out = []
    if server_region not in rule.export_to:
        out.append(f"destination not allowed: region '{region}' does not export to the server's region '{server_region}'")
    if cfg.paradigm == "centralized":
        out.append("the centralized paradigm pools raw data, which residency rules forbid")
    if rule.require_secure_aggregation and not cfg.secagg.enabled:
        out.append(f"region '{region}' requires secure aggregation (secagg.enabled is false)")
    dp = rule.dp
    if (dp.required or dp.max_epsilon is not None) and not cfg.dp.enabled:
        out.append(f"region '{region}' requires differential privacy (dp.enabled is false)")
    if cfg.dp.enabled and dp.max_epsilon is not None:
        eps = cfg.dp.target_epsilon
        if eps is None or eps > dp.max_epsilon:
            out.append(f"epsilon {eps} above region '{region}' maximum {dp.max_epsilon:g}")
    if cfg.dp.enabled and dp.max_delta is not None and cfg.dp.delta > dp.max_delta:
        out.append(f"delta {cfg.dp.delta:g} above region '{region}' maximum {dp.max_delta:g}")
    return out


def decide_eligibility(policy: Policy, cfg: ExperimentConfig, manifests: dict[str, ClientManifest],
                       now: Optional[datetime] = None) -> dict[str, Decision]:
    """Each client's inclusion in this experiment, with the reason."""
    now = now or datetime.now(timezone.utc)
    authorities = {region: load_public(rule.authority_key) for region, rule in policy.regions.items()}
    decisions: dict[str, Decision] = {}
    for client_id, m in manifests.items():
        if m.language not in cfg.data.languages:
            decisions[client_id] = Decision(False, f"language '{m.language}' is not in this experiment")
            continue
        rule = policy.regions.get(m.region)
        if rule is None:
            decisions[client_id] = Decision(False, f"region '{m.region}' is not in the policy")
            continue
        why = check_attestation(m.attestation, client_id, m.region, authorities[m.region], now)
        if why is None:
            violations = rule_violations(rule, m.region, cfg, policy.server.region)
            why = "; ".join(violations) if violations else None
        decisions[client_id] = Decision(why is None, why or "eligible")
    # cohort minimums: drop the clients of any region whose minimum the cohort cannot meet
    while True:
        included = [c for c, d in decisions.items() if d.included]
        cohort = max(int(cfg.fl.fraction_fit * len(included)), 1) if included else 0
        short = [c for c in included if policy.regions[manifests[c].region].min_cohort > cohort]
        if not short:
            return decisions
        for c in short:
            minimum = policy.regions[manifests[c].region].min_cohort
            decisions[c] = Decision(False, f"cohort of {cohort} below region '{manifests[c].region}' minimum {minimum}")


@dataclass(frozen=True)
class Participant:
    """A language's client in this experiment, and the server's decision about it."""

    client_id: str
    region: Optional[str]
    decision: Decision
    manifest: Optional[ClientManifest] = None  # its registered manifest (what its node must prove)


def participants(cfg: ExperimentConfig, now: Optional[datetime] = None) -> dict[str, Participant]:
    """The server's decision per language; raises when no valid cohort can be formed."""
    if cfg.policy is None:
        return {lang: Participant(lang, None, Decision(True, "eligible (no residency policy)"))
                for lang in cfg.data.languages}
    policy = load_policy(cfg.policy)
    manifests = load_manifests(cfg.clients)
    decisions = decide_eligibility(policy, cfg, manifests, now)
    out: dict[str, Participant] = {}
    for client_id, m in manifests.items():
        if m.language in cfg.data.languages:
            if m.language in out:
                raise ConfigError(f"{cfg.clients}: two clients serve language '{m.language}'")
            out[m.language] = Participant(client_id, m.region, decisions[client_id], m)
    for lang in cfg.data.languages:
        out.setdefault(lang, Participant(lang, None, Decision(False, "no client manifest for this language")))
    if not any(p.decision.included for p in out.values()):
        reasons = "; ".join(f"{p.client_id}: {p.decision.reason}" for p in out.values())
        raise FederationError(f"no client may take part under {cfg.policy.name}: {reasons}")
    return {lang: out[lang] for lang in cfg.data.languages}


@dataclass(frozen=True)
class ClientView:
    """What a client knows of its own standing: its manifest and its region's rule."""

    manifest: ClientManifest
    rule: RegionRule
    server_region: str

    def violations(self, cfg: ExperimentConfig) -> list[str]:
        return rule_violations(self.rule, self.manifest.region, cfg, self.server_region)


def client_view(cfg: ExperimentConfig, language: str, own: Optional[ClientManifest] = None) -> Optional[ClientView]:
    """The client's own manifest (the node's, else the one serving its language) and rule."""
    if cfg.policy is None:
        return None
    policy = load_policy(cfg.policy)
    manifest = own or next((m for m in load_manifests(cfg.clients).values() if m.language == language), None)
    if manifest is None:
        raise ConfigError(f"no client manifest for language '{language}'")
    rule = policy.regions.get(manifest.region)
    if rule is None:
        raise ConfigError(f"region '{manifest.region}' of client '{manifest.client_id}' is not in the policy")
    return ClientView(manifest, rule, policy.server.region)
