"""Who takes part: setup (identity, each node's answer to the request) and the policy's cohort rules.

`Admission` is an object the coordinator's run holds (coordinator/app.py): it hands every
node the experiment request and an identity challenge, binds each node id to the
institution whose attested manifest it proves it holds (`languages`), and applies the
residency policy's decisions and minimum cohorts after setup and before every round.
Eligibility itself (attestations, rules) is decided in coordinator/eligibility.py.
"""

from __future__ import annotations

import time
from typing import Optional

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from securefpt.coordinator.audit_log import AuditLog
from securefpt.coordinator.eligibility import Decision, Participant, cohort_minimums, participants
from securefpt.coordinator.metering import exchange
from securefpt.coordinator.run_dir import ClientRecord
from securefpt.coordinator.verdicts import describe, error_reason
from securefpt.errors import FederationError
from securefpt.experiment.config import ExperimentConfig
from securefpt.protocol.identity import check_proof, new_challenge
from securefpt.protocol.messages import Answer, Identity, Malformed, SetupOffer
from securefpt.protocol.policy import Policy
from securefpt.protocol.request import ExperimentRequest


class Admission:
    """Setup and who takes part; `languages` maps each admitted node id to its institution's language."""

    def __init__(self, cfg: ExperimentConfig, grid: Grid, run_id: int, policy: Optional[Policy],
                 participants: dict[str, Participant], request: ExperimentRequest, audit: AuditLog) -> None:
        self.cfg, self.grid, self.run_id, self.policy = cfg, grid, run_id, policy
        self.participants, self.request, self.audit = participants, request, audit
        self.languages: dict[int, str] = {}  # node id -> language, fixed at setup (authenticated identity)
        self.setup_errors: list[str] = []
        self.refused: dict[str, str] = {}  # language -> why its node(s) were left out

    def wait_for_nodes(self, expected: int, timeout: float = 120.0) -> list[int]:
        deadline = time.monotonic() + timeout
        nodes: list[int] = []
        while time.monotonic() < deadline:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= expected:
                return nodes
            time.sleep(0.1)
        if not nodes:
            raise FederationError(f"no node connected within {timeout:.0f}s")
        return nodes

    def setup(self, nodes: list[int]) -> dict[int, str]:
        """Hand each node the request and an identity challenge; learn who it is and whether it accepts.

        A node whose identity does not hold (identity.py), a second node for a language
        already served, a node that refuses the request and a malformed reply are each
        left out, with the reason in the audit log.
        """
        challenge = new_challenge()
        content = RecordDict({SetupOffer.KEY: SetupOffer(self.request.to_json(), challenge).to_record()})
        msgs = [Message(content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        replies = exchange(self.grid, msgs, timeout=self.cfg.fl.round_timeout)
        for node, reply in sorted(replies, key=lambda pair: pair[0]):
            if reply.has_error():
                self.setup_errors.append(error_reason(reply))
                continue
            try:
                identity, answer = Identity.read(reply.content), Answer.read(reply.content)
            except Malformed:
                self.setup_errors.append("malformed setup reply")
                continue
            language, why = self._identify(node, identity, challenge)
            if why is None and language in self.languages.values():
                why = f"language '{language}' is already served by another node"
            if why is None and not answer.accept:
                why = "refused the experiment: " + describe(answer.code, "no reason code")
            if self.policy is not None:
                self.audit.append("identity", node=node, language=language,
                                           client=identity.client_id or None,
                                           accepted=why is None, reason=why or "identity holds")
            if why is not None:
                if language is not None:
                    self.refused.setdefault(language, why)
                continue
            self.languages[node] = language
        for reason in self.setup_errors:
            self.audit.append("node_failed_setup", reason=reason)
        if not self.languages:
            raise FederationError("every node failed setup: "
                                  + "; ".join(sorted(set(self.setup_errors) | set(self.refused.values()))[:3]))
        return self.languages

    def _identify(self, node: int, identity: Identity, challenge: str) -> tuple[Optional[str], Optional[str]]:
        """(language, None) when this node may act for the institution it names; else (language?, why not).

        With a policy the language is the one the registered, attested manifest serves,
        never the node's own claim; without one (local trials) the node's word is taken.
        """
        claimed = identity.client_id
        if self.policy is None:
            return identity.language, None
        who = next((p for p in self.participants.values() if p.client_id == claimed and p.manifest), None)
        if who is None:
            return None, f"client '{claimed}' is not registered for this experiment"
        language = who.manifest.language
        why = check_proof(who.manifest, claimed, identity.proof, self.run_id, node, challenge,
                          self.policy.server.require_key_proof)
        return language, why

    def recheck_policy(self, server_round: int, eligible: list[int]) -> list[int]:
        """Decide again before this round (an attestation may have expired since the last)."""
        try:
            now = participants(self.cfg)
        except FederationError as exc:
            now, reason = {}, str(exc)
        keep = [n for n in eligible if self.languages[n] in now and now[self.languages[n]].decision.included]
        for n in eligible:
            if n not in keep:
                lang = self.languages[n]
                why = now[lang].decision.reason if lang in now else reason
                self.audit.append("eligibility", round=server_round, client=lang, included=False, reason=why)
        return keep

    def within_minimums(self, server_round: int, selected: list[int]) -> list[int]:
        """The selected nodes whose regions' minimum cohorts this round meets: a round that cannot be
        aggregated for a node is not started for it (it would refuse, and spend nothing, anyway)."""
        if self.policy is None:
            return selected
        regions = {n: self.participants[self.languages[n]].region for n in selected}
        kept = cohort_minimums(self.policy, {n: Decision(True, "selected") for n in selected}, regions)
        for n, decision in kept.items():
            if not decision.included:
                self.audit.append("eligibility", round=server_round, client=self.languages[n],
                                           included=False, reason=decision.reason)
        return [n for n in selected if kept[n].included]

    def admit(self) -> tuple[dict[str, ClientRecord], list[int]]:
        """Each institution's record (included or why not) and the nodes that take part."""
        why_missing = "failed setup: " + ("; ".join(sorted(set(self.setup_errors))) or "no reply")
        clients: dict[str, ClientRecord] = {}
        for lang, who in self.participants.items():
            answered = lang in self.languages.values()
            included = who.decision.included and answered
            missing = f"left out at setup: {self.refused[lang]}" if lang in self.refused else why_missing
            reason = who.decision.reason if not who.decision.included else ("eligible" if answered else missing)
            clients[who.client_id] = ClientRecord(region=who.region, language=lang, included=included, reason=reason)
        if self.policy is not None:  # setup failures may leave a region's minimum cohort unmet: decide again
            by_client = {c: Decision(r.included, r.reason) for c, r in clients.items()}
            regions = {c: r.region for c, r in clients.items() if r.region is not None}
            decided = cohort_minimums(self.policy, {c: d for c, d in by_client.items() if c in regions}, regions,
                                      self.cfg.fl.fraction_fit, " after setup")
            for c, d in decided.items():
                clients[c] = ClientRecord(region=clients[c].region, language=clients[c].language, included=d.included,
                                          reason=d.reason if not d.included else clients[c].reason)
        admitted = {c.language for c in clients.values() if c.included}
        return clients, sorted(n for n, lang in self.languages.items() if lang in admitted)
