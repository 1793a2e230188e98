"""Distributed DP under SecAgg+ (dp.mode: distributed): the accountant, the noise each node adds and
what the sum carries, and a hostile coordinator that would have a node under-noise its share."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from opacus.accountants import RDPAccountant

from securefpt.coordinator.secure_aggregation import resolve_settings
from securefpt.engines.trial_nodes import write_trial_nodes
from securefpt.errors import ConfigError
from securefpt.experiment.loading import load_config
from securefpt.experiment.trial_data import label_space, load_client_data
from securefpt.learning.artifacts import load_arrays
from securefpt.learning.distributed_dp import ShareSpec, gradient_share
from securefpt.learning.modeling import build_model, get_trainable
from securefpt.node import app as node_app
from securefpt.node.secagg import masked, secure_aggregation_mod
from securefpt.privacy import skellam
from securefpt.privacy.distributed import Ring, integer_scale, rounded_sensitivity, share_variance
from securefpt.protocol import records as R
from securefpt.protocol.refusals import NodeRefusal
from tests.attacks import call_node, setup_configs, setup_content
from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

LANGS = ["aa", "bb", "cc"]  # 10, 14, 18 training rows
DELTA = 1e-5


def distributed(tmp_path, *extra):
    root = make_masakhanews_like(tmp_path / "data", LANGS)
    return load_config(None, list(TINY) + tsv_cfg_overrides(root, LANGS) + [
        "dp.enabled=true", "dp.mode=distributed", "dp.noise_multiplier=1.0", "dp.target_epsilon=1000",
        "secagg.enabled=true", *extra])


# ---------------------------------------------------------------- the accountant


def test_the_skellam_accountant_is_the_gaussian_mechanism_at_large_noise_and_never_below_it():
    """Independent computation: Opacus's RDP accountant for the (subsampled) Gaussian mechanism, at the
    same orders. Skellam noise of variance (sigma l2)^2 on a fine grid costs what the Gaussian does, with
    Poisson sampling too, and never less."""
    l2, l1 = rounded_sensitivity(2**15, 5000)
    for sigma, q, steps in [(1.0, 1.0, 10), (2.0, 1.0, 50), (1.0, 0.05, 200), (0.8, 0.01, 1000), (1.5, 0.3, 20),
                            (6.0, 0.15, 20)]:
        gaussian = RDPAccountant()
        gaussian.history = [(sigma, q, steps)]
        expected = gaussian.get_epsilon(delta=DELTA, alphas=list(skellam.ORDERS))
        ours = skellam.epsilon(((sigma, q, steps, l2, l1),), DELTA)
        assert expected <= ours == pytest.approx(expected, rel=0.01)
    # the correction term matters on a coarse grid: the accountant charges for it
    coarse = rounded_sensitivity(4.0, 5000)
    assert skellam.epsilon(((1.0, 0.05, 200, *coarse),), DELTA) > skellam.epsilon(((1.0, 0.05, 200, l2, l1),), DELTA)
    # and it composes with DP-SGD steps in one ledger: more spends, more epsilon
    both = skellam.epsilon(((1.0, 0.05, 200, l2, l1), (1.2, 0.1, 30)), DELTA)
    assert both > skellam.epsilon(((1.0, 0.05, 200, l2, l1),), DELTA)


def test_sampling_adds_no_more_than_it_removes_for_a_symmetric_pair():
    """What lets the accountant charge the "remove a record" direction only (privacy/skellam.py): for every
    randomized-response pair {t, 1/t}, into which a symmetric pair's privacy loss decomposes, the Poisson
    mixture's alpha-moment is at least its (1 - alpha)-moment, at every order the accountant uses, over a
    dense grid of t and of sampling rates. A random pair that is not symmetric breaks it: the check can fail."""
    rng = np.random.default_rng(0)
    log_t = np.linspace(-50.0, 50.0, 20001)
    rates = np.concatenate([np.geomspace(1e-6, 0.999, 60), rng.uniform(0.0, 1.0, 20)])
    for q in rates:
        near, far = np.logaddexp(np.log1p(-q), np.log(q) + log_t), np.logaddexp(np.log1p(-q), np.log(q) - log_t)
        for alpha in skellam.ORDERS:  # log of (1-q+qt)^a + t (1-q+q/t)^a, and of the same at 1 - a
            remove = np.logaddexp(alpha * near, log_t + alpha * far)
            add = np.logaddexp((1 - alpha) * near, log_t + (1 - alpha) * far)
            assert np.all(remove - add >= -1e-9), (q, alpha)
    # without the symmetry (P = (0.5, 0.5), Q = (0.001, 0.999)) the "add" direction can be the larger one
    p, qq, rate, alpha = np.array([0.5, 0.5]), np.array([0.001, 0.999]), 0.9, 8
    mix = (1 - rate) * p + rate * qq
    assert np.sum(p**alpha * mix ** (1 - alpha)) > np.sum(mix**alpha * p ** (1 - alpha))


def test_planning_a_noise_multiplier_for_a_target_epsilon_finds_the_smallest_that_stays_within_it():
    l2, l1 = rounded_sensitivity(2**15, 5000)
    for target, q, rounds in [(1.0, 1 / 3, 30), (8.0, 0.05, 400)]:
        sigma = skellam.noise_multiplier_for(target, DELTA, q, rounds, l2, l1)
        assert skellam.epsilon(((sigma, q, rounds, l2, l1),), DELTA) <= target
        assert skellam.epsilon(((sigma / 1.002, q, rounds, l2, l1),), DELTA) > target


# ---------------------------------------------------------------- the noise


@pytest.fixture(scope="module")
def tiny_share(tmp_path_factory):
    cfg = distributed(tmp_path_factory.mktemp("share"))
    labels = label_space(cfg.data)
    model = build_model(cfg.model, cfg.peft, len(labels), cfg.seed)
    data = load_client_data(cfg.data, "cc", labels, cfg.seed)
    return model, data.train, list(get_trainable(model.model))


def test_each_share_carries_its_variance_and_any_threshold_of_shares_the_sums(tiny_share):
    """With no example sampled (every gradient zero), what a node sends is its noise share alone: its
    variance is (sigma l2)^2 / t in grid units, and the sum of t shares has the target (sigma l2)^2.
    A node that left its share out (or added the wrong one) fails the two-sided bound."""
    model, examples, names = tiny_share
    ring = Ring(clipping_range=8.0, quantization_range=2**22, modulus_range=2**32, threshold=3, shares=3,
                max_weight=32)
    sigma, batch = 1.5, 4
    scale = integer_scale(ring, batch)
    l2, _ = rounded_sensitivity(scale * 1.0, sum(a.size for a in get_trainable(model.model).values()))
    spec = ShareSpec(sample_rate=0.0, max_grad_norm=1.0, scale=scale, l2=l2,
                     share_variance=share_variance(sigma, l2, ring.threshold), batch_size=batch)
    draws = [np.concatenate([a.ravel() for a in gradient_share(model, examples, names, spec)[0]]) * -(scale * batch)
             for _ in range(3 * 8)]  # 8 rounds of 3 nodes' shares
    assert all(np.allclose(d, np.round(d), atol=1e-6) for d in draws)  # on the integer grid, exactly
    n = len(draws[0]) * 8
    bound = 4 * math.sqrt(2 / n)  # four standard errors of a sample variance
    alone = np.concatenate(draws).var() / (sigma * l2) ** 2
    assert abs(alone - 1 / 3) <= bound / 3
    sums = np.concatenate([sum(draws[i:i + 3]) for i in range(0, len(draws), 3)])
    assert abs(sums.var() / (sigma * l2) ** 2 - 1) <= bound
    two = np.concatenate([sum(draws[i:i + 2]) for i in range(0, len(draws), 3)])
    assert abs(two.var() / (sigma * l2) ** 2 - 1) > bound  # one share missing: caught


def test_a_sampled_example_moves_the_integer_sum_by_at_most_the_rounded_sensitivity(tiny_share):
    model, examples, names = tiny_share
    scale = 2.0**10
    l2, _ = rounded_sensitivity(scale, sum(a.size for a in get_trainable(model.model).values()))
    spec = ShareSpec(sample_rate=1.0, max_grad_norm=1.0, scale=scale, l2=l2, share_variance=0.0, batch_size=4)
    one = [np.concatenate([a.ravel() for a in gradient_share(model, [ex], names, spec)[0]]) * -(scale * 4)
           for ex in examples[:6]]
    norms = [float(np.linalg.norm(v)) for v in one]
    assert all(n <= l2 + 1e-6 for n in norms) and max(norms) > 0.5 * scale  # clipped, rounded, not vanished


def test_per_example_gradients_taken_a_few_at_a_time_give_the_same_integer_sum(tiny_share, monkeypatch):
    """LoRA or full tuning cannot hold every sampled example's gradient at once: in chunks of one the
    sum moves only by each example's randomized rounding (at most one grid step per coordinate)."""
    from securefpt.learning import distributed_dp

    model, examples, names = tiny_share
    scale = 2.0**10
    l2, _ = rounded_sensitivity(scale, sum(a.size for a in get_trainable(model.model).values()))
    spec = ShareSpec(sample_rate=1.0, max_grad_norm=1.0, scale=scale, l2=l2, share_variance=0.0, batch_size=4)
    flat = lambda: np.concatenate([a.ravel() for a in gradient_share(model, examples[:6], names, spec)[0]])  # noqa
    whole = flat() * -(scale * 4)
    monkeypatch.setattr(distributed_dp, "CHUNK_VALUES", 1)
    chunked = flat() * -(scale * 4)
    assert np.abs(whole).max() > 100 and np.abs(whole - chunked).max() <= 6 + 1e-6


