"""Federated Prompt Averaging (Algorithm 1): the weighted mean of the clients' encoders."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def weighted_average(updates: Sequence[tuple[Arrays, float]]) -> "OrderedDict[str, np.ndarray]":
    """h_g = sum_k |D_k| / sum_j |D_j| * h_k over the clients that returned.

    `updates` holds (parameters by name, |D_k|) pairs; names and shapes must agree.
    """
    if not updates:
        raise ValueError("no client returned an update: nothing to aggregate")
    total = float(sum(weight for _, weight in updates))
    if total <= 0:
        raise ValueError("the clients' total weight must be positive")
    names = list(updates[0][0].keys())
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for name in names:
        acc = np.zeros_like(np.asarray(updates[0][0][name], dtype=np.float64))
        for arrays, weight in updates:
            if list(arrays.keys()) != names:
                raise ValueError("clients returned different parameter names")
            acc += (weight / total) * np.asarray(arrays[name], dtype=np.float64)
        out[name] = acc.astype(np.float32)
    return out


def select_clients(
    candidates: Sequence[int], fraction: float, rng: np.random.Generator, population: int | None = None
) -> list[int]:
    """Client selection of Algorithm 1: m = max(floor(C*K), 1) clients drawn without replacement.

    K is `population` (all eligible clients) when only some `candidates` are available
    this round; then at most all candidates are drawn.
    """
    k = len(candidates)
    if k == 0:
        return []
    m = min(max(int(fraction * (population or k)), 1), k)
    picked = rng.choice(np.asarray(list(candidates), dtype=object), size=m, replace=False)
    return sorted(int(x) for x in picked)
