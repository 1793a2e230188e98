"""A hostile coordinator against honest nodes, through Flower's simulation engine.

The ServerApp below is not securefpt's: it sends whatever it likes to three honest
institutions' nodes (securefpt's ClientApp, each reading only its own node.yaml) and
records every byte it gets back. Each attack of issue "the node trusts no coordinator"
is played for real; each test asserts the structured refusal, and that nothing derived
from a node's data reached the coordinator unless that node's rules release it.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import MessageType

from securefpt.engines.simulation import run_federated_simulation
from securefpt.experiment.loading import load_config
from securefpt.learning.modeling import build_model, get_trainable
from securefpt.operators.keys import make_federation
from securefpt.protocol.refusals import MESSAGES
from tests.attacks import Hostile, hostile_app
from tests.conftest import TINY, make_masakhanews_like

pytestmark = pytest.mark.slow

POLICY = """version: 1
server: {region: hub, artifact_regions: [hub], audit_key: ../clients/keys/coordinator-audit.pub}
regions:
  hub:      # secure aggregation and DP required, releases nothing
    authority_key: ../clients/keys/hub-authority.pub
    export_to: [hub]
    dp: {required: true, max_epsilon: 4}
    min_cohort: 3
  open:     # plaintext allowed (its update and weight may leave), DP required, releases nothing else
    authority_key: ../clients/keys/open-authority.pub
    export_to: [hub]
    require_secure_aggregation: false
    dp: {required: true, max_epsilon: 4}
  shares:   # as open, and releases its evaluation accuracy rounded to one decimal
    authority_key: ../clients/keys/shares-authority.pub
    export_to: [hub]
    require_secure_aggregation: false
    dp: {required: true, max_epsilon: 4}
    release: {eval_metrics: true, metric_decimals: 1}
