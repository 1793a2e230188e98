"""The Flower ClientApp: one institution's side of a round.

Handlers:
- `query` (setup): receive the experiment, label space and an identity challenge;
  answer with the language this node serves, the client it is, and a proof that it
  holds that client's attested key (identity.py; nothing about its data);
- `query.offer`: accept the next round, or decline it (privacy budget spent);
- `train`: load the global encoder, train locally with the PLM frozen, reply with the
  updated trainable parameters and |D_k| (Flower's FitIns/FitRes records, which
  SecAgg+ masks when the round is secure);
- `evaluate`: accuracy of the global encoder on the node's held-out data.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from securefpt.attestation import load_private
from securefpt.config import ExperimentConfig
from securefpt.eligibility import client_view
from securefpt.identity import prove
from securefpt.mods import SETUP_KEY, fault_injection_mod, hardened_secaggplus_mod, residency_guard_mod
from securefpt.policy import ClientManifest, load_manifests_file

if TYPE_CHECKING:
    from securefpt.client_runtime import ClientRuntime
    from securefpt.privacy import PrivacyLedger

GLOBAL_KEY = "global"
NODE_STATE_ENV = "SECUREFPT_NODE_STATE"  # the state folder of nodes without a `state-dir` node config


def arrays_to_record(arrays: "dict[str, np.ndarray]") -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def record_to_arrays(record: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, v.numpy()) for k, v in record.items())


def node_manifest(context: Context) -> Optional[ClientManifest]:
    """The institution's manifest that this node's config names, if any."""
    if "manifest" not in context.node_config:
        return None
    [manifest] = load_manifests_file(Path(str(context.node_config["manifest"]))).values()
    return manifest


def node_language(context: Context, cfg: ExperimentConfig, own: Optional[ClientManifest]) -> str:
    """The language this node serves: its manifest's, its node config's, or its simulation partition's."""
    if own is not None:
        return own.language
    if "language" in context.node_config:
        return str(context.node_config["language"])
    pid = int(context.node_config["partition-id"])
    return cfg.data.languages[pid]


def _runtime(context: Context) -> ClientRuntime:
    """Data and model for this node (torch is imported here, not at module level: each
    ClientApp message of the deployment engine is a fresh process, and the SecAgg+ key
    stages and the offer step need neither)."""
    from securefpt.client_runtime import get_runtime

    setup = context.state.config_records[SETUP_KEY]
    cfg = ExperimentConfig.from_json(str(setup["experiment"]))
    return get_runtime(cfg, str(setup["language"]), [str(x) for x in setup["labels"]])


app = ClientApp(mods=[fault_injection_mod, residency_guard_mod, hardened_secaggplus_mod])


@app.query()
def setup(msg: Message, context: Context) -> Message:
    incoming = msg.content.config_records[SETUP_KEY]
    cfg = ExperimentConfig.from_json(str(incoming["experiment"]))
    own = node_manifest(context)
    language = node_language(context, cfg, own)
    view = client_view(cfg, language, own)
    identity = {"language": language, "client-id": "", "proof": ""}
    if view is not None and view.manifest.key is not None:  # the node holds its attested key: prove it
        key = load_private(view.manifest.key)
        identity.update({"client-id": view.manifest.client_id,
                         "proof": prove(key, context.run_id, context.node_id, str(incoming["challenge"]),
                                        view.manifest.client_id)})
    record = {"experiment": incoming["experiment"], "labels": list(incoming["labels"]), "language": language,
              "min-cohort": cfg.secagg.min_cohort, "require-secagg": False,
              "release-eval": not cfg.secagg.enabled or cfg.secagg.release_eval_metrics, "violations": []}
    if view is not None:  # this client's own region rules, whatever the server says
        record.update({"min-cohort": max(cfg.secagg.min_cohort, view.rule.min_cohort),
                       "require-secagg": view.rule.require_secure_aggregation,
                       "release-eval": view.rule.release_eval_metrics, "violations": view.violations(cfg)})
    context.state.config_records[SETUP_KEY] = ConfigRecord(record)
    _runtime(context)  # load data and model now: errors surface before round 1
    return Message(RecordDict({"identity": ConfigRecord(identity)}), reply_to=msg)


