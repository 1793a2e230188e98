"""The Flower ClientApp: one institution's node. It trusts its own configuration only.

Handlers (each runs inside `hygiene_mod`: a refusal or failure leaves as a reason code):
- `query` (setup): the coordinator's experiment request and an identity challenge; the
  node proves who it is (identity.py) and accepts the request or refuses it with a code,
  checked against its own rules, data and budget (guards.py);
- `train`: train on the node's own data from the offered global encoder; in a secure
  round the reply is the change h_k - h_g, which `secure_aggregation_mod` masks;
- `evaluate`: the round's aggregate, evaluated once, released only as the node's rules
  say, and the node's answer to the next round's offer; first the node witnesses the
  audit head the message carries (witness.py);
- `query.personalize`: once per run, after the last round, the node adapts an encoder it
  evaluated in this run on its own data and keeps the result (node/personal.py);
- `query.witness`: the audit head at the end of a run, witnessed the same way.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from pydantic import ValidationError

from securefpt.node import guards
from securefpt.node.budget import Accounting, Ledger
from securefpt.node.config import Node, this_node
from securefpt.node.progress import show_progress
from securefpt.node.secagg import masking, masking_ring, secure_aggregation_mod
from securefpt.node.sketches import Sketches
from securefpt.node.state import NodeState, RunRecord
from securefpt.node.witness import witness
from securefpt.protocol import records as R
from securefpt.protocol.identity import prove
from securefpt.protocol.messages import (
    FIT_ROUND,
    Answer,
    AuditHead,
    Identity,
    Malformed,
    RoundOffer,
    SetupOffer,
    WitnessAck,
)
from securefpt.protocol.refusals import NodeRefusal
from securefpt.protocol.request import ExperimentRequest

app = ClientApp(mods=[guards.hygiene_mod, guards.fault_injection_mod, secure_aggregation_mod])
show_progress()  # the node's own log (its SuperNode's stderr): how far a long step is; never sent


def _accepted(node: Node, context: Context) -> tuple[RunRecord, ExperimentRequest]:
    run = NodeState(node.state_dir).run(context.run_id)
    if run.request_json is None:
        raise NodeRefusal("no-setup", f"run {context.run_id}")
    return run, ExperimentRequest.from_json(run.request_json)


def _runtime(node: Node, request: ExperimentRequest):
    """Data and model (torch is imported here, not at module level: each ClientApp message
    of the deployment engine is a fresh process, and the SecAgg+ key stages need neither)."""
    from securefpt.node.runtime import get_runtime

    return get_runtime(node, request)


def _accounting(node: Node, runtime) -> Optional[Accounting]:
    """The experiment's DP plan with this node's ledger for its dataset (None: no DP)."""
    plan = runtime.privacy_plan
    return None if plan is None else Accounting(plan, Ledger(node.state_dir, runtime.dataset, node.budget,
                                                                  node.federation))


def _coarse(value: float, decimals: Optional[int]) -> float:
    return float(value) if decimals is None else round(float(value), decimals)


@app.query()
def setup(msg: Message, context: Context) -> Message:
    node = this_node(context)
    try:
        offer = SetupOffer.read(msg.content)
        request = ExperimentRequest.from_json(offer.request)
    except (Malformed, ValidationError) as exc:
        raise NodeRefusal("malformed-request", f"setup: {exc}") from None
    identity = Identity(node.client_id, node.language,
                        prove(node.key, context.run_id, context.node_id, offer.challenge, node.client_id))
    state = NodeState(node.state_dir)
    run = state.run(context.run_id)
    codes = guards.check_request(node, request, run)
    if not codes:
        try:
            runtime = _runtime(node, request)  # the task, model, data and labels
            dp = _accounting(node, runtime)
            if dp is not None:
                dp.ledger.check_plan(request.sha256(), dp.plan)
        except NodeRefusal as exc:
            codes, detail = [exc.code], exc.detail
        else:
            run.accept(request.to_json())
    if codes:
        state.log("setup-refused", run=context.run_id, codes=codes, detail=locals().get("detail", ""))
    answer = Answer(not codes, codes[0] if codes else "ok")
    return Message(RecordDict({Identity.KEY: identity.to_record(), Answer.KEY: answer.to_record()}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit on local data. In a secure round the reply is the *change* h_k - h_g, which
    `secure_aggregation_mod` masks; otherwise it is h_k itself (Algorithm 1)."""
    node = this_node(context)
    run, request = _accepted(node, context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    server_round, secure = int(fitins.config[FIT_ROUND]), masking()  # the node's own view, not a flag
    runtime = _runtime(node, request)
    names = runtime.shared_names()  # a local head never travels
    global_arrays = OrderedDict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    encoder = R.encoder_hash(global_arrays)
    dp = _accounting(node, runtime)
    guards.check_training(node, run, request, server_round, encoder, global_arrays, secure, dp)
    ring = masking_ring()
    if dp is not None and dp.plan.distributed:
        ring = runtime.check_ring(ring)  # the round's public grid can carry this node's noise share
    run.note_trained(server_round, encoder)  # before anything leaves: a replay of this round is refused
    if node.rules.differencing.min_encoder_distance > 0:  # near copies of it are refused from now on
        Sketches(node.state_dir, node.federation).keep(global_arrays, encoder)
    state = NodeState(node.state_dir)
    # in the clear the update leaves now; under SecAgg+ only once this node reveals its unmask shares
    if secure:
        state.hold_encoder(encoder, server_round)
    else:
        state.record_encoder(encoder)
    if dp is not None and dp.plan.distributed and ring is not None:  # the reply: this node's noisy gradient share
        values, result, share = runtime.gradient_share(global_arrays, ring)
        dp.ledger.spend(request.sha256(), dp.plan, result.steps, share)
        fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(values), _unit_weight(ring.max_weight), {})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
    updated, result = runtime.fit(global_arrays, seed=_training_seed(node, request, server_round))
    if dp is not None:
        dp.ledger.spend(request.sha256(), dp.plan, result.steps)
    if secure:
        values = [updated[n] - global_arrays[n] for n in names]
        metrics = {}  # nothing per node in the clear
    else:
        values = [updated[n] for n in names]
        metrics = {"loss": result.loss, "steps": result.steps} if node.rules.release.training_metrics else {}
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(values), _weight(request, result.num_examples),
                    metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _training_seed(node: Node, request: ExperimentRequest, salt: int) -> int:
    """The request's seed (reproducible runs), or the node's own entropy where its rules say so: then two
    trainings on one encoder differ, and a coordinator cannot replay one to difference it."""
    if node.rules.differencing.randomness == "node":
        return int.from_bytes(os.urandom(8), "big") >> 1
    return request.seed * 100_003 + salt


