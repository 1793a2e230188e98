import numpy as np
import pytest

from securefpt.coordinator.aggregation import select_clients, weighted_average


def test_weighted_average_is_algorithm_1():
    a = {"p": np.array([1.0, 2.0], dtype=np.float32), "h": np.array([[0.0]], dtype=np.float32)}
    b = {"p": np.array([3.0, 6.0], dtype=np.float32), "h": np.array([[4.0]], dtype=np.float32)}
    c = {"p": np.array([10.0, 10.0], dtype=np.float32), "h": np.array([[1.0]], dtype=np.float32)}
    out = weighted_average([(a, 100), (b, 300), (c, 100)])
    # |D| = 100, 300, 100 -> weights 0.2, 0.6, 0.2
    np.testing.assert_allclose(out["p"], [0.2 * 1 + 0.6 * 3 + 0.2 * 10, 0.2 * 2 + 0.6 * 6 + 0.2 * 10], rtol=1e-6)
    np.testing.assert_allclose(out["h"], [[0.6 * 4 + 0.2 * 1]], rtol=1e-6)
    assert list(out) == ["p", "h"]


def test_a_dropped_client_leaves_the_weights_and_renormalises_the_rest():
    a = {"p": np.array([1.0], dtype=np.float32)}
    b = {"p": np.array([4.0], dtype=np.float32)}
    c = {"p": np.array([100.0], dtype=np.float32)}
    everyone = weighted_average([(a, 1), (b, 3), (c, 500)])
    without_c = weighted_average([(a, 1), (b, 3)])  # c dropped out of the round
    np.testing.assert_allclose(everyone["p"], [(1 * 1 + 3 * 4 + 500 * 100) / 504], rtol=1e-6)
    np.testing.assert_allclose(without_c["p"], [(1 * 1 + 3 * 4) / 4], rtol=1e-6)  # not / 504: no trace of c


def test_nothing_to_aggregate_and_mismatched_names():
    with pytest.raises(ValueError, match="no client returned"):
        weighted_average([])
    with pytest.raises(ValueError, match="different parameter names"):
        weighted_average([({"p": np.zeros(1)}, 1), ({"q": np.zeros(1)}, 1)])


def test_selection_size_follows_m_equals_max_c_k_1():
    rng = np.random.default_rng(0)
    nodes = list(range(10, 20))
    assert len(select_clients(nodes, 0.3, rng)) == 3
    assert len(select_clients(nodes, 0.01, rng)) == 1
    assert select_clients(nodes, 1.0, rng) == nodes
    assert select_clients([], 1.0, rng) == []


def test_selection_is_sized_by_the_eligible_population_when_some_decline():
    rng = np.random.default_rng(0)
    # 10 eligible, C = 0.5: m = 5; only 3 are willing this round: all 3, never more than offered
    assert select_clients([1, 2, 3], 0.5, rng, population=10) == [1, 2, 3]
    # 8 willing of 10 eligible, C = 0.5: m = 5 (from the population), not 4 (from the willing)
    picked = select_clients(list(range(8)), 0.5, rng, population=10)
    assert len(picked) == 5 and set(picked) <= set(range(8)) and picked == sorted(picked)
    # the draw is without replacement and follows the generator: same seed, same cohort
    again = select_clients(list(range(8)), 0.5, np.random.default_rng(0), population=10)
    first = select_clients(list(range(8)), 0.5, np.random.default_rng(0), population=10)
    assert again == first and len(set(first)) == 5


def test_robust_aggregation_is_not_moved_far_by_one_poisoning_update():
    """fl.aggregation: one node among four sends 1000 in every coordinate. The mean moves by 250;
    the coordinate-wise median and the trimmed mean stay inside the honest updates' range."""
    from securefpt.coordinator.aggregation import robust_average

    honest = [({"p": np.array([1.0, -1.0, 0.5], dtype=np.float32) + i * 0.1}, 10) for i in range(4)]
    poisoned = honest[:3] + [({"p": np.full(3, 1000.0, dtype=np.float32)}, 10)]
    low = np.min([u["p"] for u, _ in honest[:3]], axis=0)
    high = np.max([u["p"] for u, _ in honest[:3]], axis=0)
    assert np.all(robust_average(poisoned, "mean")["p"] > 200)
    for how in ("median", "trimmed_mean"):
        out = robust_average(poisoned, how)["p"]  # the default trim_fraction, 0.2 of 4: still one each end
        assert np.all(out >= low - 1e-6) and np.all(out <= high + 1e-6), (how, out)
    np.testing.assert_allclose(robust_average(honest, "median")["p"], np.median([u["p"] for u, _ in honest], 0))


def test_robust_aggregation_needs_each_update_so_not_under_secagg():
    from securefpt.errors import ConfigError
    from securefpt.experiment.loading import load_config

    with pytest.raises(ConfigError, match="fl.aggregation=median needs each node's update"):
        load_config(None, ["fl.aggregation=median", "secagg.enabled=true"])
    assert load_config(None, ["fl.aggregation=median", "secagg.enabled=false"]).fl.aggregation == "median"


@pytest.mark.slow
def test_a_poisoning_node_pulls_the_mean_and_not_the_median_in_a_plaintext_federation(tmp_path):
    """The attack for real: one of four nodes runs modified software that sends its encoder plus 100
    in every coordinate (a plaintext federation: no SecAgg+, whose sum hides whose it was). Under the
    mean the global encoder moves by about 25; under fl.aggregation=median it stays where the honest
    nodes' training put it."""
    from flwr.app import MessageType
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from securefpt.engines.simulation import run_federated_simulation
    from securefpt.experiment.loading import load_config
    from securefpt.learning.artifacts import load_arrays
    from securefpt.learning.modeling import build_model, get_trainable
    from securefpt.node.config import this_node
    from tests.attacks import node_app_with
    from tests.conftest import TINY, make_masakhanews_like, tsv_cfg_overrides

    def poison(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or this_node(context).language != "dd" or reply.has_error():
            return reply
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        fitres.parameters = ndarrays_to_parameters([a + 100.0 for a in parameters_to_ndarrays(fitres.parameters)])
        return type(reply)(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    app = node_app_with(poison)
    langs = ["aa", "bb", "cc", "dd"]
    root = make_masakhanews_like(tmp_path / "data", langs)
    moved = {}
    for how in ("mean", "median"):
        cfg = load_config(None, TINY + tsv_cfg_overrides(root, langs) + [
            "fl.rounds=1", "secagg.enabled=false", f"fl.aggregation={how}"])
        start = get_trainable(build_model(cfg.model, cfg.peft, 3, cfg.seed).model)
        run_federated_simulation(cfg, tmp_path / how, show_progress=False, client_app=app)
        final = load_arrays(tmp_path / how / "prompt_encoder.safetensors")
        moved[how] = max(float(np.abs(final[k] - start[k]).max()) for k in final if k in start)
    assert moved["mean"] > 20 and moved["median"] < 1.0, moved
