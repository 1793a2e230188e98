"""Side channels a hostile coordinator plays against a node (issue: no oracles). Each test runs the
probe and asserts that what the coordinator gets back no longer depends on the private value."""

import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from securefpt.node.secagg import _checked_handler


def _collect_reply(rows: int, update: np.ndarray, max_weight: float, clip: float):
    """What the node's COLLECT check hands to Flower's masking, for a node that trained on `rows`."""
    state = RecordDict({RECORD_KEY_STATE: ConfigRecord({"clipping_range": clip, "max_weight": max_weight})})
    context = Context(run_id=1, node_id=7, node_config={}, state=state, run_config={})
    request = Message(content=RecordDict(), metadata=Metadata(
        run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN))

    def train(msg, ctxt):
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([update]), rows, {})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    reply = _checked_handler(context, train)(request, context)
    assert not reply.has_error()
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    return fitres.num_examples, parameters_to_ndarrays(fitres.parameters)[0]


@pytest.mark.parametrize("max_weight", [8.0, 20.0, 64.0], ids=["below-both", "between", "above-both"])
def test_the_weight_bound_the_coordinator_chooses_answers_no_bit_of_the_dataset_size(max_weight):
    """Before: a node refused (`weight-out-of-range`) iff |D_k| > max_weight, one bit of |D_k| per
    round. Now two nodes of 10 and 50 rows answer alike for every bound: a weight capped at
    max_weight, never a refusal."""
    update = np.linspace(-0.01, 0.01, 12, dtype=np.float32)
    small, large = (_collect_reply(n, update, max_weight, clip=8.0) for n in (10, 50))
    assert small[0] == min(10, max_weight) and large[0] == min(50, max_weight)
    assert small[0] / max_weight <= 1 and large[0] / max_weight <= 1


def test_the_clipping_range_the_coordinator_chooses_answers_no_bit_of_the_update_size():
    """Before: `update-out-of-range` iff |D_k|/max_weight x max|update| > clipping_range. Now the node
    scales its update into range (direction kept) whatever the range."""
    update = np.array([0.5, -2.0, 1.0], dtype=np.float32)
    for clip in (10.0, 1.0, 1e-3):
        weight, sent = _collect_reply(16, update, 16.0, clip)
        assert np.abs(sent).max() <= clip
        assert np.allclose(sent / np.abs(sent).max(), update / np.abs(update).max(), atol=1e-6)
    weight, sent = _collect_reply(16, update, 16.0, 10.0)
    assert np.array_equal(sent, update)  # an update inside the range is sent as it is


def test_a_non_finite_update_is_still_refused():
    from securefpt.protocol.refusals import NodeRefusal

    with pytest.raises(NodeRefusal, match="update-not-finite"):
        _collect_reply(10, np.array([np.nan, 1.0], dtype=np.float32), 16.0, 8.0)


def test_a_supernode_s_identity_never_comes_from_the_coordinator_s_run_config(tmp_path, monkeypatch):
    """A SuperNode started with only a partition id: a hostile coordinator's run config names an
    `out-dir` whose partition list points at a node.yaml of its choosing. Without the node's own
    opt-in (its environment) the node refuses at once, naming how to configure it; with it (flwr run .
    on one machine, set by setup.sh) it reads the list."""
    import json

    from securefpt.errors import ConfigError
    from securefpt.node.config import FLWR_SIM_ENV, SIM_NODES_ENV, _where

    planted = tmp_path / "out" / "nodes"
    planted.mkdir(parents=True)
    (planted / "partitions.json").write_text(json.dumps([str(tmp_path / "coordinator-chosen" / "node.yaml")]))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(),
                      run_config={"out-dir": str(tmp_path / "out")})
    monkeypatch.delenv(SIM_NODES_ENV, raising=False)
    monkeypatch.delenv(FLWR_SIM_ENV, raising=False)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="this node has no configuration") as err:
        _where(context)
    assert FLWR_SIM_ENV in str(err.value) and time.monotonic() - start < 2.0  # no minute-long wait
    monkeypatch.setenv(FLWR_SIM_ENV, "1")
    assert _where(context)[0] == tmp_path / "coordinator-chosen" / "node.yaml"  # the node opted in


