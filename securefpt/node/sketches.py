"""Near copies of an encoder: a node refuses to train on one close to an encoder it trained on.

A coordinator that offers encoder E in one run and E plus a tiny perturbation in another
gets, from a node without DP, two nearly equal updates, and two cohort sums that differ by
that node's update alone. The exact-bytes guard (node/state.py) misses the perturbed copy.
So each encoder the node trains on is kept as a sketch: its projection onto K random
directions drawn from a secret the node keeps (the coordinator cannot aim a perturbation at
what the sketch misses), whose distances are the encoders' L2 distances within a few tens of
percent (Johnson-Lindenstrauss). An offer within the node's `differencing.min_encoder_distance`
of a kept sketch (other than the same encoder: a held secure round's retry is node/state.py's
to allow) is refused like an exact reuse. Sketches are compared within one federation (the
node's pinned coordinator key): a refusal is then no answer to another coordinator about what
the node trained on elsewhere. The distance must stay below the change of the global encoder
in one round, or the node refuses its own run's next round (it drops out of that run).
Sketching costs d x K normal draws per encoder: for prompt tuning and LoRA fractions of a
second; for full fine-tuning, minutes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from securefpt.node.state import read_json, write_json

K = 64  # directions of a sketch
CHUNK = 8192  # coordinates projected at a time (bounded memory)


class Sketches:
    """The sketches of every encoder this node trained on (lifetime, in its state folder)."""

    def __init__(self, folder: Path, federation: str = "local") -> None:
        self.path, self.key = Path(folder) / "sketches.json", Path(folder) / "sketch.key"
        self.federation = federation

    def _secret(self) -> int:
        if not self.key.is_file():
            self.key.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.key.with_name("sketch.key.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(32))
            os.replace(tmp, self.key)  # two processes racing keep one secret: the one replaced last
        return int.from_bytes(self.key.read_bytes(), "big")

    def sketch(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        flat = np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in sorted(arrays)])
        rng = np.random.default_rng([self._secret(), flat.size])  # one projection per dimension
        out = np.zeros(K)
        for at in range(0, flat.size, CHUNK):
            block = flat[at:at + CHUNK]
            out += block @ rng.standard_normal((block.size, K))
        return out / np.sqrt(K)

    def nearest(self, arrays: Mapping[str, np.ndarray], encoder: str) -> float:
        """The sketched distance to the closest other encoder of the same size trained on (inf: none)."""
        kept = [e for e in read_json(self.path, [])
                if e["encoder"] != encoder and e.get("federation", self.federation) == self.federation]
        if not kept:
            return float("inf")
        mine, size = self.sketch(arrays), sum(int(np.asarray(a).size) for a in arrays.values())
        return min((float(np.linalg.norm(mine - np.asarray(e["sketch"]))) for e in kept if e["size"] == size),
                   default=float("inf"))

    def keep(self, arrays: Mapping[str, np.ndarray], encoder: str) -> None:
        kept = read_json(self.path, [])
        if any(e["encoder"] == encoder and e.get("federation") == self.federation for e in kept):
            return
        size = sum(int(np.asarray(a).size) for a in arrays.values())
        write_json(self.path, [*kept, {"encoder": encoder, "size": size, "federation": self.federation,
                                       "sketch": self.sketch(arrays).tolist()}])