@pytest.mark.slow
def test_the_unmasked_sum_carries_exactly_the_noise_of_the_target(tmp_path):
    """Real SecAgg+ among three nodes, one distributed-DP round: the change the coordinator applies
    is the unmasked sum of the shares over the cohort's normaliser. Its spread is the target's,
    sigma l2 / (s b n), within four standard errors (the clipped gradients are far below it)."""
    from securefpt.engines.simulation import run_federated_simulation

    cfg = distributed(tmp_path, "dp.noise_multiplier=20", "fl.rounds=1", "peft.num_virtual_tokens=20",
                      "personalization.adapt_epochs=0")
    summary = run_federated_simulation(cfg, tmp_path / "run", show_progress=False)
    assert summary["rounds"][0]["participants"] == LANGS
    settings = resolve_settings(cfg, len(LANGS))
    ring = Ring(settings.clipping_range, settings.quantization_range, settings.modulus_range, 3, 3,
                settings.max_weight)
    start = get_trainable(build_model(cfg.model, cfg.peft, len(label_space(cfg.data)), cfg.seed).model)
    end = load_arrays(tmp_path / "run" / "prompt_encoder.safetensors")
    change = np.concatenate([(end[k].astype(np.float64) - start[k]).ravel() for k in start])
    scale = integer_scale(ring, cfg.fl.batch_size)
    l2, _ = rounded_sensitivity(scale * cfg.dp.max_grad_norm, change.size)
    target = 20 * l2 / (scale * cfg.fl.batch_size * len(LANGS))
    assert abs(change.var() / target**2 - 1) <= 4 * math.sqrt(2 / change.size)
    eps, alone = summary["privacy"]["epsilon"], summary["privacy"]["epsilon_alone"]
    assert summary["privacy"]["mode"] == "distributed"
    assert all(eps[lang] < alone[lang] for lang in LANGS)
    # both guarantees reach the institutions' record and the model card, not only summary.json
    logged = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    assert [e["epsilon_alone"] for e in logged if e.get("event") == "privacy"] == [alone]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "distributed DP under SecAgg+" in card and f"aa {alone['aa']:g}" in card
    from rich.console import Console

    from securefpt.engines.report import print_summary

    console = Console(record=True, width=400)
    print_summary(summary, tmp_path / "run", console)
    line = next(x for x in console.export_text().splitlines() if x.startswith("DP:"))
    assert "noise multiplier of the sum 20" in line and f"aa {eps['aa']:.2f}" in line
    assert line.endswith(", ".join(f"{lang} {alone[lang]:.2f}" for lang in LANGS))


