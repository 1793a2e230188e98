"""What a node may say when it says no: a fixed reason code and a fixed message, nothing else.

Flower hands a ClientApp's error text to the coordinator (`Error.reason`), so an
exception message on a node is data sent to the coordinator. A node therefore answers
every refusal and every failure with one of the codes below and its fixed message;
whatever detail it knows (a path, a label, a number) goes to its own log only
(`securefpt.node.guards.hygiene_mod`). The coordinator reads the code back with
`parse` and records it in the audit log.
"""

from __future__ import annotations

from typing import Optional

REFUSAL_ERROR_CODE = 4031  # Flower Error.code of every node refusal
PREFIX = "securefpt-refusal"

MESSAGES: dict[str, str] = {
    # the request itself
    "malformed-request": "the request is not a valid securefpt message",
    "no-setup": "no experiment was accepted for this run",
    "setup-changed": "another experiment was already accepted for this run",
    "unknown-task": "this node binds no data to the requested task",
    "model-not-allowed": "this node does not load the requested model",
    "labels-outside-task": "this node's data has labels outside the task's label space",
    "data-unavailable": "this node's data could not be read",
    "identity-invalid": "this node's own identity does not verify against its trust store",
    # the node's rules
    "export-forbidden": "this node's region does not export to the coordinator's region",
    "centralized-forbidden": "this node never sends raw data",
    "secagg-required": "this node's region requires secure aggregation",
    "dp-required": "this node's region requires differential privacy",
    "epsilon-above-maximum": "the requested epsilon is above this node's maximum",
    "delta-above-maximum": "the requested delta is above this node's maximum",
    "dp-mode-forbidden": "this node's region does not allow the requested DP mode",
    "cohort-below-minimum": "the cohort is below this node's minimum",
    "protocol-parameters": "the secure aggregation parameters are below this node's rules",
    # budget and replay
    "budget-exhausted": "this round would exceed this node's privacy budget",
    "noise-swamps-signal": "the planned DP noise would swamp the update (noise-to-signal far above what "
                           "trains): use larger batches, fewer steps or a larger epsilon",
    "round-out-of-plan": "this round is not part of the accepted experiment",
    "round-replayed": "this node already answered this round of this run",
    "encoder-reused": "this node already contributed on this global encoder",
    "encoder-not-offered": "the encoder is not the one offered for this round",
    "evaluation-repeated": "this node already evaluated for this round of this run",
    "personalization-refused": "personalization is not planned, was done already, or names an encoder "
                               "this node did not evaluate in this run",
    # secure aggregation
    "peer-unauthenticated": "a peer's key advertisement does not verify against this node's trust store",
    "unmask-unsafe": "the unmask request could reveal a single node's update",
    "views-inconsistent": "too few peers signed the same survivor set",
    "update-not-finite": "the update holds non-finite values",
    "update-out-of-range": "the weighted update would be clipped by the quantizer",
    "weight-out-of-range": "the update's weight is outside (0, 1]",
    # audit witnessing
    "audit-fork": "the audit head does not extend the head this node witnessed",
    # anything else
    "node-error": "the node failed; the details are in its local log",
}


class NodeRefusal(Exception):
    """Raised on a node to refuse; only `code` (and its fixed message) ever leaves the node."""

    def __init__(self, code: str, detail: str = "") -> None:
        if code not in MESSAGES:
            raise ValueError(f"unknown refusal code {code!r}")
        self.code = code
        self.detail = detail  # for the node's own log only
        super().__init__(f"{code}: {detail}" if detail else code)


def reason(code: str) -> str:
    """The `Error.reason` a node sends for `code`."""
    return f"{PREFIX}:{code}: {MESSAGES[code]}"


def parse(text: Optional[str]) -> Optional[str]:
    """The refusal code in an `Error.reason` (None when it is not a securefpt refusal)."""
    if not text or not text.startswith(PREFIX + ":"):
        return None
    code = text[len(PREFIX) + 1:].split(":", 1)[0]
    return code if code in MESSAGES else None