def test_setup_answers_to_dp_plans_are_the_same_for_nodes_of_different_sizes(tmp_path):
    """Channel 1: the noise-to-signal check refused iff sigma(q = B / |D_k|) sqrt(d) / B exceeded a
    bound, so a coordinator sweeping target epsilons, one new run per probe, binary-searched |D_k|
    in free setups. The check now runs at the request's public row cap (or, without one, not at
    all: the node accepts and notes it in its own log). Two nodes of 10 and 18 rows answer every
    probe alike, with and without a cap; the probes do separate them under the old rule."""
    import json

    from securefpt.engines.trial_nodes import write_trial_nodes
    from securefpt.experiment.loading import load_config
    from securefpt.learning.modeling import build_model, get_trainable
    from securefpt.node.budget import MAX_NOISE_TO_SIGNAL, noise_to_signal, plan_privacy
    from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

    root = make_masakhanews_like(tmp_path / "data", ["aa", "cc"], sizes=[10, 18])
    cfg = load_config(None, TINY + tsv_cfg_overrides(root, ["aa", "cc"]) + [
        "dp.enabled=true", "fl.batch_size=4", "fl.rounds=20", "secagg.enabled=false"])
    labels = ["health", "politics", "sports"]
    d = sum(a.size for a in get_trainable(build_model(cfg.model, cfg.peft, 3, 0).model).values())
    probes = [0.05 * 1.5 ** i for i in range(1, 12, 2)]  # target epsilons, 0.075 to 4.3
    with_epsilon = [cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"target_epsilon": e})}) for e in probes]
    old_rule = {rows: [noise_to_signal(plan_privacy(c.request(labels), rows), rows, d) > MAX_NOISE_TO_SIGNAL
                       for c in with_epsilon] for rows in (10, 18)}
    assert old_rule[10] != old_rule[18]  # the sweep is an oracle under the old rule

    nodes = dict(zip(["aa", "cc"], write_trial_nodes(cfg, tmp_path / "nodes")))
    requests = []
    for cap in (None, 16):
        for c in with_epsilon:
            request = json.loads(c.request(labels).to_json())
            request["training"]["max_train"] = cap
            requests.append(request)
    answers = _setup_answers(nodes, requests, 0)
    assert answers["aa"] == answers["cc"]  # the 10-row and 18-row nodes are indistinguishable
    assert "noise-swamps-signal" in answers["aa"] and "ok" in answers["aa"]  # the check still works, publicly
    assert all(code == "ok" for code in answers["aa"][:len(probes)])  # no cap: nothing decided on |D_k|


def _setup_answers(paths: dict, requests: list[dict], first_run: int) -> dict[str, list[str]]:
    """Each node's answer (a code) to each setup request, every probe in a run of its own."""
    from securefpt.node.app import setup
    from securefpt.protocol import records as R
    from tests.attacks import call_node, setup_content

    answers: dict[str, list[str]] = {name: [] for name in paths}
    run_id = first_run
    for request in requests:
        for name, path in paths.items():
            run_id += 1  # a new run for every probe, as a hostile coordinator would start
            reply = call_node(setup, path, run_id, setup_content(request), MessageType.QUERY)
            answers[name].append(str(reply.content.config_records[R.ANSWER]["code"]))
    return answers


def test_a_node_that_declares_its_labels_answers_label_space_probes_from_its_configuration(tmp_path):
    """Channel 5: `labels-outside-task` answered, per proposed label space, whether the node's rows
    hold a label outside it; proposing spaces one label short, run after run, reads the node's label
    set. A node whose binding declares its labels (node.yaml `labels:`) is judged on that
    declaration: a node holding all three labels and one holding two (both declaring the task's
    three) answer every probe alike. Undeclared, the same probes tell them apart (the control)."""
    import json
    import re

    import yaml

    from securefpt.engines.trial_nodes import write_trial_nodes
    from securefpt.experiment.loading import load_config
    from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb"])
    for split in ("test", "dev"):  # bb holds no 'health' row
        path = root / "bb" / f"{split}.tsv"
        records = re.split(r"(?m)^(?=(?:health|politics|sports)\t)", path.read_text())  # a row spans two lines
        path.write_text("".join(r for r in records if not r.startswith("health")))
    labels = ["health", "politics", "sports"]
    cfg = load_config(None, TINY + tsv_cfg_overrides(root, ["aa", "bb"]) + [f"data.labels=[{', '.join(labels)}]"])
    paths = dict(zip(["aa", "bb"], write_trial_nodes(cfg, tmp_path / "nodes")))
    base = json.loads(cfg.request(labels).to_json())
    probes = [{**base, "labels": space} for space in (["politics", "sports"], ["health", "sports"],
                                                      ["health", "politics"], labels, [*labels, "weather"])]
    undeclared = _setup_answers(paths, probes, 0)
    assert undeclared["aa"] != undeclared["bb"]  # bb's missing label shows: the oracle
    for path in paths.values():
        node = yaml.safe_load(path.read_text())
        node["data"]["news-topic"]["labels"] = labels
        path.write_text(yaml.safe_dump(node))
    declared = _setup_answers(paths, probes, 100)
    assert declared["aa"] == declared["bb"] == ["labels-outside-task"] * 3 + ["ok", "ok"]


