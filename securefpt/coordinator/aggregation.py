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


def robust_average(updates: Sequence[tuple[Arrays, float]], how: str,
                   trim_fraction: float = 0.2) -> "OrderedDict[str, np.ndarray]":
    """The coordinate-wise median, or mean after dropping `trim_fraction` of the updates at each end
    (Yin et al. 2018): one poisoning node among honest ones moves neither far, whatever it sends.
    Unweighted: a node's claimed |D_k| is itself something it could lie about."""
    if how == "mean":
        return weighted_average(updates)
    if not updates:
        raise ValueError("no client returned an update: nothing to aggregate")
    names = list(updates[0][0].keys())
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for name in names:
        stacked = np.stack([np.asarray(arrays[name], dtype=np.float64) for arrays, _ in updates])
        if how == "median":
            out[name] = np.median(stacked, axis=0).astype(np.float32)
        else:
            n = len(updates)  # at least one dropped at each end once there are 3 (else it would be the mean)
            cut = min(max(int(trim_fraction * n), 1 if trim_fraction > 0 and n >= 3 else 0), (n - 1) // 2)
            ordered = np.sort(stacked, axis=0)
            out[name] = ordered[cut:n - cut].mean(axis=0).astype(np.float32)
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