def _ledger(runtime: ClientRuntime, context: Context) -> PrivacyLedger:
    """This client's privacy ledger for this experiment; in the node's `state-dir` where it has one."""
    from securefpt.privacy import PrivacyLedger

    folder = context.node_config.get("state-dir", os.environ.get(NODE_STATE_ENV))
    path = None
    if folder is not None:
        path = Path(str(folder)) / f"privacy-ledger-{runtime.language}-{runtime.cfg.sha256()[:16]}.json"
    return PrivacyLedger.load(context.state.config_records, runtime.cfg.dp.delta, runtime.cfg.dp.accountant, path)


def privacy_report(runtime: ClientRuntime, context: Context) -> ConfigRecord:
    """What this client has spent so far (reported after every round; empty without DP)."""
    plan = runtime.privacy_plan
    if plan is None:
        return ConfigRecord({})
    ledger = _ledger(runtime, context)
    return ConfigRecord({"epsilon": ledger.epsilon(), "steps": ledger.steps, "noise-multiplier": plan.noise_multiplier,
                         "sample-rate": plan.sample_rate, "delta": plan.delta, "accountant": plan.accountant})


@app.query("offer")
def offer(msg: Message, context: Context) -> Message:
    """Accept or decline the next round; a client declines once it would exceed its budget."""
    setup = context.state.config_records[SETUP_KEY]
    accept, reason = True, "ok"
    violations = list(setup["violations"])
    if violations:
        accept, reason = False, "residency policy: " + "; ".join(str(v) for v in violations)
    elif ExperimentConfig.from_json(str(setup["experiment"])).dp.enabled:
        runtime = _runtime(context)
        plan = runtime.privacy_plan
        ledger = _ledger(runtime, context)
        if ledger.would_exceed(plan, plan.target_epsilon):
            accept = False
            reason = (f"privacy budget: epsilon would reach {ledger.epsilon_after(plan):.3f} "
                      f"> dp.target_epsilon={plan.target_epsilon:g}")
    return Message(RecordDict({"offer": ConfigRecord({"accept": accept, "reason": reason})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit on local data. In a secure round the reply is the *change* h_k - h_g, which
    `hardened_secaggplus_mod` masks; otherwise it is h_k itself (Algorithm 1)."""
    runtime = _runtime(context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = runtime.assembled.trainable_names()
    global_arrays = OrderedDict(zip(names, parameters_to_ndarrays(fitins.parameters), strict=True))
    server_round = int(fitins.config["server-round"])
    pid = runtime.cfg.data.languages.index(runtime.language)
    ledger = _ledger(runtime, context) if runtime.privacy_plan is not None else None
    updated, result = runtime.fit(global_arrays, server_round, seed_offset=pid, ledger=ledger)
    if ledger is not None:
        ledger.save(context.state.config_records)
    secure = bool(fitins.config.get("secure", False))
    if secure:
        values = [updated[n] - global_arrays[n] for n in names]
        metrics = {}  # nothing per client in the clear
    else:
        values = [updated[n] for n in names]
        metrics = {"loss": result.loss, "steps": result.steps}
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(values), result.num_examples, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    runtime = _runtime(context)
    result = runtime.evaluate(record_to_arrays(msg.content.array_records[GLOBAL_KEY]))
    released = bool(context.state.config_records[SETUP_KEY]["release-eval"])
    metrics = MetricRecord(
        {"accuracy": result.accuracy, "loss": result.loss, "num-examples": result.num_examples} if released else {}
    )
    return Message(
        RecordDict({"eval": metrics, "identity": ConfigRecord({"language": runtime.language}),
                    "privacy": privacy_report(runtime, context)}),
        reply_to=msg,
    )