def test_evaluation_figures_stop_at_the_node_s_lifetime_cap_across_runs(tmp_path):
    """Channel 4: every released accuracy is the answer to a question about the node's evaluation
    labels on parameters of the coordinator's choosing, and a coordinator can ask once per planned
    round, in run after run. With `release.max_metric_releases: 2` the node answers two such
    questions in its lifetime on this dataset, whatever the runs, rounds or personalization; the
    control without a cap answers every one."""
    import yaml
    from flwr.app import ConfigRecord, RecordDict

    from securefpt.engines.trial_nodes import write_trial_nodes
    from securefpt.experiment.loading import load_config
    from securefpt.learning.modeling import build_model, get_trainable
    from securefpt.node.app import evaluate, personalize, setup
    from securefpt.protocol import records as R
    from tests.attacks import call_node, setup_content
    from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

    root = make_masakhanews_like(tmp_path / "data", ["aa", "bb"])
    cfg = load_config(None, TINY + tsv_cfg_overrides(root, ["aa", "bb"]) + [
        "fl.rounds=3", "secagg.enabled=false", "personalization.adapt_epochs=1"])
    capped, control = write_trial_nodes(cfg, tmp_path / "nodes")
    node = yaml.safe_load(capped.read_text())
    node["rules"]["release"]["max_metric_releases"] = 2
    capped.write_text(yaml.safe_dump(node))
    request = cfg.request(["health", "politics", "sports"])
    chosen = get_trainable(build_model(cfg.model, cfg.peft, 3, 1).model)  # parameters the coordinator chose

    def released(path, run_id):
        call_node(setup, path, run_id, setup_content(request.to_json()), MessageType.QUERY)
        figures = []
        for server_round in (1, 2, 3):
            content = RecordDict({R.GLOBAL: R.arrays_to_record(chosen),
                                  R.ROUND: ConfigRecord({"server-round": server_round, "next-round": 0})})
            reply = call_node(evaluate, path, run_id, content, MessageType.EVALUATE)
            figures.append("accuracy" in reply.content.metric_records[R.EVAL])
        reply = call_node(personalize, path, run_id, RecordDict({R.GLOBAL: R.arrays_to_record(chosen)}),
                          R.PERSONALIZE_QUERY)
        return figures + ["accuracy" in reply.content.metric_records[R.EVAL]]

    assert released(control, 1) == released(control, 2) == [True] * 4
    assert released(capped, 3) == [True, True, False, False]
    assert released(capped, 4) == [False] * 4  # a new run does not reset the count


