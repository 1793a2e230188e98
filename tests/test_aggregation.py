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


def test_dropped_client_is_left_out_of_the_weights():
    a = {"p": np.array([1.0], dtype=np.float32)}
    b = {"p": np.array([4.0], dtype=np.float32)}
    # client c (weight 500) dropped out: weights renormalise over a and b only
    out = weighted_average([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["p"], [(1 * 1 + 3 * 4) / 4])


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
    picked = select_clients(nodes, 1.0, rng)
    assert picked == nodes
