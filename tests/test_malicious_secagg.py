"""Secure aggregation against a malicious coordinator and misbehaving nodes (Flower's simulation
engine, real SecAgg+).

Each attack is played twice where it makes sense: against Flower's own SecAgg+ client (the
honest-but-curious protocol, as a control: the recovery succeeds, so it is a real attack)
and against securefpt's nodes (the same recovery fails, with the node's refusal code).
"""

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from securefpt.engines.simulation import run_federated_simulation
from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.artifacts import load_arrays
from securefpt.learning.modeling import build_model, get_trainable, set_trainable
from securefpt.learning.training import train_local
from securefpt.node import app as node_app
from securefpt.node.config import this_node
from securefpt.node.guards import fault_injection_mod, hygiene_mod
from securefpt.node.secagg import masked, secure_aggregation_mod
from securefpt.protocol import records as R
from securefpt.protocol.audit import read_entries
from tests.attacks import CLIP, QRANGE, hostile_app, invented_peers, lie_at_unmask, setup_configs, stage_message
from tests.conftest import make_masakhanews_like, tsv_cfg_overrides

pytestmark = pytest.mark.slow

LANGS = ["aa", "bb", "cc", "dd", "ee"]  # 10, 14, 18, 22, 26 training rows
MAX_WEIGHT = 32


def experiment(tmp_path, tiny_overrides, *extra):
    root = make_masakhanews_like(tmp_path / "data", LANGS)
    return load_config(None, tiny_overrides + tsv_cfg_overrides(root, LANGS) + [
        "secagg.enabled=true", f"secagg.max_weight={MAX_WEIGHT}", "fl.rounds=4", "fl.lr=0.05", *extra])


def encoders(cfg, n):
    base = get_trainable(build_model(cfg.model, cfg.peft, len(label_space(cfg.data)), cfg.seed).model)
    return [{k: (v + 0.001 * i).astype(np.float32) for k, v in base.items()} for i in range(n)]


def true_change(cfg, language, encoder, server_round):
    """The update a node computes (non-DP training is deterministic given the request's seed)."""
    labels = label_space(cfg.data)
    model = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
    set_trainable(model.model, encoder)
    data = load_client_data(cfg.data, language, labels, cfg.seed)
    train_local(model, data.train, cfg.training_plan(), cfg.seed * 100_003 + server_round)
    return [get_trainable(model.model)[k] - encoder[k] for k in encoder], len(data.train)


def flower_client_app() -> ClientApp:
    """securefpt's handlers behind Flower's own SecAgg+ client: the honest-but-curious protocol."""
    def collect_is_masked(msg, context, call_next):  # Flower's mod masks the collect stage's reply
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
            with masked():
                return secaggplus_mod(msg, context, call_next)
        return secaggplus_mod(msg, context, call_next)

    app = ClientApp(mods=[hygiene_mod, collect_is_masked])
    app.query()(node_app.setup)
    app.train()(node_app.train)
    app.evaluate()(node_app.evaluate)
    return app


def attack(cfg, out, script, client_app=None) -> dict:
    log: dict = {}
    request = cfg.request(label_space(cfg.data)).to_json()

    def play(h):
        h.setup("setup", request)
        script(h, log)

    run_federated_simulation(cfg, out, show_progress=False, server_app=hostile_app(play, log, len(LANGS)),
                             client_app=client_app)
    assert "error" not in log, log.get("error")
    return log


