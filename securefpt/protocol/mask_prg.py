"""How a SecAgg+ mask is expanded from its seed, the same on every node and the coordinator.

Flower's `pseudo_rand_gen` folds the seed (a 32-byte shared secret, or a node's private mask
seed) into 32 bits by XOR-ing its words and seeds numpy's Mersenne Twister with that: a mask
has at most 2^32 values, and two different secrets with the same fold give the same mask.
`expand_mask` instead keys ChaCha20 with SHA-256 of the whole seed and reads the keystream as
64-bit words reduced into the ring (the reduction's bias is below 2^-31 for Flower's rings of
at most 2^32). `use_full_seed_masks` makes Flower's SecAgg+ client mod and server workflow
call it: both sides must, or the masks would not cancel.
"""

from __future__ import annotations

import hashlib

import numpy as np

NONCE = b"securefpt-mask\x00\x01"  # 16 bytes; one key per seed, so a fixed nonce never repeats a (key, nonce)


def expand_mask(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """One uniform array in [0, num_range) per shape, from all of `seed`'s bytes (Flower's signature)."""
    from cryptography.hazmat.primitives.ciphers import Cipher
    from cryptography.hazmat.primitives.ciphers.algorithms import ChaCha20

    sizes = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    encryptor = Cipher(ChaCha20(hashlib.sha256(bytes(seed)).digest(), NONCE), mode=None).encryptor()
    words = np.frombuffer(encryptor.update(bytes(8 * sum(sizes))), dtype="<u8") % np.uint64(num_range)
    out, start = [], 0
    for shape, size in zip(dimensions_list, sizes):
        chunk = words[start:start + size].astype(np.int64)
        out.append(chunk.reshape(shape) if len(shape) else np.array(chunk[0], dtype=np.int64))
        start += size
    return out


def use_full_seed_masks() -> None:
    """Point Flower's SecAgg+ client mod and server workflow at `expand_mask` (idempotent)."""
    from importlib import import_module

    for module in ("flwr.client.mod.secure_aggregation.secaggplus_mod",  # (the package re-exports a
                   "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):  # function of that name)
        vars(import_module(module))["pseudo_rand_gen"] = expand_mask