"""
MEMBERS = [("strict-a", "hub", "aa", "hub"), ("open-b", "open", "bb", "open"), ("shares-c", "shares", "cc", "shares")]
LABELS = ["health", "politics", "sports"]
SIZES = {"aa": 10, "bb": 14, "cc": 18}  # training rows; 6, 7 and 8 evaluation rows
BATCH = 4
CANARY = "CANARY"  # every row of every private file holds it


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three institutions whose nodes keep their state in their own folders (across runs)."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "hostile.yaml").write_text(POLICY)
    make_federation(root / "fed", policy=root / "hostile.yaml", members=MEMBERS)
    data = make_masakhanews_like(root / "private", list(SIZES), sizes=list(SIZES.values()))
    for path in data.glob("*/*.tsv"):  # a canary in every line of every private file
        path.write_text(path.read_text().replace("more text", f"more text {CANARY}-{path.parent.name}"))
    nodes = []
    for client_id, _, _, _ in MEMBERS:
        path = root / "fed" / "clients" / client_id / "node.yaml"
        config = yaml.safe_load(path.read_text())
        config["data"] = {"news-topic": {"source": "masakhanews_tsv", "root": str(data),
                                         "train_split": "test", "eval_split": "dev"}}
        config["budget"] = {"epsilon": 4.5, "delta": 1e-5}
        config["state_dir"] = str(root / "state" / client_id)
        path.write_text(yaml.safe_dump(config))
        nodes.append(path)
    return root, nodes


def honest_request(**changes):
    """The request an honest coordinator would send: DP with a cap of epsilon 4 over 5 rounds, the
    noise fixed at sigma 1.25 (Opacus PRV: open-b, q = 4/14, 3 steps a round, spends 3.76 in two
    rounds and 4.44 in three, so its third round exceeds the cap; four rounds, 5.04, exceed its
    lifetime budget of 4.5)."""
    overrides = TINY + ["data.max_train_per_client=null", "secagg.enabled=false", "dp.enabled=true",
                        "dp.target_epsilon=4", "dp.noise_multiplier=1.25", "fl.rounds=5", f"fl.batch_size={BATCH}"]
    request = json.loads(load_config(None, overrides).request(LABELS).to_json())
    for dotted, value in changes.items():
        node = request
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return request


def encoders(n: int) -> list:
    base = get_trainable(build_model(load_config(None, TINY).model, load_config(None, TINY).peft, len(LABELS), 0).model)
    return [{k: (v + 0.001 * i).astype(np.float32) for k, v in base.items()} for i in range(n)]


def first_run(h: Hostile) -> None:
    honest = honest_request()
    h.setup("drop the policy: no DP, no secure aggregation",
            honest_request(**{"secure_aggregation": False, "dp.enabled": False}))
    h.setup("raise epsilon", honest_request(**{"secure_aggregation": True, "dp.target_epsilon": 100.0}))
    secure = {**honest, "secure_aggregation": True}  # within every node's rules, but for what follows
    h.setup("name a data path and fields",
            {**secure, "data": {"root": "/etc", "hf": {"path": "/", "label_field": "text"}}})
    h.setup("ask for an unknown label set", {**secure, "labels": ["health", "politics"]})
    h.setup("name a model by path", {**secure, "model": {**secure["model"], "name": str(Path(__file__).parent)}})
    h.setup("name another task", {**secure, "task": "medical-notes"})
    h.setup("the experiment", honest)
    e = encoders(8)
    # skip the offer and train round after round: the budget binds in the train handler itself
    for r in (1, 2, 3):
        h.train(f"train past the budget, round {r}", "open-b", r, e[r])
    h.train("replay a round", "open-b", 2, e[4])
    h.train("train on an encoder, first", "shares-c", 1, e[1])
    h.train("train again on the same encoder", "shares-c", 2, e[1])
    biased = {k: v.copy() for k, v in e[0].items()}
    biased["head.bias"][:] = [10.0, 0.0, 0.0]  # predicts 'health' for everything: reveals its share
    h.evaluate("evaluate chosen parameters", "shares-c", 1, biased)
    h.evaluate("evaluate chosen parameters again", "shares-c", 1, biased)
    h.evaluate("evaluate at a node that releases nothing", "open-b", 1, biased)
    h.evaluate("offer round 3 on one encoder", "shares-c", 2, e[5], next_round=3)
    h.train("train round 3 on another encoder", "shares-c", 3, e[6])
    h.setup("rename the experiment in the run", {**honest, "name": "another-name"}, to=["open-b", "shares-c"])
    # a node that accepted secure aggregation, sent a plain train message that claims to be secure
    h.setup("the experiment under secure aggregation", secure, to=["strict-a"])
    h.train("plaintext training under a 'secure' flag", "strict-a", 1, e[7], secure=True)


def second_run(h: Hostile) -> None:
    h.setup("rename the experiment in a new run", {**honest_request(), "name": "another-name"})


@pytest.fixture(scope="module")
def played(federation):
    root, nodes = federation
    cfg = load_config(None, TINY + [f"policy={root / 'fed' / 'policies' / 'hostile.yaml'}",
                                    f"clients={root / 'fed' / 'clients'}",
                                    f"server_key={root / 'fed' / 'coordinator' / 'audit.key'}",
                                    "data.languages=[aa, bb, cc]", f"data.labels=[{', '.join(LABELS)}]",
                                    "dp.enabled=true", "dp.target_epsilon=4"])
    log: dict = {}
    run_federated_simulation(cfg, root / "run-1", show_progress=False, server_app=hostile_app(first_run, log, 3),
                             nodes=nodes)
    run_federated_simulation(cfg, root / "run-2", show_progress=False, server_app=hostile_app(second_run, log, 3),
                             nodes=nodes)
    assert "error" not in log, log.get("error")
    return log


def outcome(played, step):
    return played["steps"][step]


def test_the_nodes_enforce_their_own_rules_whatever_the_request(played):
    assert outcome(played, "drop the policy: no DP, no secure aggregation") == {
        "strict-a": "secagg-required", "open-b": "dp-required", "shares-c": "dp-required"}
    assert set(outcome(played, "raise epsilon").values()) == {"epsilon-above-maximum"}


def test_the_coordinator_names_no_file_field_model_or_label_the_node_does_not_own(played):
    assert set(outcome(played, "name a data path and fields").values()) == {"malformed-request"}
    assert set(outcome(played, "ask for an unknown label set").values()) == {"labels-outside-task"}
    assert set(outcome(played, "name a model by path").values()) == {"model-not-allowed"}
    assert set(outcome(played, "name another task").values()) == {"unknown-task"}
    # the honest request: accepted where the rules allow plaintext, refused where they require SecAgg+
    assert outcome(played, "the experiment") == {"strict-a": "secagg-required", "open-b": "ok", "shares-c": "ok"}


def test_the_budget_binds_where_it_is_spent_offer_or_no_offer(played):
    assert [outcome(played, f"train past the budget, round {r}")["open-b"] for r in (1, 2, 3)] == [
        "ok", "ok", "budget-exhausted"]
    assert outcome(played, "replay a round")["open-b"] == "round-replayed"
    assert outcome(played, "train on an encoder, first")["shares-c"] == "ok"
    assert outcome(played, "train again on the same encoder")["shares-c"] == "encoder-reused"
    assert outcome(played, "offer round 3 on one encoder")["shares-c"]["code"] == "ok"
    assert outcome(played, "train round 3 on another encoder")["shares-c"] == "encoder-not-offered"


def test_a_secure_flag_in_a_plain_train_message_gets_no_update_in_the_clear(played):
    """Only the node's own SecAgg+ collect stage masks a reply; the coordinator's flag proves nothing."""
    assert outcome(played, "the experiment under secure aggregation") == {"strict-a": "ok"}
    assert outcome(played, "plaintext training under a 'secure' flag") == {"strict-a": "secagg-required"}


def test_renaming_the_experiment_gives_no_fresh_budget(played):
    assert set(outcome(played, "rename the experiment in the run").values()) == {"setup-changed"}
    # a new run: open-b spent 3.76 of its lifetime 4.5 on the first experiment; two more rounds would reach 5.04
    assert outcome(played, "rename the experiment in a new run")["open-b"] == "budget-exhausted"


def test_evaluation_happens_once_per_round_and_is_released_only_as_the_rules_say(played):
    first = outcome(played, "evaluate chosen parameters")["shares-c"]["metrics"]
    assert set(first) == {"accuracy"} and first["accuracy"] == round(first["accuracy"], 1)
    assert outcome(played, "evaluate chosen parameters again")["shares-c"] == "evaluation-repeated"
    assert outcome(played, "evaluate at a node that releases nothing")["open-b"]["metrics"] == {}


def test_no_byte_the_coordinator_received_derives_from_a_nodes_data_unless_its_rules_release_it(played, federation):
    root, _ = federation
    private = [str(root), "/etc", CANARY, "sports", "medical-notes"]  # paths, file lines, a label, a task
    # |D_k|, its weight ratio, the sampling rate, the evaluation rows
    counts = {lang: {n, n / 32, BATCH / n, 6 + i} for i, (lang, n) in enumerate(SIZES.items())}
    lang_of = {"strict-a": "aa", "open-b": "bb", "shares-c": "cc"}
    assert len(played["bytes"]) > 30
    for step, client, kind, raw, records in played["bytes"]:
        text = raw.decode("latin-1")
        for word in private:
            assert word not in text, (step, client, word)
        for name, record in records.items():
            for key, value in record.items():
                if name == "config_records.answer" and key == "code":
                    assert value == "ok" or value in MESSAGES, (step, value)
                if kind == MessageType.TRAIN and name.endswith("num_examples"):
                    continue  # a plaintext update's weight: released by rules that allow plaintext
                if kind == MessageType.TRAIN and name.endswith("fitres.metrics"):
                    assert record == {}, (step, record)  # no loss, no steps: training metrics not released
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and client in lang_of:
                        assert v not in counts[lang_of[client]], (step, client, name, key, v)
        if kind == MessageType.TRAIN and client is not None and records:  # a reply, not a refusal
            assert lang_of[client] != "aa"  # the node that requires secure aggregation trained nothing in the clear
