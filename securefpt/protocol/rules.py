"""What a region's rules forbid in an experiment: the one reading both sides agree on.

The coordinator evaluates it with its copy of the policy to decide eligibility (and
records the text in the audit log); each node evaluates it with its own copy against
the request it received and refuses with the code. Neither trusts the other's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from securefpt.protocol.policy import NodeRules
from securefpt.protocol.request import DPConfig


@dataclass(frozen=True)
class Violation:
    code: str  # a refusal code (protocol/refusals.py)
    text: str  # for the coordinator's audit log and the node's own log


def rule_violations(rules: NodeRules, who: str, secure_aggregation: bool, dp: DPConfig,
                    coordinator_region: Optional[str], paradigm: str = "federated") -> list[Violation]:
    """Everything in an experiment (its secure aggregation, DP and paradigm, run by a coordinator in
    `coordinator_region`) that `rules` (of `who`: a region or a node) forbid; empty: compliant."""
    out = []
    if rules.export_to is not None and coordinator_region not in rules.export_to:
        out.append(Violation("export-forbidden", f"destination not allowed: {who} does not export to the "
                                                 f"coordinator's region '{coordinator_region}'"))
    if paradigm == "centralized":
        out.append(Violation("centralized-forbidden",
                             "the centralized paradigm pools raw data, which residency rules forbid"))
    if rules.require_secure_aggregation and not secure_aggregation:
        out.append(Violation("secagg-required", f"{who} requires secure aggregation (secagg.enabled is false)"))
    need = rules.dp
    if (need.required or need.max_epsilon is not None or need.max_delta is not None) and not dp.enabled:
        out.append(Violation("dp-required", f"{who} requires differential privacy (dp.enabled is false)"))
    if dp.enabled and need.max_epsilon is not None:
        eps = dp.target_epsilon
        if eps is None or eps > need.max_epsilon:
            out.append(Violation("epsilon-above-maximum", f"epsilon {eps} above {who} maximum {need.max_epsilon:g}"))
    if dp.enabled and dp.mode not in need.modes:
        out.append(Violation("dp-mode-forbidden", f"{who} does not allow dp.mode={dp.mode} "
                                                  f"(allowed: {', '.join(need.modes)})"))
    if dp.enabled and need.max_delta is not None and dp.delta > need.max_delta:
        out.append(Violation("delta-above-maximum", f"delta {dp.delta:g} above {who} maximum {need.max_delta:g}"))
    return out
