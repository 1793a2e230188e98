"""Client-side mods: what a client enforces whatever the server asks.

`hardened_secaggplus_mod` wraps Flower's `secaggplus_mod` and closes the gaps that
SecAgg+ leaves against a misbehaving server:
- it refuses an unmask request whose surviving and dropped sets overlap (answering
  both would hand the server both masks of one client) or that names fewer surviving
  contributors than the minimum cohort (an "aggregate" of one is that client's update);
- it fails the round loudly when its weighted update would be clipped by the
  quantizer, instead of silently corrupting the sum;
- it strips the plaintext dataset size and training metrics from the masked reply:
  the weight travels inside the masked vector only.
Messages that are not part of a SecAgg+ round go straight to the handler.

`residency_guard_mod` refuses training that the client's own region forbids.
`fault_injection_mod` makes a client die at a chosen point, for drills and tests.
"""

from __future__ import annotations

import os
import signal
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

GUARD_REFUSAL_CODE = 4031
SETUP_KEY = "securefpt-setup"
GUARD_STATE = "securefpt-guard"


class UpdateOutOfRange(RuntimeError):
    """The weighted update would be clipped by SecAgg+'s quantizer."""


def _refuse(msg: Message, context: Context, reason: str) -> Message:
    refusals = context.state.config_records.get(GUARD_STATE, ConfigRecord({"refusals": []}))
    context.state.config_records[GUARD_STATE] = ConfigRecord(
        {"refusals": [*cast(list, refusals["refusals"]), reason]}
    )
    return Message(Error(code=GUARD_REFUSAL_CODE, reason=f"securefpt guard refused: {reason}"), reply_to=msg)


def check_unmask_request(active: list[int], dead: list[int], min_cohort: int) -> str | None:
    """Why an unmask request must be refused, or None when it is safe to answer."""
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        return "node listed twice"
    both = set(active) & set(dead)
    if both:
        return f"nodes {sorted(both)} are listed as both surviving and dropped"
    if len(active) < min_cohort:
        return f"only {len(active)} surviving contributors, minimum cohort is {min_cohort}"
    return None


def _min_cohort(context: Context) -> int:
    setup = context.state.config_records.get(SETUP_KEY)
    return 2 if setup is None else max(2, int(setup["min-cohort"]))


def residency_guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse any training request that this client's region forbids, before any training.

    The server's experiment was checked at setup (`violations`), but a hostile server
    could still send a plaintext training request to a region that requires secure
    aggregation: only SecAgg+ stage messages may carry training then.
    """
    setup = context.state.config_records.get(SETUP_KEY)
    if setup is not None and msg.metadata.message_type == MessageType.TRAIN:
        violations = list(setup["violations"])
        if violations:
            return _refuse(msg, context, "residency policy: " + "; ".join(str(v) for v in violations))
        if bool(setup["require-secagg"]) and RECORD_KEY_CONFIGS not in msg.content.config_records:
            return _refuse(msg, context, "residency policy: this region requires secure aggregation")
    return call_next(msg, context)


def _checked_handler(context: Context, call_next: ClientAppCallable) -> ClientAppCallable:
    """The train handler, followed by the range check against SecAgg+'s clipping."""

    def handler(msg: Message, ctxt: Context) -> Message:
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        state = context.state.config_records[RECORD_KEY_STATE]
        clip, max_weight = float(state["clipping_range"]), float(state["max_weight"])
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        ratio = fitres.num_examples / max_weight
        if ratio > 1:
            raise UpdateOutOfRange(f"|D_k|={fitres.num_examples} exceeds secagg.max_weight={max_weight:g}")
        peak = max((float(np.abs(a).max()) for a in parameters_to_ndarrays(fitres.parameters) if a.size), default=0.0)
        if ratio * peak > clip:
            raise UpdateOutOfRange(
                f"weighted update {ratio * peak:.4g} exceeds secagg.clipping_range={clip:g}: raise it "
                "(or lower fl.lr) so the sum is not corrupted"
            )
        return reply

    return handler


def hardened_secaggplus_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if stage == Stage.UNMASK:
        active = [int(x) for x in cast(list, configs.get(Key.ACTIVE_NODE_ID_LIST, []))]
        dead = [int(x) for x in cast(list, configs.get(Key.DEAD_NODE_ID_LIST, []))]
        reason = check_unmask_request(active, dead, _min_cohort(context))
        if reason is not None:
            return _refuse(msg, context, reason)
    if stage == Stage.COLLECT_MASKED_VECTORS:
        reply = secaggplus_mod(msg, context, _checked_handler(context, call_next))
        if not reply.has_error():
            content = reply.content
            content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": 0})
            content.config_records["fitres.metrics"] = ConfigRecord({})
        return reply
    return secaggplus_mod(msg, context, call_next)


def fault_injection_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Die on purpose: SECUREFPT_FAULTS="lang@stage[:kill-node],..." (stage: setup, train,
    collect, unmask, evaluate). Plain, the handler fails; with `:kill-node` the whole
    SuperNode is killed (SIGKILL to its process group), for deployment drills only."""
    spec = os.environ.get("SECUREFPT_FAULTS", "")
    if spec:
        setup = context.state.config_records.get(SETUP_KEY)
        language = str(setup["language"]) if setup is not None else None
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
