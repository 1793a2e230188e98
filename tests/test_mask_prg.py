"""SecAgg+ masks expanded from the whole shared secret (Flower folds it to 32 bits)."""

import importlib

import numpy as np
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from securefpt.protocol.mask_prg import expand_mask

SHAPES = [(3, 4), (5,), ()]
RING = 2**32


def _same_fold(seed: bytes) -> bytes:
    """Another 32-byte seed whose XOR of 4-byte words equals `seed`'s: flip one bit in two words."""
    other = bytearray(seed)
    other[0] ^= 0x01
    other[4] ^= 0x01
    return bytes(other)


def test_two_secrets_with_the_same_32_bit_fold_give_different_masks():
    seed = bytes(range(32))
    twin = _same_fold(seed)
    assert seed != twin
    flower = [pseudo_rand_gen(s, RING, SHAPES) for s in (seed, twin)]
    assert all(np.array_equal(a, b) for a, b in zip(*flower))  # Flower's: the same mask
    ours = [expand_mask(s, RING, SHAPES) for s in (seed, twin)]
    assert not any(np.array_equal(a, b) for a, b in zip(*ours))


def test_masks_are_deterministic_in_range_and_shaped():
    a, b = expand_mask(b"k" * 32, RING, SHAPES), expand_mask(b"k" * 32, RING, SHAPES)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [x.shape for x in a] == SHAPES and all(x.dtype == np.int64 for x in a)
    big = expand_mask(b"s" * 32, 2**20, [(200_000,)])[0]
    assert big.min() >= 0 and big.max() < 2**20
    assert abs(big.mean() / 2**20 - 0.5) < 0.01  # uniform over the ring


def test_both_sides_of_flower_s_secagg_plus_use_it():
    import securefpt.coordinator.secure_aggregation  # noqa: F401  (the coordinator's side installs it)
    import securefpt.node.secagg  # noqa: F401  (the node's side)

    for module in ("flwr.client.mod.secure_aggregation.secaggplus_mod",
                   "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        assert importlib.import_module(module).pseudo_rand_gen is expand_mask
