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