# ---------------------------------------------------------------- a hostile coordinator


@pytest.fixture
def nodes(tmp_path):
    cfg = distributed(tmp_path)
    return cfg, dict(zip(LANGS, write_trial_nodes(cfg, tmp_path / "nodes")))


def _accept(cfg, path, run_id, **dp):
    request = cfg.model_copy(update={"dp": cfg.dp.model_copy(update=dp)}).request(label_space(cfg.data))
    reply = call_node(node_app.setup, path, run_id, setup_content(request.to_json()), MessageType.QUERY)
    return str(reply.content.config_records[R.ANSWER]["code"]), request


def _secagg_setup(path, run_id, shares, threshold):
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup_configs(shares, shares, threshold, 32))})
    try:
        call_node(lambda m, c: secure_aggregation_mod(m, c, node_app.train), path, run_id, content,
                  MessageType.TRAIN, group_id="1")
    except NodeRefusal as refusal:
        return refusal.code
    return "ok"


def test_a_cohort_too_small_for_the_noise_of_the_sum_is_refused_where_local_dp_accepts_it(nodes):
    """A coordinator that runs a round of two (claiming the others dropped) would have each share
    sized for 3 contributors summed over 2: the sum under-noised by a third. Every node refuses the
    SecAgg+ setup; the same round under local DP (each node's noise its own) goes ahead."""
    cfg, paths = nodes
    for run_id, path in enumerate(paths.values(), start=100):
        assert _accept(cfg, path, run_id)[0] == "ok"
        assert _secagg_setup(path, run_id, shares=2, threshold=2) == "protocol-parameters"
        assert _accept(cfg, path, run_id + 50, mode="local", target_epsilon=8.0)[0] == "ok"
        assert _secagg_setup(path, run_id + 50, shares=2, threshold=2) == "ok"  # the control