def recovered_exactly(result, cfg, language, encoder, server_round) -> bool:
    if "change" not in result:
        return False
    truth, size = true_change(cfg, language, encoder, server_round)
    step = 2 * CLIP / QRANGE / (size / MAX_WEIGHT)  # one quantization step of the weighted change, unweighted
    close = all(np.abs(a - b).max() <= step + 1e-6 for a, b in zip(result["change"], truth))
    return close and abs(result["weight"] - size) < 0.01


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    from tests.conftest import TINY

    tmp = tmp_path_factory.mktemp("malicious")
    cfg = experiment(tmp, list(TINY), "fl.rounds=8", "secagg.min_cohort=3")  # every node: a minimum cohort of 3
    e = encoders(cfg, 8)

    def control(h, log):
        log["invented"] = invented_peers(h, "invented peers", "aa", 1, e[1], MAX_WEIGHT)
        log["split"] = lie_at_unmask(h, "split views", "aa", 2, e[2], MAX_WEIGHT, threshold=2, lie="split")

    def hardened(h, log):
        log["invented"] = invented_peers(h, "invented peers", "aa", 1, e[1], MAX_WEIGHT)
        log["substituted"] = invented_peers(h, "substituted keys", "aa", 2, e[2], MAX_WEIGHT, peers=["bb", "cc", "dd"])
        log["low threshold"] = lie_at_unmask(h, "threshold 2 of 5", "aa", 3, e[3], MAX_WEIGHT, threshold=2,
                                             lie="split")
        log["split"] = lie_at_unmask(h, "split views", "aa", 4, e[4], MAX_WEIGHT, threshold=4, lie="split")
        log["alone"] = lie_at_unmask(h, "a cohort of one", "aa", 5, e[5], MAX_WEIGHT, threshold=4, lie="alone")
        pair = h.send("a cohort of two", [stage_message(x, 6, setup_configs(2, 2, 2, MAX_WEIGHT))
                                          for x in h.ids(["aa", "bb"])])
        log["pair"] = sorted(outcome for outcome in h.log["steps"]["a cohort of two"].values())
        assert len(pair) == 2

    return cfg, e, attack(cfg, tmp / "control", control, flower_client_app()), attack(cfg, tmp / "hardened", hardened)


def test_the_attacks_recover_a_single_update_and_its_size_from_flowers_own_secagg(played):
    cfg, e, control, _ = played
    assert recovered_exactly(control["invented"], cfg, "aa", e[1], 1)
    assert recovered_exactly(control["split"], cfg, "aa", e[2], 2)


def test_invented_peers_and_substituted_keys_are_refused_before_any_share_leaves(played):
    cfg, e, _, hardened = played
    assert hardened["invented"] == {"refusal": "peer-unauthenticated"}
    assert hardened["substituted"] == {"refusal": "peer-unauthenticated"}


def test_a_threshold_at_or_below_two_thirds_is_refused_by_every_node(played):
    _, _, _, hardened = played
    assert set(hardened["low threshold"]["refusal"].values()) == {"protocol-parameters"}
    assert len(hardened["low threshold"]["refusal"]) == len(LANGS)


def test_split_survivor_views_reveal_nothing(played):
    cfg, e, _, hardened = played
    split = hardened["split"]
    assert set(split["refusal"].values()) == {"views-inconsistent"} and len(split["refusal"]) == 4
    assert split["shares"] == (0, 0)
    assert not recovered_exactly(split, cfg, "aa", e[4], 4)


def test_a_cohort_of_one_or_two_is_refused(played):
    """Unmasking a cohort of one (Flower's client refuses it too, below its threshold) or setting up
    a cohort of two where the nodes' minimum is three."""
    cfg, e, _, hardened = played
    alone = hardened["alone"]
    assert set(alone["refusal"].values()) == {"cohort-below-minimum"} and len(alone["refusal"]) == 4
    assert alone["shares"] == (0, 0) and not recovered_exactly(alone, cfg, "aa", e[5], 5)
    assert hardened["pair"] == ["cohort-below-minimum", "cohort-below-minimum"]


def misbehaving_app(sizes: dict) -> ClientApp:
    """Honest nodes, except: bb's round-1 update is NaN (its own node refuses to mask it); aa's
    round-1 evaluation reply lacks its answer; dd's round-2 masked vector is garbage; cc, in
    round 3, bypasses its node's checks and claims minus everyone else's weight, so that the
    total weight is zero."""

    def lying_train(msg: Message, context: Context) -> Message:
        reply = node_app.train(msg, context)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
        others = sum(size for lang, size in sizes.items() if lang != "cc")
        lie = FitRes(fitres.status, fitres.parameters, -others, {})
        return Message(compat.fitres_to_recorddict(lie, keep_input=False), reply_to=msg)

    def misbehave(msg: Message, context: Context, call_next) -> Message:
        language = this_node(context).language
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if language == "cc" and stage == Stage.COLLECT_MASKED_VECTORS and msg.metadata.group_id == "3":
            with masked():  # modified software: Flower's masking without securefpt's checks
                return secaggplus_mod(msg, context, lying_train)
        reply = secure_aggregation_mod(msg, context, call_next)
        if language == "dd" and stage == Stage.COLLECT_MASKED_VECTORS and msg.metadata.group_id == "2":
            reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] = [b"not a vector"]
        return reply

    app = ClientApp(mods=[hygiene_mod, fault_injection_mod, misbehave])
    app.query()(node_app.setup)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = node_app.train(msg, context)
        if this_node(context).language == "bb" and msg.metadata.group_id == "1":
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
            nan = [np.full_like(a, np.nan) for a in parameters_to_ndarrays(fitres.parameters)]
            reply = Message(compat.fitres_to_recorddict(FitRes(fitres.status, ndarrays_to_parameters(nan),
                                                               fitres.num_examples, {}), False), reply_to=msg)
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        reply = node_app.evaluate(msg, context)
        if this_node(context).language == "aa" and msg.content.config_records[R.ROUND]["server-round"] == 1:
            del reply.content.config_records[R.ANSWER]
        return reply

    return app