def _weight(request: ExperimentRequest, rows: int) -> int:
    """The rows trained on, never above the plan's public row cap (audit canaries are extra records)."""
    cap = request.training.max_train
    return rows if cap is None else min(rows, cap)


def _unit_weight(weight: float):
    """Distributed DP: every share weighs max_weight (a ratio of 1), whatever |D_k|: the sum is a sum."""
    return int(weight) if float(weight).is_integer() else weight


def privacy_report(node: Node, request: ExperimentRequest, runtime) -> ConfigRecord:
    """What this node has spent in this experiment, in the form its rules release (empty without DP)."""
    dp, release = _accounting(node, runtime), node.rules.release
    if dp is None:
        return ConfigRecord({})
    plan, ledger = dp.plan, dp.ledger
    out: dict = {}
    if release.epsilon:
        out["epsilon"] = _coarse(ledger.epsilon(request.sha256(), plan), release.epsilon_decimals)
        if plan.distributed:  # the weaker guarantee left if every other contributor colluded
            out["epsilon-alone"] = _coarse(ledger.epsilon_alone(request.sha256(), plan), release.epsilon_decimals)
    if release.privacy_details:
        out.update({"steps": ledger.steps(request.sha256()), "noise-multiplier": plan.noise_multiplier,
                    "sample-rate": plan.sample_rate, "delta": plan.delta, "accountant": plan.accountant,
                    "mode": plan.mode})
    return ConfigRecord(out)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The round's aggregate: evaluated once (released as the rules say), then the next round's offer."""
    node = this_node(context)
    run, request = _accepted(node, context)
    try:
        offer = RoundOffer.read(msg.content)
        arrays = R.record_to_arrays(msg.content.array_records[R.GLOBAL])
    except (KeyError, TypeError, ValueError) as exc:  # Malformed is a ValueError
        raise NodeRefusal("malformed-request", repr(exc)) from None
    server_round, next_round = offer.server_round, offer.next_round
    if not 0 <= server_round <= request.training.rounds:
        raise NodeRefusal("round-out-of-plan", f"evaluate round {server_round}")
    if run.done("evaluated", server_round):
        raise NodeRefusal("evaluation-repeated", f"round {server_round}")
    witnessed = _witness(node, msg, context)
    runtime = _runtime(node, request)
    # round 0's message only offers the first round
    metrics = _released(node, runtime, lambda: runtime.evaluate(arrays).accuracy) if server_round > 0 else {}
    run.mark("evaluated", server_round)
    encoder = R.encoder_hash(arrays)
    run.note_evaluated(encoder)
    answer = Answer(False, "round-out-of-plan")
    if next_round:
        code = "round-out-of-plan" if next_round != server_round + 1 else guards.check_offer(
            node, request, next_round, encoder, arrays, _accounting(node, runtime))
        if code == "ok":
            run.offer(next_round, encoder)
        answer = Answer(code == "ok", code)
    content = RecordDict({R.EVAL: MetricRecord(metrics), Answer.KEY: answer.to_record(),
                          R.PRIVACY: privacy_report(node, request, runtime), **witnessed})
    return Message(content, reply_to=msg)


@app.query("personalize")
def personalize(msg: Message, context: Context) -> Message:
    """Adapt the final encoder on this node's own data and keep the personalized model here.

    Once per run, only when the experiment plans it, and only for an encoder this node
    evaluated in this run (so it is no oracle for parameters of the coordinator's choosing).
    The reply is the personalized model's accuracy where the node's rules release
    evaluation metrics, else nothing; never for a DP node: its adaptation trains without DP,
    so the figure would be a statistic of a model that is not private (its own log keeps it)."""
    node = this_node(context)
    run, request = _accepted(node, context)
    try:
        arrays = R.record_to_arrays(msg.content.array_records[R.GLOBAL])
    except (KeyError, TypeError, ValueError) as exc:
        raise NodeRefusal("malformed-request", repr(exc)) from None
    planned = request.personalization.planned
    if not planned or run.done("personalized", 0) or not run.evaluated_encoder(R.encoder_hash(arrays)):
        raise NodeRefusal("personalization-refused", f"planned={planned}")
    run.mark("personalized", 0)
    runtime = _runtime(node, request)
    result = runtime.personalize(arrays, seed=_training_seed(node, request, 99_991))
    if runtime.privacy_plan is not None:
        NodeState(node.state_dir).log("personalized", accuracy=result.accuracy, released=False)
        return Message(RecordDict({R.EVAL: MetricRecord({})}), reply_to=msg)
    return Message(RecordDict({R.EVAL: MetricRecord(_released(node, runtime, lambda: result.accuracy))}),
                   reply_to=msg)


def _released(node: Node, runtime, accuracy) -> dict:
    """The accuracy the node's rules release, each figure counted against its lifetime cap per dataset
    (`release.max_metric_releases`); past the cap nothing is measured and nothing leaves."""
    release, state = node.rules.release, NodeState(node.state_dir)
    if not release.eval_metrics:
        return {}
    if not state.release_metric(runtime.dataset, release.max_metric_releases):
        state.log("metric-withheld", dataset=runtime.dataset, cap=release.max_metric_releases)
        return {}
    return {"accuracy": _coarse(accuracy(), release.metric_decimals)}


def _witness(node: Node, msg: Message, context: Context) -> dict:
    """Witness the audit head a message carries (a head that does not extend the last one is refused)."""
    try:
        shown = AuditHead.read(msg.content)
    except Malformed:
        raise NodeRefusal("malformed-request", "audit head") from None
    return {} if shown is None else {WitnessAck.KEY: witness(node, context.run_id, shown).to_record()}


@app.query("witness")
def witness_head(msg: Message, context: Context) -> Message:
    """The audit head at the end of a run."""
    node = this_node(context)
    _accepted(node, context)
    witnessed = _witness(node, msg, context)
    if not witnessed:
        raise NodeRefusal("malformed-request", "witness query without an audit head")
    return Message(RecordDict(witnessed), reply_to=msg)