def _train(path, run_id, request, ring):
    arrays = get_trainable(build_model(request.model, request.peft, len(request.labels), request.seed).model)
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(list(arrays.values())),
                                                 {"server-round": 1}), True)
    try:
        if ring is None:
            call_node(node_app.train, path, run_id, content, MessageType.TRAIN)
        else:
            with masked(ring):
                call_node(node_app.train, path, run_id, content, MessageType.TRAIN)
    except NodeRefusal as refusal:
        return refusal.code
    return "ok"


def test_a_ring_that_cannot_carry_the_share_and_a_plaintext_round_are_refused_before_training(nodes):
    """A clipping range of 1 (the default for updates) would clip a batch's gradient sum and its noise
    tail coordinate by coordinate; a coarse grid would round away the sensitivity the noise is sized
    for; a threshold below the node's noise contributors would under-noise the sum; a plaintext
    round would release one node's share. Each is refused, and nothing is spent; the honest
    coordinator's ring trains."""
    from securefpt.node.budget import Ledger
    from securefpt.node.config import load_node

    cfg, paths = nodes
    path = paths["aa"]
    code, request = _accept(cfg, path, 300)
    assert code == "ok"
    honest = resolve_settings(cfg, len(LANGS))
    ring = Ring(honest.clipping_range, honest.quantization_range, honest.modulus_range, 3, 3, honest.max_weight)
    lies = {"clipping range 1": replace(ring, clipping_range=1.0),
            "coarse grid": replace(ring, quantization_range=2**8, modulus_range=2**10),
            "two noise shares": replace(ring, threshold=2),
            "ring overflow": replace(ring, modulus_range=2**23),
            "plaintext": None}
    for lie, bad in lies.items():
        expected = "secagg-required" if bad is None else "protocol-parameters"
        assert _train(path, 300, request, bad) == expected, lie
    ledger = lambda: Ledger(load_node(path).state_dir, cfg.data.task, load_node(path).budget).entries  # noqa: E731
    assert ledger() == []  # nothing trained, nothing spent
    assert _train(path, 300, request, ring) == "ok"
    d = sum(a.size for a in get_trainable(build_model(cfg.model, cfg.peft, 3, cfg.seed).model).values())
    l2, l1 = rounded_sensitivity(integer_scale(ring, cfg.fl.batch_size) * cfg.dp.max_grad_norm, d)
    assert ledger() == [{"experiment": request.sha256(), "sigma": 1.0, "q": 4 / 10, "steps": 1, "l2": l2, "l1": l1,
                         "contributors": 3, "federation": "local"}]
    # the institution's own report reads the entry as a Skellam step: both guarantees, alone the weaker
    from securefpt.node.report import node_report

    spent = node_report(path)["datasets"][cfg.data.task]["experiments"][request.sha256()[:12]]
    assert spent["mode"] == "distributed" and spent["steps"] == 1
    assert spent["epsilon"] == pytest.approx(skellam.epsilon(((1.0, 0.4, 1, l2, l1),), DELTA))
    assert spent["epsilon_alone"] == pytest.approx(skellam.epsilon(((1 / math.sqrt(3), 0.4, 1, l2, l1),), DELTA))
    assert spent["epsilon_alone"] > spent["epsilon"]