def test_poisoned_lying_and_malformed_contributions_cannot_corrupt_or_stop_the_coordinator(tmp_path, tiny_overrides):
    cfg = experiment(tmp_path, tiny_overrides, "fl.rounds=3")
    sizes = dict(zip(LANGS, (10, 14, 18, 22, 26)))
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False,
                                       client_app=misbehaving_app(sizes))
    r1, r2, r3 = summary["rounds"]
    # round 1: bb's node refused to mask a non-finite update; the others' sum went on
    assert r1["participants"] == ["aa", "cc", "dd", "ee"] and not r1["aborted"]
    assert any(f.startswith("bb: update-not-finite") for f in r1["failures"])
    # round 2: aa's malformed answer counts as a decline; dd's garbage vector as a dropout
    assert r2["declined"]["aa"] == "malformed evaluation reply"
    assert r2["participants"] == ["bb", "cc", "ee"] and not r2["aborted"]
    assert "dd: malformed reply" in r2["failures"]
    # round 3: a total weight of zero is rejected: the round aborts, the encoder stays as it was
    assert r3["aborted"]
    aborted = [e for e in read_entries(summary["audit_log"]) if e["event"] == "secure_round_aborted"]
    assert len(aborted) == 1 and "total weight" in aborted[0]["reason"] and aborted[0]["round"] == 3
    final = load_arrays(tmp_path / "run" / "prompt_encoder.safetensors")
    assert all(np.isfinite(a).all() for a in final.values())
    assert summary["final"]["round"] == 3 and set(r3["accuracy"]) == set(r2["accuracy"])


def test_malformed_plaintext_replies_are_dropouts(tmp_path, tiny_overrides):
    """cc's setup reply lacks its identity; bb claims a negative dataset size: both are left out,
    and the round is Algorithm 1 over aa alone."""
    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb", "cc"])
    cfg = load_config(None, tiny_overrides + tsv_cfg_overrides(root, ["aa", "bb", "cc"]) + [
        "secagg.enabled=false", "fl.rounds=1"])
    app = ClientApp(mods=[hygiene_mod, secure_aggregation_mod])

    @app.query()
    def setup(msg: Message, context: Context) -> Message:
        reply = node_app.setup(msg, context)
        if this_node(context).language == "cc":
            del reply.content.config_records[R.IDENTITY]
        return reply

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = node_app.train(msg, context)
        if this_node(context).language == "bb":
            fitres = compat.recorddict_to_fitres(reply.content, keep_input=False)
            reply = Message(compat.fitres_to_recorddict(FitRes(fitres.status, fitres.parameters, -5, {}), False),
                            reply_to=msg)
        return reply

    app.evaluate()(node_app.evaluate)
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False, client_app=app)
    assert summary["clients"]["cc"]["included"] is False
    assert "malformed setup reply" in summary["clients"]["cc"]["reason"]
    [r1] = summary["rounds"]
    assert r1["participants"] == ["aa"] and r1["failures"] == ["bb: malformed training reply"]
    h0 = encoders(cfg, 1)[0]
    truth, _ = true_change(cfg, "aa", h0, 1)
    got = load_arrays(tmp_path / "run" / "prompt_encoder.safetensors")
    for name, change in zip(h0, truth):
        np.testing.assert_allclose(got[name], h0[name] + change, atol=1e-6, err_msg=name)