def test_a_near_copy_of_an_encoder_is_refused_and_node_randomness_blurs_a_replayed_training(tmp_path):
    """Channel 3, differencing without DP: in a new run the coordinator offers the encoder of an earlier
    run plus 1e-6. The exact-bytes guard misses it, and under the request's seed the node's update
    comes back equal to 1e-6: two cohort sums would differ by that node's update alone. A node whose
    rules set `differencing` refuses the near copy (`encoder-reused`) and, with its own randomness,
    two trainings on encoders it accepts differ by SGD's noise, far more than the perturbation's effect."""
    import yaml

    from securefpt.engines.trial_nodes import write_trial_nodes
    from securefpt.experiment.loading import load_config
    from securefpt.learning.modeling import build_model, get_trainable
    from securefpt.node.app import setup, train
    from securefpt.protocol.refusals import NodeRefusal
    from tests.attacks import call_node, setup_content
    from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

    root = make_masakhanews_like(tmp_path / "data", ["aa"], sizes=[18])
    cfg = load_config(None, TINY + tsv_cfg_overrides(root, ["aa"]) + [
        "fl.rounds=2", "secagg.enabled=false", "fl.batch_size=4"])
    import shutil

    guarded = write_trial_nodes(cfg, tmp_path / "nodes")[0]
    control = shutil.copytree(guarded.parent, tmp_path / "nodes" / "aa-control") / "node.yaml"  # same data
    node = yaml.safe_load(guarded.read_text())
    node["rules"]["differencing"] = {"randomness": "node", "min_encoder_distance": 0.01}
    guarded.write_text(yaml.safe_dump(node))
    labels = ["health", "politics", "sports"]
    encoder = get_trainable(build_model(cfg.model, cfg.peft, 3, cfg.seed).model)
    rng = np.random.default_rng(1)
    direction = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in encoder.items()}
    norm = float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in direction.values())))
    moved = lambda by: {k: v + direction[k] * (by / norm) for k, v in encoder.items()}  # noqa: E731

    def update(path, run_id, arrays, name):
        request = cfg.model_copy(update={"name": name}).request(labels)  # a new experiment in a new run
        assert str(call_node(setup, path, run_id, setup_content(request.to_json()), MessageType.QUERY)
                   .content.config_records["answer"]["code"]) == "ok"
        content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(list(arrays.values())),
                                                     {"server-round": 1}), True)
        try:
            reply = call_node(train, path, run_id, content, MessageType.TRAIN)
        except NodeRefusal as refusal:
            return refusal.code
        values = parameters_to_ndarrays(compat.recorddict_to_fitres(reply.content, keep_input=True).parameters)
        return np.concatenate([(v - a).ravel() for v, a in zip(values, arrays.values())])

    def gap(a, b):
        return float(np.linalg.norm(a - b))

    # the attack, on a node under the request's seed: the replayed update is the first one (L2 gap ~1e-7)
    first, replayed = update(control, 1, encoder, "e1"), update(control, 2, moved(1e-6), "e2")
    assert gap(first, replayed) < 1e-4
    farther = update(control, 3, moved(0.02), "e3")
    # the guarded node (the same data): the near copy is refused; encoders beyond the distance train, and
    # two of them 0.02 apart give updates that differ far more than the deterministic node's (its own randomness)
    assert not isinstance(update(guarded, 11, encoder, "e1"), str)
    assert update(guarded, 12, moved(1e-6), "e2") == "encoder-reused"
    assert update(guarded, 13, moved(0.005), "e3") == "encoder-reused"  # within 0.01, still refused
    guarded_first = update(guarded, 14, moved(0.5), "e4")
    guarded_second = update(guarded, 15, moved(0.52), "e5")
    control_first, control_second = update(control, 4, moved(0.5), "e4"), update(control, 5, moved(0.52), "e5")
    assert gap(guarded_first, guarded_second) > 5 * gap(control_first, control_second)  # measured 9x to 16x
    assert gap(first, farther) > 0  # the control trained every offer


def test_a_dp_node_releases_no_figure_of_its_personalized_model(tmp_path):
    """Channel 4's last part: a node's personalized model adapts without DP (it never leaves), so its
    accuracy is a statistic of a non-private model. A DP node keeps it in its own log and releases
    nothing, whatever its release rules; the same node without DP releases it as its rules say."""
    from flwr.app import ConfigRecord, RecordDict

    from securefpt.engines.trial_nodes import write_trial_nodes
    from securefpt.experiment.loading import load_config
    from securefpt.learning.modeling import build_model, get_trainable
    from securefpt.node.app import evaluate, personalize, setup
    from securefpt.protocol import records as R
    from tests.attacks import call_node, setup_content
    from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

    root = make_masakhanews_like(tmp_path / "data", ["aa"], sizes=[18])
    base = TINY + tsv_cfg_overrides(root, ["aa"]) + ["fl.rounds=2", "secagg.enabled=false",
                                                      "personalization.adapt_epochs=1"]
    path = write_trial_nodes(load_config(None, base), tmp_path / "nodes")[0]  # releases every figure
    encoder = get_trainable(build_model(load_config(None, base).model, load_config(None, base).peft, 3, 0).model)
    labels = ["health", "politics", "sports"]

    def personalized(run_id, extra):
        request = load_config(None, base + extra).request(labels)
        assert str(call_node(setup, path, run_id, setup_content(request.to_json()), MessageType.QUERY)
                   .content.config_records[R.ANSWER]["code"]) == "ok"
        content = RecordDict({R.GLOBAL: R.arrays_to_record(encoder),
                              R.ROUND: ConfigRecord({"server-round": 1, "next-round": 0})})
        call_node(evaluate, path, run_id, content, MessageType.EVALUATE)
        reply = call_node(personalize, path, run_id, RecordDict({R.GLOBAL: R.arrays_to_record(encoder)}),
                          R.PERSONALIZE_QUERY)
        return dict(reply.content.metric_records[R.EVAL])

    assert set(personalized(1, [])) == {"accuracy"}
    assert personalized(2, ["dp.enabled=true", "dp.target_epsilon=8"]) == {}
    kept = (path.parent / "node.log").read_text()
    assert '"released": false' in kept  # the node's own log keeps the figure
