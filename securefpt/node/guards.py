"""What a node refuses, in one place: the checks its handlers run before anything leaves.

- `check_request`: an experiment against the node's own rules and budget (setup);
- `check_training`: a training round against what the node accepted, offered and did
  before (no plaintext where secure aggregation was accepted or is required, no round
  outside the plan, no replay of a round, no second contribution on the same global
  encoder, the encoder offered for the round, the privacy budget);
- `check_offer`: the next round, before the node says it will take part.

And the outermost mod, `hygiene_mod`: every refusal and every failure leaves the node as
a fixed reason code (protocol/refusals.py); the detail stays in the node's own log.
`fault_injection_mod` makes a node die at a chosen point, for drills and tests.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Optional

from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from securefpt.errors import SecureFPTError
from securefpt.node.budget import Accounting
from securefpt.node.config import Node, this_node
from securefpt.node.sketches import Sketches
from securefpt.node.state import NodeState, RunRecord
from securefpt.protocol.refusals import REFUSAL_ERROR_CODE, NodeRefusal, reason
from securefpt.protocol.request import ExperimentRequest
from securefpt.protocol.rules import rule_violations


def check_request(node: Node, request: ExperimentRequest, run: RunRecord) -> list[str]:
    """Refusal codes for an experiment request (empty: the node accepts it)."""
    if run.request_json is not None and run.request_json != request.to_json():
        return ["setup-changed"]
    return [v.code for v in rule_violations(node.rules, "this node", request.secure_aggregation, request.dp,
                                            node.coordinator_region)]


def near_copy(node: Node, encoder: str, arrays) -> bool:
    """An encoder within the node's `differencing.min_encoder_distance` of another it trained on."""
    distance = node.rules.differencing.min_encoder_distance
    return distance > 0 and Sketches(node.state_dir, node.federation).nearest(arrays, encoder) < distance


def check_training(node: Node, run: RunRecord, request: ExperimentRequest, server_round: int, encoder: str,
                   arrays, secure: bool, dp: Optional[Accounting]) -> None:
    """Raise the refusal for a training request this node must not answer."""
    if not secure and (request.secure_aggregation or node.rules.require_secure_aggregation):
        raise NodeRefusal("secagg-required", "plaintext training request")
    if not 1 <= server_round <= request.training.rounds:
        raise NodeRefusal("round-out-of-plan", f"round {server_round} of {request.training.rounds}")
    if run.done("trained", server_round):
        raise NodeRefusal("round-replayed", f"round {server_round} was trained in this run")
    offered = run.offered(server_round)
    if (offered is not None or run.done("evaluated", server_round - 1)) and offered != encoder:
        raise NodeRefusal("encoder-not-offered", f"round {server_round}")
    if not NodeState(node.state_dir).may_train(encoder, server_round):
        raise NodeRefusal("encoder-reused", encoder)
    if near_copy(node, encoder, arrays):
        raise NodeRefusal("encoder-reused", f"{encoder}: a near copy of an encoder this node trained on")
    if dp is not None:
        dp.ledger.authorize(request.sha256(), dp.plan)


def check_offer(node: Node, request: ExperimentRequest, next_round: int, encoder: str, arrays,
                dp: Optional[Accounting]) -> str:
    """Whether this node will train round `next_round` on `encoder`: "ok" or a refusal code."""
    if not 1 <= next_round <= request.training.rounds:
        return "round-out-of-plan"
    if not NodeState(node.state_dir).may_train(encoder, next_round) or near_copy(node, encoder, arrays):
        return "encoder-reused"
    if dp is not None and not dp.ledger.allows_round(request.sha256(), dp.plan):
        return "budget-exhausted"
    return "ok"


def _state_of(context: Context) -> Optional[NodeState]:
    try:
        return NodeState(this_node(context).state_dir)
    except Exception:  # the configuration itself is broken: stderr is the node's only local log
        return None


def hygiene_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost: nothing read from the node's data or files reaches the coordinator in an error."""
    try:
        return call_next(msg, context)
    except NodeRefusal as exc:
        code, detail = exc.code, exc.detail
    except SecureFPTError as exc:  # the node's own files: a line, not a traceback
        code, detail = "node-error", str(exc)
    except Exception as exc:  # a bug, a broken file, a crash inside Flower's SecAgg+: details stay here
        code, detail = "node-error", "".join(traceback.format_exception(exc))
    state = _state_of(context)
    if state is not None:
        state.log("refused", code=code, message_type=msg.metadata.message_type, run=context.run_id, detail=detail)
    else:
        print(f"securefpt node refused ({code}): {detail}", file=sys.stderr)
    return Message(Error(code=REFUSAL_ERROR_CODE, reason=reason(code)), reply_to=msg)


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Die on purpose: SECUREFPT_FAULTS="lang@stage[:kill-node],..." (stage: setup, train,
    collect, unmask, evaluate). Plain, the handler fails; with `:kill-node` the whole
    SuperNode is killed (SIGKILL to its process group), for deployment drills only."""
    spec = os.environ.get("SECUREFPT_FAULTS", "")
    if spec:
        language = this_node(context).language
        stage = {MessageType.QUERY: "setup", MessageType.EVALUATE: "evaluate"}.get(msg.metadata.message_type, "train")
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None:
            stage = {Stage.COLLECT_MASKED_VECTORS: "collect", Stage.UNMASK: "unmask"}.get(
                str(configs.get(Key.STAGE)), str(configs.get(Key.STAGE)))
        for item in spec.split(","):
            lang, _, at = item.strip().partition("@")
            at, _, how = at.partition(":")
            if lang == language and at == stage:
                if how == "kill-node":
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                raise RuntimeError(f"injected fault: {lang} dies at {at}")
    return call_next(msg, context)