def test_under_a_row_cap_whether_a_node_trains_and_what_it_spends_do_not_depend_on_its_size(tmp_path):
    """The coordinator probes |D_k| with a target epsilon between one round's spend at q = b/10 and at
    q = b/18: a node's own rate would answer it (the control, without a cap: the 10-row node declines,
    the 18-row node trains). Under a cap of 18 every node samples at the public rate b/18: both
    train, and their ledgers hold the same spend."""
    from securefpt.node.budget import Ledger
    from securefpt.node.config import load_node
    from securefpt.privacy.distributed import smallest_rounded_sensitivity

    for cap, expected in (("null", {"aa": "budget-exhausted", "cc": "ok"}), ("18", {"aa": "ok", "cc": "ok"})):
        cfg = distributed(tmp_path / cap, f"data.max_train_per_client={cap}")
        paths = dict(zip(LANGS, write_trial_nodes(cfg, tmp_path / cap / "nodes")))
        d = sum(a.size for a in get_trainable(build_model(cfg.model, cfg.peft, 3, cfg.seed).model).values())
        rounding = smallest_rounded_sensitivity(cfg.dp.max_grad_norm, d)
        low, high = (skellam.epsilon(((1.0, q, 1, *rounding),), DELTA) for q in (4 / 18, 4 / 10))
        settings = resolve_settings(cfg, len(LANGS))
        ring = Ring(settings.clipping_range, settings.quantization_range, settings.modulus_range, 3, 3,
                    settings.max_weight)
        answers, spent = {}, {}
        for run_id, lang in enumerate(("aa", "cc"), start=700):
            code, request = _accept(cfg, paths[lang], run_id, target_epsilon=(low + high) / 2)
            assert code == "ok"
            answers[lang] = _train(paths[lang], run_id, request, ring)
            node = load_node(paths[lang])
            spent[lang] = [(e["q"], e["steps"]) for e in Ledger(node.state_dir, cfg.data.task, node.budget).entries]
        assert answers == expected, cap
        if cap == "18":
            assert spent["aa"] == spent["cc"] == [(4 / 18, 1)]


def test_a_node_whose_rules_allow_only_local_dp_refuses_a_distributed_request(nodes):
    import yaml

    cfg, paths = nodes
    path = paths["bb"]
    node = yaml.safe_load(path.read_text())
    node["rules"]["dp"] = {"modes": ["local"]}
    path.write_text(yaml.safe_dump(node))
    assert _accept(cfg, path, 400)[0] == "dp-mode-forbidden"
    assert _accept(cfg, path, 401, mode="local", target_epsilon=8.0)[0] == "ok"


def test_distributed_dp_needs_secure_aggregation_a_public_noise_multiplier_and_a_shared_head(tmp_path):
    for i, (extra, why) in enumerate([("secagg.enabled=false", "secagg.enabled=false"),
                                      ("personalization.local_head=true", "local_head=true")]):
        with pytest.raises(ConfigError, match=why):
            distributed(tmp_path / str(i), extra)
    # without a fixed noise multiplier the operator's engines plan the sum's for target_epsilon, before the run,
    # on public values (the row cap); a federation's nodes without a cap cannot be planned for
    from securefpt.engines.dp_planning import distributed_noise, with_planned_noise

    unplanned = distributed(tmp_path / "plan", "dp.noise_multiplier=null", "dp.target_epsilon=4",
                            "data.max_train_per_client=16", "fl.batch_size=4")
    with pytest.raises(ConfigError, match="no dp.noise_multiplier"):  # a request must carry it
        unplanned.request(label_space(unplanned.data))
    planned = with_planned_noise(unplanned)
    sigma = planned.dp.noise_multiplier
    assert sigma == distributed_noise(unplanned, 4.0) and sigma > 0 and planned.dp.target_epsilon == 4.0
    request = planned.request(label_space(planned.data))
    assert request.dp.noise_multiplier == sigma
    # a node at the row cap, planning its own spend from that request, reaches the target by the last
    # round and not before: it trains every planned round, and the plan is not looser than asked
    from securefpt.learning.modeling import build_model, get_trainable
    from securefpt.node.budget import TOLERANCE, epsilon_of, plan_privacy

    d = sum(a.size for a in get_trainable(build_model(planned.model, planned.peft, 3, 0).model).values())
    plan = plan_privacy(request, 16, d)
    spent = epsilon_of([plan.round_spend()] * planned.fl.rounds, plan.delta, plan.accountant)
    assert 0.9 * 4.0 <= spent <= 4.0 * TOLERANCE, spent
    federation = unplanned.model_copy(update={"clients": tmp_path, "data": unplanned.data.model_copy(
        update={"max_train_per_client": None})})
    with pytest.raises(ConfigError, match="needs the public row cap"):
        with_planned_noise(federation)
    # the node checks the request itself: a coordinator that sends one anyway is refused
    cfg = distributed(tmp_path)
    path = write_trial_nodes(cfg, tmp_path / "nodes")[0]
    request = json.loads(cfg.request(label_space(cfg.data)).to_json())
    for field, value in [("noise_multiplier", None), ("mode", "distributed")]:
        request["dp"][field] = value
    request["secure_aggregation"] = False
    with pytest.raises(NodeRefusal) as refused:
        call_node(node_app.setup, path, 500, setup_content(request), MessageType.QUERY)
    assert refused.value.code == "malformed-request"
